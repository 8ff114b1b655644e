"""Message templates: a sandboxed Jinja2 environment where an undefined name is an error.

Layout of ``templates/messages/`` (what a marketer edits):

    email/<name>.subject    one line, the subject
    email/<name>.html       HTML body; usually ``{% extends "layouts/email.html" %}``
    email/<name>.txt        plain-text body; usually ``{% extends "layouts/email.txt" %}``
    sms/<name>.txt          the SMS body
    layouts/                shared layouts with the unsubscribe footer

Every template sees: ``customer`` (first_name, email, phone, locale, timezone, id),
``facts`` (every catalog fact), ``event`` (the triggering event's properties, may be empty),
``unsubscribe_url``, ``brand`` and ``message_id``; filters ``money`` (cents to "$12.34")
and ``days``.

Templates render in ``engine.delivery.sandbox.BoundedSandbox`` (Jinja2's immutable
sandbox with bounded work) and each render gets its own deep copy of the context, so a
template can neither change the brand, facts or customer that the next render sees, nor
hang or exhaust the process: a render that crosses a bound is a ``TemplateError`` naming
the template's file and line, which fails ``rules check`` or that one message.
"""

from __future__ import annotations

import copy
from collections.abc import Generator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import jinja2

from engine.delivery.sandbox import BoundedSandbox, RenderLimitExceeded, RenderLimits, budgeted
from engine.errors import TemplateError

CHANNEL_FILES = {"email": ("subject", "html", "txt"), "sms": ("txt",)}


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    html: str
    text: str


@dataclass(frozen=True)
class RenderedSms:
    body: str


def _money(cents: object, currency: str = "$") -> str:
    if not isinstance(cents, int) or isinstance(cents, bool):
        raise TypeError(f"money expects integer cents, got {cents!r}")
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(cents), 100)
    return f"{sign}{currency}{whole:,}.{part:02d}"


def _days(count: object) -> str:
    return "1 day" if count == 1 else f"{count} days"


class TemplateStore:
    """Finds and renders the message templates of one directory."""

    def __init__(self, directory: Path, limits: RenderLimits | None = None) -> None:
        self.directory = Path(directory)
        self.limits = limits or RenderLimits()
        self.env = BoundedSandbox(
            loader=jinja2.FileSystemLoader(str(self.directory)),
            undefined=jinja2.StrictUndefined,
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            # Compiled templates are kept; a running engine picks up edits when the rules
            # are reloaded (App.reload_rules builds a new store), not by a stat per render.
            auto_reload=False,
        )
        self.env.filters["money"] = _money
        self.env.filters["days"] = _days

    def path(self, channel: str, name: str, part: str) -> str:
        return f"{channel}/{name}.{part}"

    def names(self, channel: str) -> list[str]:
        folder = self.directory / channel
        if not folder.is_dir():
            return []
        return sorted({p.name.split(".", 1)[0] for p in folder.iterdir() if p.is_file()})

    def missing_parts(self, channel: str, name: str) -> list[str]:
        return [
            self.path(channel, name, part)
            for part in CHANNEL_FILES[channel]
            if not (self.directory / self.path(channel, name, part)).is_file()
        ]

    def _render(self, template_path: str, context: dict[str, Any]) -> str:
        try:
            with budgeted(self.limits) as budget:
                template = self.env.get_template(template_path)
                stream = cast(Generator[str, None, None], template.generate(context))
                chunks: list[str] = []
                size = 0
                for chunk in stream:
                    size += len(chunk)
                    chunks.append(chunk)
                    try:
                        if size > self.limits.max_output:
                            raise RenderLimitExceeded(
                                f"the output is longer than {self.limits.max_output:,} characters"
                            )
                        budget.check_time()
                    except RenderLimitExceeded as exc:
                        # Raised inside the template, so the traceback names its line.
                        stream.throw(exc)
                return "".join(chunks).strip()
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                exc.filename or template_path, exc.message or str(exc), exc.lineno
            ) from exc
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(template_path, f"template not found: {exc.name}") from exc
        except jinja2.UndefinedError as exc:
            raise self._located(template_path, exc, f"{exc.message} (check the name)") from exc
        except RenderLimitExceeded as exc:
            raise self._located(template_path, exc, f"too much work: {exc}") from exc
        except jinja2.exceptions.SecurityError as exc:
            raise self._located(template_path, exc, f"not allowed in a template: {exc}") from exc
        except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
            raise self._located(template_path, exc, str(exc)) from exc
        except RecursionError as exc:
            raise self._located(
                template_path,
                exc,
                "nested too deeply (a macro or a recursive loop calling itself?)",
            ) from exc
        except MemoryError as exc:
            raise self._located(template_path, exc, "ran out of memory") from exc

    def _located(self, template_path: str, exc: BaseException, message: str) -> TemplateError:
        """The error at the innermost template line in the traceback (a layout, an include)."""
        where = _template_frame(exc.__traceback__, self.directory)
        if where is None:
            return TemplateError(template_path, message)
        return TemplateError(where[0], message, where[1])

    def render_email(self, name: str, context: dict[str, Any]) -> RenderedEmail:
        # One copy per message: whatever its templates do to the context dies with it.
        context = plain_copy(context)
        subject = self._render(self.path("email", name, "subject"), context)
        if "\n" in subject:
            raise TemplateError(self.path("email", name, "subject"), "the subject must be one line")
        return RenderedEmail(
            subject=subject,
            html=self._render(self.path("email", name, "html"), context),
            text=self._render(self.path("email", name, "txt"), context),
        )

    def render_sms(self, name: str, context: dict[str, Any]) -> RenderedSms:
        return RenderedSms(body=self._render(self.path("sms", name, "txt"), plain_copy(context)))

    def render(
        self, channel: str, name: str, context: dict[str, Any]
    ) -> RenderedEmail | RenderedSms:
        if channel == "email":
            return self.render_email(name, context)
        return self.render_sms(name, context)


def plain_copy(value: Any) -> Any:
    """A copy of a context's dicts and lists (their leaves, numbers, text and moments,
    cannot change): several times faster than copy.deepcopy, which a render would spend
    most of its time in."""
    if isinstance(value, dict):
        return {key: plain_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set):
        return type(value)(plain_copy(item) for item in value)
    if isinstance(value, str | int | float | bool | None | datetime | date):
        return value
    return copy.deepcopy(value)


def _template_frame(tb: TracebackType | None, directory: Path) -> tuple[str, int] | None:
    """(template path relative to ``directory``, line) of the last template frame in ``tb``.

    Jinja2 rewrites the traceback of an error raised while rendering so that its frames
    carry the template's file name and line number.
    """
    root = directory.resolve()
    found: tuple[str, int] | None = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        try:
            relative = Path(filename).resolve().relative_to(root)
        except (ValueError, OSError):
            relative = None
        if relative is not None:
            found = (relative.as_posix(), tb.tb_lineno)
        tb = tb.tb_next
    return found


def sample_context(facts: dict[str, Any]) -> dict[str, Any]:
    """What a template sees during ``rules check``: a sample customer and sample facts."""
    return {
        "customer": {
            "id": "sample-customer",
            "first_name": "Sam",
            "email": "sam@example.com",
            "phone": "+447700900123",
            "locale": "en-GB",
            "timezone": "Europe/London",
        },
        "facts": facts,
        "event": {},
        "unsubscribe_url": "https://example.com/u/sample-token",
        "brand": {"name": "Lifecycle Shop", "address": "1 Example Street, London"},
        "message_id": "00000000-0000-0000-0000-000000000000",
    }

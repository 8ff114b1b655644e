"""Message templates: a sandboxed Jinja2 environment where an undefined name is an error.

Layout of ``templates/messages/`` (what a marketer edits):

    email/<name>.subject    one line, the subject
    email/<name>.html       HTML body; usually ``{% extends "layouts/email.html" %}``
    email/<name>.txt        plain-text body; usually ``{% extends "layouts/email.txt" %}``
    sms/<name>.txt          the SMS body
    layouts/                shared layouts with the unsubscribe footer

Locale variants: ``email/welcome.fr.subject`` (``.html``, ``.txt``), ``sms/name.fr-CA.txt``,
``layouts/email.fr.html``... A message is rendered from the variant of the customer's
locale, falling back along the chain ``fr-CA`` → ``fr`` → the default (the files without a
locale). A variant of an email has all three parts; ``rules check`` renders every variant
and reports one whose variables differ from its default's (``variant_problems``).

Every template sees: ``customer`` (first_name, email, phone, locale, timezone, id),
``facts`` (every catalog fact), ``event`` (the triggering event's properties, may be empty),
``unsubscribe_url``, ``brand`` and ``message_id``; filters ``money`` (integer cents, in the
shop's currency: ``policies.yaml`` ``currency``), ``date`` (a date, or a date fact's whole
days) and ``days``. Money and dates are written the way the customer's locale writes them
(Babel's CLDR data): US$1,234.50 and 2 March 2026 in en-GB, 1 234,50 $US and 2 mars 2026
in fr; an unknown locale falls back along the same chain, to en-GB.

Templates render in ``engine.delivery.sandbox.BoundedSandbox`` (Jinja2's immutable
sandbox with bounded work) and each render gets its own deep copy of the context, so a
template can neither change the brand, facts or customer that the next render sees, nor
hang or exhaust the process: a render that crosses a bound is a ``TemplateError`` naming
the template's file and line, which fails ``rules check`` or that one message.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Generator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import jinja2
from babel import Locale, UnknownLocaleError
from babel.dates import format_date
from babel.numbers import format_currency
from jinja2 import meta, nodes

from engine.delivery.sandbox import BoundedSandbox, RenderLimitExceeded, RenderLimits, budgeted
from engine.errors import TemplateError

CHANNEL_FILES = {"email": ("subject", "html", "txt"), "sms": ("txt",)}
PARTS = frozenset({"subject", "html", "txt"})
LOCALE = re.compile(r"^[a-z]{2}(-[A-Z]{2})?$")  # as customers' locales are written
DEFAULT_LOCALE = "en-GB"
DEFAULT_CURRENCY = "USD"  # the `$` of the condition language; policies.yaml can change it


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    html: str
    text: str
    variant: str | None = None  # the locale of the variant rendered; None: the default


@dataclass(frozen=True)
class RenderedSms:
    body: str
    variant: str | None = None


def locale_chain(locale: str | None) -> list[str]:
    """The variants to try for ``locale``, most specific first: fr-CA → [fr-CA, fr]."""
    if not locale:
        return []
    language = locale.split("-", 1)[0]
    return [locale] if language == locale else [locale, language]


@functools.lru_cache(maxsize=256)
def babel_locale(locale: str | None) -> Locale:
    """Babel's locale for a customer's, along the same chain, ending at en-GB."""
    for tag in [*locale_chain(locale), DEFAULT_LOCALE]:
        try:
            return Locale.parse(tag, sep="-")
        except (UnknownLocaleError, ValueError):
            continue
    raise AssertionError("en-GB is always known")  # pragma: no cover


@dataclass(frozen=True)
class _Formats:
    locale: Locale
    currency: str


# The locale and currency of the render in progress (set by TemplateStore.render).
_formats: ContextVar[_Formats] = ContextVar("template_formats")


def _current_formats() -> _Formats:
    return _formats.get(None) or _Formats(babel_locale(DEFAULT_LOCALE), DEFAULT_CURRENCY)


# pass_context: a filter of the render's locale must never be folded into a constant when
# the template is compiled (Jinja2 evaluates filters of literals then, with no locale).
@jinja2.pass_context
def _money(_: object, cents: object, currency: str | None = None) -> str:
    """Integer cents as the customer's locale writes that amount of the shop's currency."""
    if not isinstance(cents, int) or isinstance(cents, bool):
        raise TypeError(f"money expects integer cents, got {cents!r}")
    formats = _current_formats()
    return str(
        format_currency(
            Decimal(cents).scaleb(-2), currency or formats.currency, locale=formats.locale
        )
    )


_EPOCH = date(1970, 1, 1)


@jinja2.pass_context
def _date(_: object, value: object, style: str = "medium") -> str:
    """A date (a ``date``, a ``datetime``'s date, ``YYYY-MM-DD`` text, or a date fact's whole
    days since 1970-01-01) in the customer's locale; ``style`` is short, medium, long, full
    or a CLDR pattern."""
    if isinstance(value, datetime):
        day = value.date()
    elif isinstance(value, date):
        day = value
    elif isinstance(value, int) and not isinstance(value, bool):
        day = _EPOCH + timedelta(days=value)
    elif isinstance(value, str):
        day = date.fromisoformat(value)
    else:
        raise TypeError(f"date expects a date or a date fact, got {value!r}")
    return str(format_date(day, format=style, locale=_current_formats().locale))


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
        self.env.filters["date"] = _date
        self.env.filters["days"] = _days
        self._locales: dict[tuple[str, str], list[str]] = {}

    def path(self, channel: str, name: str, part: str, variant: str | None = None) -> str:
        return f"{channel}/{name}.{variant}.{part}" if variant else f"{channel}/{name}.{part}"

    def locales(self, channel: str, name: str) -> list[str]:
        """The locales of the complete variants of a template (every part there)."""
        key = (channel, name)
        if key not in self._locales:
            folder = self.directory / channel
            found = {
                parts[1]
                for p in (folder.glob(f"{name}.*.*") if folder.is_dir() else ())
                if len(parts := p.name.split(".")) == 3 and LOCALE.match(parts[1])
            }
            self._locales[key] = sorted(
                locale
                for locale in found
                if all(
                    (self.directory / self.path(channel, name, part, locale)).is_file()
                    for part in CHANNEL_FILES[channel]
                )
            )
        return self._locales[key]

    def variant_for(self, channel: str, name: str, locale: str | None) -> str | None:
        """The variant a customer of ``locale`` gets (None: the default)."""
        available = self.locales(channel, name)
        return next((tag for tag in locale_chain(locale) if tag in available), None)

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

    def render_email(
        self, name: str, context: dict[str, Any], variant: str | None = None
    ) -> RenderedEmail:
        # One copy per message: whatever its templates do to the context dies with it.
        context = plain_copy(context)
        subject_path = self.path("email", name, "subject", variant)
        subject = self._render(subject_path, context)
        if "\n" in subject:
            raise TemplateError(subject_path, "the subject must be one line")
        return RenderedEmail(
            subject=subject,
            html=self._render(self.path("email", name, "html", variant), context),
            text=self._render(self.path("email", name, "txt", variant), context),
            variant=variant,
        )

    def render_sms(
        self, name: str, context: dict[str, Any], variant: str | None = None
    ) -> RenderedSms:
        path = self.path("sms", name, "txt", variant)
        return RenderedSms(body=self._render(path, plain_copy(context)), variant=variant)

    def render(
        self,
        channel: str,
        name: str,
        context: dict[str, Any],
        *,
        locale: str | None = None,
        currency: str = DEFAULT_CURRENCY,
        variant: str | None = None,
    ) -> RenderedEmail | RenderedSms:
        """Render the variant of ``locale`` (or ``variant`` itself), money and dates in
        ``locale`` and ``currency``."""
        chosen = variant if variant is not None else self.variant_for(channel, name, locale)
        token = _formats.set(_Formats(babel_locale(locale or chosen), currency))
        try:
            if channel == "email":
                return self.render_email(name, context, chosen)
            return self.render_sms(name, context, chosen)
        finally:
            _formats.reset(token)

    # ------------------------------------------------------------ rules check of variants

    def variant_problems(self) -> list[tuple[str, int, str]]:
        """Every mistake in the locale variants, as (path, line, message): a file name
        whose locale is not written like fr or fr-CA, a variant without its default, an
        email variant without all three parts, and a variant whose variables differ from
        its default's (each at the variant's own path)."""
        problems: list[tuple[str, int, str]] = []
        for path in self._template_files():
            relative = path.relative_to(self.directory).as_posix()
            parts = path.name.split(".")
            if len(parts) != 3:
                if len(parts) > 3:
                    problems.append(
                        (relative, 1, "a template file is <name>.<part> or <name>.<locale>.<part>")
                    )
                continue
            base, locale, part = parts
            if not LOCALE.match(locale):
                problems.append(
                    (
                        relative,
                        1,
                        f"{locale!r} is not a locale: a variant is written like {base}.fr.{part} "
                        f"or {base}.fr-CA.{part} (language, then country)",
                    )
                )
                continue
            default = (path.parent / f"{base}.{part}").relative_to(self.directory).as_posix()
            if not (self.directory / default).is_file():
                problems.append((relative, 1, f"the {locale} variant has no default {default}"))
                continue
            problems.extend(self._missing_parts(path, base, locale))
            problems.extend(self._differences(relative, default, locale))
        return problems

    def _template_files(self) -> Iterator[Path]:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.rglob("*")):
            if path.is_file() and not path.name.startswith(".") and path.suffix[1:] in PARTS:
                yield path

    def _missing_parts(self, path: Path, base: str, locale: str) -> list[tuple[str, int, str]]:
        channel = path.parent.relative_to(self.directory).as_posix()
        if channel not in CHANNEL_FILES or path.suffix[1:] != CHANNEL_FILES[channel][0]:
            return []  # checked once per variant, at its first part
        missing = [
            self.path(channel, base, part, locale)
            for part in CHANNEL_FILES[channel]
            if not (self.directory / self.path(channel, base, part, locale)).is_file()
        ]
        if not missing:
            return []
        relative = path.relative_to(self.directory).as_posix()
        return [
            (
                relative,
                1,
                f"the {locale} variant of {channel}/{base} lacks {', '.join(missing)} "
                f"(a variant has every part: {', '.join(CHANNEL_FILES[channel])})",
            )
        ]

    def _differences(self, variant: str, default: str, locale: str) -> list[tuple[str, int, str]]:
        try:
            theirs, ours = self.variables(default), self.variables(variant)
        except (jinja2.TemplateSyntaxError, jinja2.TemplateNotFound):
            return []  # a syntax error is reported where the template is rendered
        problems = [
            (
                variant,
                line,
                f"the {locale} variant uses {name}, which its default {default} does not",
            )
            for name, line in sorted(ours.items(), key=lambda item: (item[1], item[0]))
            if name not in theirs
        ]
        missing = sorted(name for name in theirs if name not in ours)
        if missing:
            problems.append(
                (
                    variant,
                    1,
                    f"the {locale} variant does not use {', '.join(missing)}, which its default "
                    f"{default} does",
                )
            )
        return problems

    def variables(self, path: str) -> dict[str, int]:
        """The context variables a template uses (``customer.first_name``, ``brand``...),
        each with the line it is first used on: what a translation must keep the same."""
        loader = self.env.loader
        assert loader is not None
        source, _, _ = loader.get_source(self.env, path)
        tree = self.env.parse(source)
        names = meta.find_undeclared_variables(tree)
        found: dict[str, int] = {}
        for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Name)):
            name = _variable(node, names)
            if name is not None and (name not in found or node.lineno < found[name]):
                found[name] = node.lineno
        dotted = {name.split(".", 1)[0] for name in found if "." in name}
        return {name: line for name, line in found.items() if "." in name or name not in dotted}


def _variable(node: nodes.Node, names: set[str]) -> str | None:
    """``customer.first_name`` for ``customer.first_name`` or ``customer["first_name"]``,
    ``brand`` for a bare ``brand``: only for names the context provides."""
    if isinstance(node, nodes.Name):
        return node.name if node.ctx == "load" and node.name in names else None
    target = node.node  # type: ignore[attr-defined]
    if not (isinstance(target, nodes.Name) and target.name in names):
        return None
    if isinstance(node, nodes.Getattr):
        return f"{target.name}.{node.attr}"
    key = node.arg  # type: ignore[attr-defined]
    if isinstance(key, nodes.Const) and isinstance(key.value, str):
        return f"{target.name}.{key.value}"
    return target.name


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

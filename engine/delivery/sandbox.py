"""The template sandbox: Jinja2's ImmutableSandboxedEnvironment with bounded work.

Marketers write the templates, and ``rules check``, ``tick`` and ``serve`` render them in
the engine's own process, so a render must not be able to change shared data, hang or
exhaust the process. On top of Jinja2's immutable sandbox (no ``dict.update``, no
``list.append``, no private attributes) every render gets a ``RenderBudget``:

- ``**`` and ``*`` on numbers may not make an integer longer than ``max_int_bits``;
- ``*`` and ``+`` on text or lists, ``~`` and ``range`` may not make one longer than
  ``max_sequence`` (characters or items), and the text a render builds this way adds up
  to at most ``max_built``; string methods and filters that pad (``center``, ``ljust``,
  ``format`` widths...) take no width above ``max_sequence``;
- every loop iteration and every call (macros, methods, ``range``) costs one operation,
  at most ``max_operations`` per render, so nested loops and recursive macros stop;
- the output of one template is at most ``max_output`` characters;
- and a render that is still running ``deadline_s`` seconds after it started stops at
  its next operation or output.

The time bound is checked in the render's own thread, at each operation and each piece
of output, so nothing is left running after a timeout (no watchdog thread, no signal).
A render that crosses a bound raises ``RenderLimitExceeded`` inside the template, so its
traceback names the template's file and line; ``TemplateStore`` turns it into a
``TemplateError``.
"""

from __future__ import annotations

import re
import string
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2 import nodes, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError


class RenderLimitExceeded(SecurityError):
    """A render crossed one of the bounds of its ``RenderBudget``."""


@dataclass(frozen=True)
class RenderLimits:
    """How much work one render may do (see the module docstring)."""

    max_int_bits: int = 4096
    max_sequence: int = 100_000
    max_built: int = 10_000_000
    max_operations: int = 100_000
    max_output: int = 1_000_000
    deadline_s: float = 2.0


class RenderBudget:
    """What one render has used of its limits."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.operations = 0
        self.built = 0
        self.deadline = time.monotonic() + limits.deadline_s

    def operation(self) -> None:
        self.operations += 1
        if self.operations > self.limits.max_operations:
            raise RenderLimitExceeded(
                f"more than {self.limits.max_operations:,} loop iterations and calls in one render"
            )
        self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderLimitExceeded(f"the render took longer than {self.limits.deadline_s:g} s")

    def sequence(self, length: int, what: str) -> None:
        if length > self.limits.max_sequence:
            raise RenderLimitExceeded(
                f"{what} would be {length:,} long; at most {self.limits.max_sequence:,}"
            )

    def build(self, length: int) -> None:
        self.built += length
        if self.built > self.limits.max_built:
            raise RenderLimitExceeded(
                f"the render built more than {self.limits.max_built:,} characters of text"
            )

    def integer(self, bits: int, what: str) -> None:
        if bits > self.limits.max_int_bits:
            raise RenderLimitExceeded(
                f"{what} would be a {bits:,}-bit number; at most {self.limits.max_int_bits:,} bits"
            )


# The budget of the render running in this thread (or task); set by ``budgeted``.
_CURRENT: ContextVar[RenderBudget | None] = ContextVar("render_budget", default=None)


def current_budget() -> RenderBudget:
    """The budget of the render under way; a hook called outside ``budgeted`` (a template
    rendered without TemplateStore) gets a fresh default budget, so each loop and each
    operation is still bounded on its own."""
    budget = _CURRENT.get()
    return budget if budget is not None else RenderBudget(RenderLimits())


class budgeted:  # noqa: N801 - used as a context manager, like contextlib's
    """``with budgeted(limits) as budget:`` makes ``budget`` the current render's."""

    def __init__(self, limits: RenderLimits) -> None:
        self.budget = RenderBudget(limits)

    def __enter__(self) -> RenderBudget:
        self._token = _CURRENT.set(self.budget)
        return self.budget

    def __exit__(self, *_: object) -> None:
        _CURRENT.reset(self._token)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _length(value: Any) -> int | None:
    return len(value) if isinstance(value, str | list | tuple) else None


# Width and precision in printf-style ("%10.2f") and str.format ("{:>10}") specs.
_PRINTF = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_SPEC = re.compile(r"(\d+)")
# String methods whose integer arguments are widths or counts of the result.
_PADDING_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs"}


def _check_printf(budget: RenderBudget, text: str) -> None:
    for width, precision in _PRINTF.findall(text):
        for number in (width, precision):
            if number == "*":
                raise RenderLimitExceeded("a '*' width in a format string is not allowed")
            if number:
                budget.sequence(int(number), "a formatted field")


def _check_format_string(budget: RenderBudget, text: str) -> None:
    for _, field, spec, _ in string.Formatter().parse(text):
        if field is None or not spec:
            continue
        if "{" in spec:
            raise RenderLimitExceeded("a nested '{...}' width in a format string is not allowed")
        for number in _FORMAT_SPEC.findall(spec):
            budget.sequence(int(number), "a formatted field")


class BoundedCodeGenerator(CodeGenerator):
    """Jinja2's code generator, with every loop and every ``~`` under the render budget.

    ``{% for x in items %}`` compiles as if it were ``for x in environment.bounded_iter(items)``
    (so each iteration costs an operation), and ``a ~ b`` has its result measured.
    """

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        if not getattr(node, "_bounded", False):
            node.iter = nodes.Call(
                nodes.EnvironmentAttribute("bounded_iter", lineno=node.lineno),
                [node.iter],
                [],
                None,
                None,
                lineno=node.lineno,
            )
            node._bounded = True  # type: ignore[attr-defined]
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_text(")
        super().visit_Concat(node, frame)
        self.write(")")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Templates cannot change what they are given, and their work is bounded."""

    code_generator_class = BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.globals["range"] = self.bounded_range
        self.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs: not for messages
        self.filters["center"] = self._center_filter(self.filters["center"])
        self.filters["indent"] = self._indent_filter(self.filters["indent"])
        self.filters["format"] = self._format_filter(self.filters["format"])
        for name in ("batch", "slice"):  # batch(n, fill) pads to n; slice(n) makes n lists
            self.filters[name] = self._count_filter(self.filters[name], name)
        self.filters["replace"] = self._replace_filter(self.filters["replace"])

    # ── hooks the compiled templates call ─────────────────────────────────────────

    def bounded_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        budget = current_budget()
        for item in iterable:
            budget.operation()
            yield item

    def bounded_text(self, text: Any) -> Any:
        budget = current_budget()
        length = len(text)
        budget.sequence(length, "a text joined with '~'")
        budget.build(length)
        return text

    def bounded_range(self, *args: int) -> range:
        budget = current_budget()
        budget.operation()
        numbers = range(*args)
        budget.sequence(len(numbers), "a range")
        return numbers

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = current_budget()
        budget.operation()
        target = getattr(__obj, "__wrapped__", __obj)  # str.format is wrapped by the sandbox
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            name = getattr(target, "__name__", "")
            if name in ("format", "format_map"):
                _check_format_string(budget, owner)
            for value in (*args, *kwargs.values()):
                if _is_int(value) and name in _PADDING_METHODS:
                    budget.sequence(value, f"str.{name}()")
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, str):
            budget.build(len(result))
        return result

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = current_budget()
        if operator == "**" and _is_int(left) and _is_int(right) and right > 0:
            if abs(left) > 1:
                budget.integer(abs(left).bit_length() * right, "a power")
        elif operator == "*":
            self._check_product(budget, left, right)
        elif operator == "+":
            lengths = (_length(left), _length(right))
            if lengths[0] is not None and lengths[1] is not None:
                budget.sequence(lengths[0] + lengths[1], "a text or list joined with '+'")
        elif operator == "%" and isinstance(left, str):
            _check_printf(budget, left)
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, str):
            budget.build(len(result))
        return result

    @staticmethod
    def _check_product(budget: RenderBudget, left: Any, right: Any) -> None:
        if _is_int(left) and _is_int(right):
            budget.integer(abs(left).bit_length() + abs(right).bit_length(), "a product")
            return
        for sequence, count in ((left, right), (right, left)):
            length = _length(sequence)
            if length is not None and _is_int(count):
                budget.sequence(length * max(count, 0), "a repeated text or list")

    # ── filters that can make a huge text from a small one ────────────────────────

    @staticmethod
    def _center_filter(original: Any) -> Any:
        def checked(value: Any, width: Any = 80) -> Any:
            if _is_int(width):
                current_budget().sequence(width, "the width of the center filter")
            return original(value, width)

        return checked

    @staticmethod
    def _indent_filter(original: Any) -> Any:
        def checked(value: Any, width: Any = 4, first: bool = False, blank: bool = False) -> Any:
            text = str(value)
            pad = width if _is_int(width) else len(str(width))
            projected = len(text) + (text.count("\n") + 1) * max(pad, 0)
            current_budget().sequence(projected, "the result of the indent filter")
            return original(value, width, first, blank)

        return checked

    @staticmethod
    def _count_filter(original: Any, name: str) -> Any:
        def checked(value: Any, count: Any, *args: Any) -> Any:
            if _is_int(count):
                current_budget().sequence(count, f"the count of the {name} filter")
            return original(value, count, *args)

        return checked

    @staticmethod
    def _format_filter(original: Any) -> Any:
        def checked(value: Any, *args: Any, **kwargs: Any) -> Any:
            _check_printf(current_budget(), str(value))
            return original(value, *args, **kwargs)

        return checked

    @staticmethod
    def _replace_filter(original: Any) -> Any:
        @pass_eval_context
        def checked(eval_ctx: Any, value: Any, old: Any, new: Any, count: Any = None) -> Any:
            text, old_text, new_text = str(value), str(old), str(new)
            hits = text.count(old_text) if old_text else len(text) + 1
            if _is_int(count):
                hits = min(hits, max(count, 0))
            growth = hits * max(len(new_text) - len(old_text), 0)
            current_budget().sequence(len(text) + growth, "the result of the replace filter")
            return original(eval_ctx, value, old, new, count)

        return checked

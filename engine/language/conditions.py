"""The marketer's condition language: parse, type-check, normalise, evaluate, explain.

A condition is a short expression over named facts, written in the rule files::

    (orders_count >= 5 or total_spend_cents >= $500) and email_opt_in
    locale in ["en-GB", "en-US"] and not sms_opt_in
    event.reason == "late delivery"
    signup_date >= 2026-01-31

Grammar, loosest first: ``or`` < ``and`` < ``not`` < a comparison (``== != < <= > >=``,
``in [...]``, ``not in [...]``) < a fact name, a value, or a parenthesised condition.
Values are whole numbers (``5``, ``-3``, ``10_000``), money (``$500``, ``$49.99``: cents,
only against money facts; a plain number against a money fact means cents), text in
double or single quotes, ``true``/``false``, and dates ``YYYY-MM-DD`` (only against date
facts). There are no decimal numbers. A true/false fact on its own means ``== true``.

How to read "unknown"
---------------------
A fact can be unknown (missing, or ``None``): a customer with no NPS answer has no
``nps_score``. **Any comparison with an unknown fact is unknown, ``not`` of unknown is
unknown, and a condition that ends up unknown does not match.** (``and``/``or`` follow the
usual three-valued rules: ``false and unknown`` is false, ``true or unknown`` is true.) So
for a customer without a score, ``nps_score >= 9`` does not match, and neither does
``not (nps_score >= 9)``; ``nps_score < 9 or orders_count > 3`` matches when the orders do.

Exactly the same thing, said the way the rules engine does it: a condition is normalised
by pushing every ``not`` down to the comparisons (De Morgan; ``not (a >= 9)`` becomes
``a < 9``, ``x not in [1, 2]`` becomes ``x != 1 and x != 2``), and then a comparison whose
fact is unknown is false. durable_rules evaluates that normal form on the encoded facts
(a property that is absent fails every test), and ``evaluate`` below is the pure-Python
reference for it; the two must agree exactly (tests/unit/test_conditions.py checks that).
"""

from __future__ import annotations

import difflib
import json
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from enum import StrEnum
from typing import Any, TypeAlias

from engine.errors import ConditionError, ConditionSyntaxError, FactValueError
from engine.language.catalog import FactCatalog, FactType

__all__ = [
    "AllOf",
    "And",
    "AnyOf",
    "Atom",
    "Comparison",
    "Condition",
    "ConditionProblem",
    "Const",
    "Explanation",
    "Expr",
    "FactRef",
    "LeafResult",
    "Literal",
    "LiteralKind",
    "MAX_GROUPS",
    "MAX_INT",
    "Membership",
    "Node",
    "Not",
    "atoms",
    "Or",
    "canonical_value",
    "check",
    "compile_condition",
    "compile_predicate",
    "durable_key",
    "encode_facts",
    "evaluate",
    "explain",
    "normalize",
    "parse",
    "to_durable",
]

# Integers beyond +-2**53 are refused, in conditions and in facts: that is the range every
# JSON consumer keeps exact, far beyond any count, score, amount in cents or day number.
MAX_INT = 2**53
# durable_rules compiles each rule's and/or groups into one sequence of at most 31 entries
# (two per group; ERR_EXPRESSION_LIMIT_EXCEEDED past that), so a rule has at most 15 groups.
MAX_GROUPS = 15
# An ``in`` list becomes that many alternatives below one node of durable_rules' network,
# whose child table (512 entries) hangs the engine when full; keep lists well short of it.
MAX_LIST_ITEMS = 200
# Parentheses and 'not' nested deeper than this are refused (a marketer never needs more;
# the parser, the checker, the evaluators and durable_rules all walk the tree recursively).
MAX_DEPTH = 32
# durable_rules compares text with a 16-bit length; stay far below it.
MAX_TEXT_LENGTH = 1000
_MAX_FACT_TEXT_ESCAPED = 60_000

_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


# --------------------------------------------------------------------------- syntax tree


class LiteralKind(StrEnum):
    INT = "int"
    MONEY = "money"
    STRING = "string"
    BOOL = "bool"
    DATE = "date"


@dataclass(frozen=True)
class FactRef:
    """A fact named in a condition; ``offset`` is where its name starts."""

    name: str
    offset: int

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Literal:
    """A value as written (``text``) and as compared (``value``: cents, epoch days...)."""

    kind: LiteralKind
    value: bool | int | str
    text: str
    offset: int

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Comparison:
    left: FactRef | Literal
    op: str  # == != < <= > >=
    right: FactRef | Literal
    offset: int  # of the operator

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right}"


@dataclass(frozen=True)
class Membership:
    subject: FactRef | Literal
    items: tuple[Literal, ...]
    negated: bool  # ``not in``
    offset: int  # of ``in`` (or of the ``not`` of ``not in``)

    def __str__(self) -> str:
        listed = ", ".join(item.text for item in self.items)
        return f"{self.subject} {'not in' if self.negated else 'in'} [{listed}]"


@dataclass(frozen=True)
class Not:
    operand: Expr
    offset: int

    def __str__(self) -> str:
        inner = self.operand
        return f"not {inner}" if isinstance(inner, FactRef | Literal | Not) else f"not ({inner})"


@dataclass(frozen=True)
class And:
    operands: tuple[Expr, ...]
    offset: int

    def __str__(self) -> str:
        return " and ".join(f"({o})" if isinstance(o, Or) else str(o) for o in self.operands)


@dataclass(frozen=True)
class Or:
    operands: tuple[Expr, ...]
    offset: int

    def __str__(self) -> str:
        return " or ".join(str(o) for o in self.operands)


Expr: TypeAlias = "FactRef | Literal | Comparison | Membership | Not | And | Or"


# --------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class _Token:
    kind: str  # name keyword op ( ) [ ] , literal end
    text: str
    offset: int
    literal: Literal | None = None
    after_error: bool = False  # right after a character the tokenizer skipped


_KEYWORDS = frozenset({"and", "or", "not", "in", "true", "false"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_DATE = re.compile(r"\d{4}-\d{1,2}-\d{1,2}", re.ASCII)
_INT = re.compile(r"-?\d+(?:_\d+)*", re.ASCII)
_MONEY = re.compile(r"-?\$(\d+(?:_\d+)*)(?:\.(\d+))?", re.ASCII)
_DIGITS = frozenset("0123456789")
_WORDISH = re.compile(r"[A-Za-z0-9_.$-]*")
_OPERATORS = ("==", "!=", "<=", ">=", "<", ">")
_HINTS = {
    "&&": "write 'and' instead of '&&'",
    "&": "write 'and' instead of '&'",
    "||": "write 'or' instead of '||'",
    "|": "write 'or' instead of '|'",
    "<>": "write '!=' for 'is not equal to'",
    "=>": "write '>=' for 'at least'",
    "=<": "write '<=' for 'at most'",
    "=": "write '==' to compare; a single '=' is not an operator",
    "!": "write 'not' instead of '!'",
}
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}


# What a mistyped operator stands for, so that parsing goes on as if it had been written
# right (every later mistake is still found): '&&' is read as 'and', '=' as '=='...
_HINT_MEANS = {
    "&&": ("keyword", "and"),
    "&": ("keyword", "and"),
    "||": ("keyword", "or"),
    "|": ("keyword", "or"),
    "<>": ("op", "!="),
    "=>": ("op", ">="),
    "=<": ("op", "<="),
    "=": ("op", "=="),
    "!": ("keyword", "not"),
}
_THOUSANDS = re.compile(r"(?:,\d{3})+", re.ASCII)


def _tokenize(text: str) -> tuple[list[_Token], list[ConditionError]]:
    """The tokens of ``text`` and every mistake found on the way. A mistake does not stop
    the tokenizer: a mistyped operator stands for the one it resembles, a bad value for a
    value, an unexpected character is skipped; the token after a skipped character is
    marked ``after_error``, so that the parser does not report it as a second mistake."""
    tokens: list[_Token] = []
    errors: list[ConditionError] = []
    i, n = 0, len(text)
    skipped = False  # the previous character was skipped: mark the next token

    def add(token: _Token) -> None:
        nonlocal skipped
        tokens.append(replace(token, after_error=True) if skipped else token)
        skipped = False

    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if ch in "()[],":
            add(_Token(ch, ch, i))
            i += 1
            continue
        two = text[i : i + 2]
        hint = two if two in _HINTS else (ch if ch in _HINTS and two not in _OPERATORS else None)
        if hint is not None:
            errors.append(ConditionError(_HINTS[hint], i, text))
            kind, meant = _HINT_MEANS[hint]
            add(_Token(kind, meant, i))
            i += len(hint)
            continue
        if two in _OPERATORS:
            add(_Token("op", two, i))
            i += 2
            continue
        if ch in "<>":
            add(_Token("op", ch, i))
            i += 1
            continue
        if ch in "\"'":
            try:
                token, i = _string(text, i)
            except ConditionError as exc:
                errors.append(exc)
                close = text.find(ch, exc.offset + 1)
                token = _placeholder(LiteralKind.STRING, "", text[i : close + 1], i)
                i = close + 1 if close != -1 else n
            add(token)
            continue
        if ch == "$" or ch in _DIGITS or (ch == "-" and text[i + 1 : i + 2] in ("$", *_DIGITS)):
            try:
                token, i = _number(text, i)
            except ConditionError as exc:
                errors.append(exc)
                word = _WORDISH.match(text, i).group()  # type: ignore[union-attr]
                end = i + max(len(word), 1)
                thousands = _THOUSANDS.match(text, end)
                end = thousands.end() if thousands else end
                token = _placeholder(LiteralKind.INT, 0, text[i:end], i)
                i = end
            add(token)
            continue
        match = _NAME.match(text, i)
        if match:
            word = match.group()
            end = match.end()
            if text[end : end + 1] == ".":
                errors.append(
                    ConditionError(f"a fact name cannot end with '.': {word + '.'!r}", i, text)
                )
                end += 1
            if word in _KEYWORDS:
                if word in ("true", "false"):
                    literal = Literal(LiteralKind.BOOL, word == "true", word, i)
                    add(_Token("literal", word, i, literal))
                else:
                    add(_Token("keyword", word, i))
            elif word.lower() in _KEYWORDS:
                errors.append(
                    ConditionError(f"write {word.lower()!r} in lower case, not {word!r}", i, text)
                )
                lower = word.lower()
                if lower in ("true", "false"):
                    add(
                        _Token(
                            "literal", lower, i, Literal(LiteralKind.BOOL, lower == "true", word, i)
                        )
                    )
                else:
                    add(_Token("keyword", lower, i))
            else:
                add(_Token("name", word, i))
            i = end
            continue
        errors.append(ConditionError(f"unexpected character {ch!r}", i, text))
        skipped = True
        i += 1
    tokens.append(_Token("end", "", n, after_error=skipped))
    return tokens, errors


def _placeholder(kind: LiteralKind, value: bool | int | str, written: str, offset: int) -> _Token:
    """A value that stands where a malformed one was written, so parsing goes on (its
    mistake is reported; a condition with a mistake is never checked or run)."""
    return _Token("literal", written, offset, Literal(kind, value, written, offset))


def _string(text: str, start: int) -> tuple[_Token, int]:
    quote = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == quote:
            value = "".join(out)
            if len(value) > MAX_TEXT_LENGTH:
                raise ConditionError(
                    f"text of {len(value)} characters is too long (at most {MAX_TEXT_LENGTH})",
                    start,
                    text,
                )
            written = text[start : i + 1]
            return _Token(
                "literal", written, start, Literal(LiteralKind.STRING, value, written, start)
            ), i + 1
        if ch == "\\":
            escaped = text[i + 1 : i + 2]
            if escaped not in _ESCAPES:
                raise ConditionError(
                    f"unknown escape '\\{escaped}' in text: write \\\\, \\\", \\', \\n or \\t",
                    i,
                    text,
                )
            out.append(_ESCAPES[escaped])
            i += 2
            continue
        out.append(ch)
        i += 1
    raise ConditionError(
        f"unterminated text: the {quote} that starts here is never closed", start, text
    )


def _number(text: str, start: int) -> tuple[_Token, int]:
    """A whole number, an amount of money or a date, starting at ``start``."""
    word = _WORDISH.match(text, start).group()  # type: ignore[union-attr]
    date_match = _DATE.match(text, start)
    if date_match and date_match.end() - start == len(word):
        written = date_match.group()
        try:
            day = date.fromisoformat(written)
        except ValueError:
            raise ConditionError(
                f"{written!r} is not a date: write YYYY-MM-DD, like 2026-01-31", start, text
            ) from None
        days = day.toordinal() - _EPOCH_ORDINAL
        return _Token(
            "literal", written, start, Literal(LiteralKind.DATE, days, written, start)
        ), start + len(written)
    if "$" in word[:2]:
        money = _MONEY.match(text, start)
        if not money:
            raise ConditionError(
                f"{word!r} is not an amount of money: write $500 or $49.99", start, text
            )
        written = money.group()
        if re.match(r",\d{3}", text[money.end() :], re.ASCII):
            raise ConditionError(
                "write amounts without thousands separators, like $1000 or $1_000", start, text
            )
        if money.end() - start != len(word):
            raise ConditionError(
                f"{word!r} is not an amount of money: write $500 or $49.99", start, text
            )
        whole, fraction = money.group(1), money.group(2) or ""
        if len(fraction) > 2:
            raise ConditionError(
                f"{written!r} has more than two decimals (money is in cents)", start, text
            )
        cents = int(whole) * 100 + int(fraction.ljust(2, "0") or 0)
        if written.startswith("-"):
            cents = -cents
        _check_range(cents, written, start, text)
        return _Token(
            "literal", written, start, Literal(LiteralKind.MONEY, cents, written, start)
        ), money.end()
    number = _INT.match(text, start)
    assert number is not None  # the caller saw a digit, or '-' and a digit
    written = number.group()
    rest = text[number.end() : number.end() + 2]
    if rest[:1] == "." and rest[1:2] in _DIGITS:
        raise ConditionError(
            f"decimal numbers are not supported ({word!r}): facts are whole numbers, "
            "and money is written like $49.99",
            start,
            text,
        )
    if number.end() - start != len(word):
        raise ConditionError(
            f"{word!r} is not a number: write whole numbers like 5 or 10_000", start, text
        )
    value = int(written)
    _check_range(value, written, start, text)
    return _Token(
        "literal", written, start, Literal(LiteralKind.INT, value, written, start)
    ), number.end()


def _check_range(value: int, written: str, offset: int, text: str) -> None:
    if not -MAX_INT <= value <= MAX_INT:
        raise ConditionError(
            f"{written} is too large: numbers must be within +-2**53", offset, text
        )


# --------------------------------------------------------------------------- parser


class _Abandon(Exception):
    """The parser found a mistake (recorded already) and gives up the operand it was in."""


class _TooDeep(Exception):
    """Nested past MAX_DEPTH: parsing stops at once (recovering would recurse as deep)."""


class _Parser:
    """A recursive-descent parser that reports every syntax mistake, not only the first.

    A mistake abandons the operand it is in (``_Abandon``); the parser skips to the next
    ``and`` or ``or`` at that level, or the ``)`` that closes it, and goes on from there
    (panic-mode recovery), so ``a >= and b == or c`` reports both operands. A token right
    after a character the tokenizer skipped is not reported again.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens, self.errors = _tokenize(text)
        self.i = 0
        self.depth = 0

    def nest(self, token: _Token) -> None:
        """Enter a '(' or a 'not': the parser and every pass over the tree recurse, so a
        condition nested past MAX_DEPTH is refused here instead of by a RecursionError."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"nested too deeply (at most {MAX_DEPTH} levels)", token)
            raise _TooDeep

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def at(self, kind: str, text: str | None = None) -> bool:
        return self.tok.kind == kind and (text is None or self.tok.text == text)

    def fail(self, message: str, token: _Token | None = None) -> _Abandon:
        """Record a mistake at ``token`` (default: the current one); the caller raises the
        ``_Abandon`` returned."""
        token = token or self.tok
        if not token.after_error and all(e.offset != token.offset for e in self.errors):
            self.errors.append(ConditionError(message, token.offset, self.text))
        return _Abandon()

    def found(self, token: _Token | None = None) -> str:
        token = token or self.tok
        return "the end of the condition" if token.kind == "end" else repr(token.text)

    def parse(self) -> Expr:
        """The tree of the whole text; any mistake is in ``self.errors`` afterwards (the
        tree is then only what could be read, and must not be used)."""
        if self.at("end"):
            self.fail("the condition is empty")
            return _NOTHING
        try:
            expr = self.or_()
            while not self.at("end"):
                token = self.tok
                hint = " (write '==' to compare)" if token.text in ("is", "equals") else ""
                self.fail(
                    f"expected 'and', 'or' or the end of the condition, found {self.found()}{hint}"
                )
                self.take()
                self.skip_to_sync(stop_at_close=False)
                if self.at("keyword"):  # 'and' or 'or': read what follows it too
                    self.take()
                    self.or_()
        except _TooDeep:
            return _NOTHING
        return expr

    def skip_to_sync(self, *, stop_at_close: bool = True) -> None:
        """Skip to the next 'and' or 'or' outside any parentheses opened while skipping,
        the ')' that closes the group being read (``stop_at_close``), or the end."""
        opened = 0
        while not self.at("end"):
            token = self.tok
            if token.kind == "(":
                opened += 1
            elif token.kind == ")":
                if opened == 0 and stop_at_close:
                    return
                opened = max(0, opened - 1)
            elif token.kind == "keyword" and token.text in ("and", "or") and opened == 0:
                return
            self.take()

    def operand_of(self, read: Callable[[], Expr]) -> Expr:
        """``read()``, or after a mistake in it, the rest of that operand skipped."""
        try:
            return read()
        except _Abandon:
            self.skip_to_sync()
            return _NOTHING

    def or_(self) -> Expr:
        first = self.operand_of(self.and_)
        operands = [first]
        while self.at("keyword", "or"):
            self.take()
            operands.append(self.operand_of(self.and_))
        return first if len(operands) == 1 else Or(tuple(operands), _start(first))

    def and_(self) -> Expr:
        first = self.operand_of(self.not_)
        operands = [first]
        while self.at("keyword", "and"):
            self.take()
            operands.append(self.operand_of(self.not_))
        return first if len(operands) == 1 else And(tuple(operands), _start(first))

    def not_(self) -> Expr:
        if self.at("keyword", "not"):
            token = self.take()
            if self.at("keyword", "in"):
                raise self.fail(
                    "'not in' needs a fact before it, like: locale not in [\"fr-FR\"]", token
                )
            self.nest(token)
            try:
                inner = self.not_()
            finally:
                self.depth -= 1
            return Not(inner, token.offset)
        return self.comparison()

    def comparison(self) -> Expr:
        if self.at("("):
            opening = self.take()
            self.nest(opening)
            try:
                inner = self.group(opening)
            finally:
                self.depth -= 1
            if (
                self.at("op")
                or self.at("keyword", "in")
                or (self.at("keyword", "not") and self.tokens[self.i + 1].text == "in")
            ):
                raise self.fail(
                    f"{self.tok.text!r} needs a fact or a value on its left, "
                    "not a parenthesised condition"
                )
            return inner
        left = self.operand()
        if self.at("op"):
            op = self.take()
            right = self.operand()
            if self.at("op"):
                raise self.fail(
                    f"comparisons cannot be chained ({self.tok.text!r} after {op.text!r}): "
                    "write e.g. a > 1 and a < 5"
                )
            return Comparison(left, op.text, right, op.offset)
        if self.at("keyword", "in"):
            token = self.take()
            return Membership(left, self.items(), False, token.offset)
        if self.at("keyword", "not") and self.tokens[self.i + 1].text == "in":
            token = self.take()
            self.take()
            return Membership(left, self.items(), True, token.offset)
        return left

    def group(self, opening: _Token) -> Expr:
        """What is inside '(' ... ')', and the ')'. Something else where the ')' should
        be is a mistake; the rest of the group is still read, up to its ')'."""
        inner = self.or_()
        while not self.at(")"):
            expected = f"expected ')' to close the '(' at column {opening.offset + 1}"
            if self.at("end"):
                raise self.fail(f"{expected}, found the end of the condition")
            self.fail(f"{expected}, found {self.found()}")
            self.take()
            self.skip_to_sync()
            if self.at("keyword"):  # 'and' or 'or' inside the group: read on
                self.take()
                self.or_()
        self.take()
        return inner

    def operand(self) -> FactRef | Literal:
        token = self.tok
        if token.kind == "name":
            self.take()
            return FactRef(token.text, token.offset)
        if token.kind == "literal":
            self.take()
            assert token.literal is not None
            return token.literal
        if token.kind == "[":
            raise self.fail("a list can only follow 'in' or 'not in'")
        raise self.fail(f"expected a fact, a value or '(', found {self.found()}")

    def items(self) -> tuple[Literal, ...]:
        if not self.at("["):
            raise self.fail(f"expected '[' to start the list after 'in', found {self.found()}")
        opening = self.take()
        items: list[Literal] = []
        while True:
            token = self.tok
            if token.kind == "]" and items:  # a trailing comma is fine
                break
            if token.kind != "literal":
                what = "a value" if items else "a value (an empty list never matches)"
                if token.kind == "name":
                    raise self.fail(f"a list holds values, not facts: found {token.text!r}")
                raise self.fail(f"expected {what} in the list, found {self.found()}")
            assert token.literal is not None
            items.append(token.literal)
            self.take()
            if self.at(","):
                self.take()
                continue
            if not self.at("]"):
                raise self.fail(f"expected ',' or ']' in the list, found {self.found()}")
        self.take()
        if len(items) > MAX_LIST_ITEMS:
            raise self.fail(
                f"a list of {len(items)} values is too long for the rules engine "
                f"(at most {MAX_LIST_ITEMS})",
                opening,
            )
        return tuple(items)


def _start(expr: Expr) -> int:
    if isinstance(expr, Comparison):
        return _start(expr.left)
    if isinstance(expr, Membership):
        return _start(expr.subject)
    return expr.offset


def parse(text: str) -> Expr:
    """The syntax tree of ``text``; raises ``ConditionSyntaxError`` with every syntax
    mistake (each at its 0-based offset, in order) if it has any."""
    parser = _Parser(text)
    expr = parser.parse()
    if parser.errors:
        raise ConditionSyntaxError(sorted(parser.errors, key=lambda e: e.offset))
    return expr


# Stands for an operand that could not be read (its mistake is reported).
_NOTHING = Literal(LiteralKind.BOOL, True, "true", 0)


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class ConditionProblem:
    """One mistake in a condition; ``offset`` is 0-based within its text."""

    message: str
    offset: int


_TYPE_WORDS = {
    FactType.BOOL: "true or false",
    FactType.INT: "a number",
    FactType.MONEY: "an amount of money",
    FactType.DATE: "a date",
    FactType.STRING: "text",
}
_KIND_WORDS = {
    LiteralKind.BOOL: "true or false",
    LiteralKind.INT: "a number",
    LiteralKind.MONEY: "an amount of money",
    LiteralKind.DATE: "a date",
    LiteralKind.STRING: "text",
}
_ACCEPTS = {
    FactType.BOOL: {LiteralKind.BOOL},
    FactType.INT: {LiteralKind.INT},
    FactType.MONEY: {LiteralKind.MONEY, LiteralKind.INT},  # a plain number means cents
    FactType.DATE: {LiteralKind.DATE},
    FactType.STRING: {LiteralKind.STRING},
}
_ORDERED = frozenset({FactType.INT, FactType.MONEY, FactType.DATE})
_EXAMPLE_COMPARISON = {
    FactType.INT: "{name} > 0",
    FactType.MONEY: "{name} >= $50",
    FactType.DATE: "{name} >= 2026-01-31",
    FactType.STRING: '{name} == "{example}"',
}


class _Checker:
    def __init__(self, catalog: FactCatalog) -> None:
        self.catalog = catalog
        self.problems: list[ConditionProblem] = []

    def report(self, message: str, offset: int) -> None:
        self.problems.append(ConditionProblem(message, offset))

    def fact_type(self, ref: FactRef) -> FactType | None:
        spec = self.catalog.get(ref.name)
        if spec is not None:
            return spec.type
        names = self.catalog.names()
        close = (
            difflib.get_close_matches(ref.name, names, n=1)
            or difflib.get_close_matches(ref.name.lower(), names, n=1)
            or [n for n in names if len(ref.name) >= 3 and n.startswith(ref.name.lower())][:1]
        )
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        self.report(f"unknown fact {ref.name!r}{hint}", ref.offset)
        return None

    def condition(self, expr: Expr) -> None:
        """``expr`` stands where a true/false condition is expected."""
        if isinstance(expr, And | Or):
            for operand in expr.operands:
                self.condition(operand)
        elif isinstance(expr, Not):
            self.condition(expr.operand)
        elif isinstance(expr, Comparison):
            self.comparison(expr)
        elif isinstance(expr, Membership):
            self.membership(expr)
        elif isinstance(expr, FactRef):
            kind = self.fact_type(expr)
            if kind is not None and kind is not FactType.BOOL:
                spec = self.catalog.get(expr.name)
                example = (
                    spec.example if spec is not None and isinstance(spec.example, str) else "..."
                )
                sample = _EXAMPLE_COMPARISON[kind].format(name=expr.name, example=example)
                self.report(
                    f"{expr.name!r} is {_TYPE_WORDS[kind]}; compare it, e.g. {sample}", expr.offset
                )
        elif expr.kind is not LiteralKind.BOOL:
            self.report(
                f"{expr.text} is {_KIND_WORDS[expr.kind]}, not a condition: compare a fact with it",
                expr.offset,
            )

    def comparison(self, expr: Comparison) -> None:
        left, right = expr.left, expr.right
        if isinstance(left, FactRef) and isinstance(right, FactRef):
            self.fact_type(left)
            self.fact_type(right)
            self.report(
                f"compare a fact with a value: {left.name!r} and {right.name!r} are both facts",
                expr.offset,
            )
            return
        if isinstance(left, Literal) and isinstance(right, Literal):
            self.report(
                f"compare a fact with a value: {left.text} and {right.text} are both values",
                expr.offset,
            )
            return
        ref, literal = (left, right) if isinstance(left, FactRef) else (right, left)
        assert isinstance(ref, FactRef) and isinstance(literal, Literal)
        kind = self.fact_type(ref)
        if kind is None:
            return
        if expr.op not in ("==", "!=") and kind not in _ORDERED:
            self.report(
                f"{ref.name!r} is {_TYPE_WORDS[kind]}: only == and != apply to it, not {expr.op}",
                expr.offset,
            )
        self.literal(ref, kind, literal)

    def membership(self, expr: Membership) -> None:
        if not isinstance(expr.subject, FactRef):
            self.report(
                f"{'not in' if expr.negated else 'in'} needs a fact on its left, "
                f"not {expr.subject.text}",
                expr.subject.offset,
            )
            return
        kind = self.fact_type(expr.subject)
        if kind is None:
            return
        for item in expr.items:
            self.literal(expr.subject, kind, item)

    def literal(self, ref: FactRef, kind: FactType, literal: Literal) -> None:
        if literal.kind not in _ACCEPTS[kind]:
            self.report(
                f"{ref.name!r} is {_TYPE_WORDS[kind]} "
                f"but {literal.text} is {_KIND_WORDS[literal.kind]}",
                literal.offset,
            )
        elif (
            ref.name == "event"
            and self.catalog.event_types
            and literal.value not in self.catalog.event_types
        ):
            close = difflib.get_close_matches(
                str(literal.value), sorted(self.catalog.event_types), n=1
            )
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.report(f"unknown event type {literal.value!r}{hint}", literal.offset)


def check(expr: Expr, catalog: FactCatalog) -> list[ConditionProblem]:
    """Every problem with ``expr`` against ``catalog`` (unknown facts, mismatched types...),
    in the order they appear; an empty list means ``compile_condition`` will succeed."""
    checker = _Checker(catalog)
    checker.condition(expr)
    problems = sorted(checker.problems, key=lambda p: p.offset)
    if not problems:
        groups = _count_groups(normalize(expr, _types_of(expr, catalog)))
        if groups > MAX_GROUPS:
            problems.append(
                ConditionProblem(
                    f"the condition is too complex for the rules engine: {groups} and/or groups "
                    f"once negations are pushed down (at most {MAX_GROUPS}); split it",
                    0,
                )
            )
    return problems


# --------------------------------------------------------------------------- normal form


@dataclass(frozen=True)
class Atom:
    """One comparison of the normal form: ``fact op value``, value in the compared domain
    (bool, int for numbers/cents/epoch days, str)."""

    fact: str
    op: str
    value: bool | int | str

    def __str__(self) -> str:
        return f"{self.fact} {self.op} {json.dumps(self.value, ensure_ascii=False)}"


@dataclass(frozen=True)
class AllOf:
    terms: tuple[Node, ...]

    def __str__(self) -> str:
        return " and ".join(f"({t})" if isinstance(t, AnyOf) else str(t) for t in self.terms)


@dataclass(frozen=True)
class AnyOf:
    terms: tuple[Node, ...]

    def __str__(self) -> str:
        return " or ".join(f"({t})" if isinstance(t, AllOf) else str(t) for t in self.terms)


@dataclass(frozen=True)
class Const:
    value: bool

    def __str__(self) -> str:
        return "true" if self.value else "false"


Node: TypeAlias = "Atom | AllOf | AnyOf | Const"

_NEGATED = {"==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">"}
_MIRRORED = {"==": "==", "!=": "!=", "<": ">", ">": "<", "<=": ">=", ">=": "<="}


def normalize(expr: Expr, types: Mapping[str, FactType]) -> Node:
    """The negation normal form of a checked ``expr``: no ``not``, comparisons as
    ``fact op value``, nested groups flattened, duplicates and constants folded away.
    ``Const`` only ever appears as the whole result."""
    return _nnf(expr, False, types)


def _atom(fact: str, op: str, value: bool | int | str, types: Mapping[str, FactType]) -> Atom:
    if types.get(fact) is FactType.BOOL and op == "!=" and isinstance(value, bool):
        return Atom(fact, "==", not value)  # values are only ever true or false
    return Atom(fact, op, value)


def _nnf(expr: Expr, negate: bool, types: Mapping[str, FactType]) -> Node:
    if isinstance(expr, Not):
        return _nnf(expr.operand, not negate, types)
    if isinstance(expr, And | Or):
        conjunction = isinstance(expr, And) != negate
        terms = [_nnf(o, negate, types) for o in expr.operands]
        return _group(AllOf if conjunction else AnyOf, terms)
    if isinstance(expr, FactRef):
        return Atom(expr.name, "==", not negate)
    if isinstance(expr, Literal):
        return Const(bool(expr.value) != negate)
    if isinstance(expr, Comparison):
        if isinstance(expr.left, FactRef):
            assert isinstance(expr.right, Literal)
            fact, op, value = expr.left.name, expr.op, expr.right.value
        else:
            assert isinstance(expr.right, FactRef)
            fact, op, value = expr.right.name, _MIRRORED[expr.op], expr.left.value
        return _atom(fact, _NEGATED[op] if negate else op, value, types)
    assert isinstance(expr.subject, FactRef)
    fact = expr.subject.name
    values = list(dict.fromkeys(item.value for item in expr.items))
    if expr.negated != negate:  # every item differs
        return _group(AllOf, [_atom(fact, "!=", v, types) for v in values])
    return _group(AnyOf, [_atom(fact, "==", v, types) for v in values])


def _group(kind: type[AllOf] | type[AnyOf], terms: Iterable[Node]) -> Node:
    absorbing = kind is AnyOf  # true absorbs an AnyOf, false an AllOf
    flat: dict[Node, None] = {}
    for term in terms:
        if isinstance(term, Const):
            if term.value == absorbing:
                return term
            continue
        for sub in term.terms if isinstance(term, kind) else (term,):
            flat[sub] = None
    if not flat:
        return Const(not absorbing)
    if len(flat) == 1:
        return next(iter(flat))
    return kind(tuple(flat))


def _count_groups(node: Node) -> int:
    if isinstance(node, AllOf | AnyOf):
        return 1 + sum(_count_groups(t) for t in node.terms)
    return 0


def _walk(expr: Expr) -> Iterable[Expr]:
    yield expr
    if isinstance(expr, And | Or):
        for operand in expr.operands:
            yield from _walk(operand)
    elif isinstance(expr, Not):
        yield from _walk(expr.operand)
    elif isinstance(expr, Comparison):
        yield expr.left
        yield expr.right
    elif isinstance(expr, Membership):
        yield expr.subject


def _types_of(expr: Expr, catalog: FactCatalog) -> dict[str, FactType]:
    types: dict[str, FactType] = {}
    for node in _walk(expr):
        if isinstance(node, FactRef):
            spec = catalog.get(node.name)
            if spec is not None:
                types[node.name] = spec.type
    return types


def atoms(node: Node) -> Iterable[Atom]:
    """Every comparison of a normal form."""
    if isinstance(node, Atom):
        yield node
    elif isinstance(node, AllOf | AnyOf):
        for term in node.terms:
            yield from atoms(term)


def _tree_facts(node: Node) -> Iterable[str]:
    if isinstance(node, Atom):
        yield node.fact
    elif isinstance(node, AllOf | AnyOf):
        for term in node.terms:
            yield from _tree_facts(term)


# --------------------------------------------------------------------------- compiled


@dataclass(frozen=True)
class Condition:
    """A checked condition, ready to evaluate.

    ``expr`` is the tree as written (for ``explain``), ``tree`` its normal form (what the
    evaluators run), ``facts`` every fact the text names and ``types`` their types.
    Picklable, hashable, and independent of the catalog once compiled.
    """

    source: str
    expr: Expr
    tree: Node
    facts: frozenset[str]
    types: Mapping[str, FactType] = field(hash=False)

    @property
    def constant(self) -> bool | None:
        """True or False when the condition does not depend on any fact, else None."""
        return self.tree.value if isinstance(self.tree, Const) else None

    @property
    def tested_facts(self) -> frozenset[str]:
        """The facts the normal form still tests (constants fold some away)."""
        return frozenset(_tree_facts(self.tree))

    def __str__(self) -> str:
        return self.source


def compile_condition(text: str, catalog: FactCatalog) -> Condition:
    """Parse, check and normalise ``text``; raises ``ConditionError`` on the first problem.
    (The playbook loader calls ``parse`` and ``check`` itself to report every problem.)"""
    expr = parse(text)
    problems = check(expr, catalog)
    if problems:
        raise ConditionError(problems[0].message, problems[0].offset, text)
    types = _types_of(expr, catalog)
    return Condition(
        source=text,
        expr=expr,
        tree=normalize(expr, types),
        facts=frozenset(types),
        types=types,
    )


# --------------------------------------------------------------------------- fact values


def canonical_value(name: str, value: object, kind: FactType | None) -> bool | int | str | None:
    """A fact's value in the compared domain (bool, int, str) or None when unknown.

    Refuses, naming the fact, what could not compare the same in durable_rules and in
    Python: floats, bools where a number is expected, numbers beyond +-2**53, over-long
    text, anything else. Dates may be given as epoch days or as ``datetime.date``.
    """
    if value is None:
        return None
    # Exact types only: a subclass (an IntEnum, a datetime) would not encode as it compares.
    if isinstance(value, bool):
        if kind is None or kind is FactType.BOOL:
            return value
        raise FactValueError(name, value, f"expected {_TYPE_WORDS[kind]}, not true/false")
    if isinstance(value, int) and type(value) is int:
        if kind is FactType.BOOL or kind is FactType.STRING:
            raise FactValueError(name, value, f"expected {_TYPE_WORDS[kind]}, not a number")
        if not -MAX_INT <= value <= MAX_INT:
            raise FactValueError(name, value, "numbers must be within +-2**53")
        return value
    if isinstance(value, str) and type(value) is str:
        if kind is not None and kind is not FactType.STRING:
            raise FactValueError(name, value, f"expected {_TYPE_WORDS[kind]}, not text")
        too_long = len(value) > _MAX_FACT_TEXT_ESCAPED // 12  # \ud83d\ude00 is 12 for 1
        if too_long and len(json.dumps(value)) > _MAX_FACT_TEXT_ESCAPED:
            raise FactValueError(name, value, "text is too long for the rules engine")
        return value
    if isinstance(value, date) and type(value) is date and kind in (None, FactType.DATE):
        return value.toordinal() - _EPOCH_ORDINAL
    if isinstance(value, float):
        reason = "decimal numbers are not accepted: use whole numbers (money in cents)"
    elif kind is not None:
        reason = f"expected {_TYPE_WORDS[kind]}"
    else:
        reason = "expected true/false, a whole number, a date or text"
    raise FactValueError(name, value, reason)


def _canonical_facts(cond: Condition, facts: Mapping[str, object]) -> dict[str, bool | int | str]:
    values: dict[str, bool | int | str] = {}
    get = facts.get
    for name in cond.facts:
        value = canonical_value(name, get(name), cond.types.get(name))
        if value is not None:
            values[name] = value
    return values


# --------------------------------------------------------------------------- reference


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _holds(node: Node, values: Mapping[str, object]) -> bool:
    if isinstance(node, Atom):
        actual = values.get(node.fact)
        return actual is not None and _COMPARE[node.op](actual, node.value)
    if isinstance(node, AllOf):
        return all(_holds(t, values) for t in node.terms)
    if isinstance(node, AnyOf):
        return any(_holds(t, values) for t in node.terms)
    return node.value


def evaluate(cond: Condition, facts: Mapping[str, object]) -> bool:
    """Does ``cond`` hold for these typed facts? The reference for durable_rules: the
    normal form, with every comparison of an unknown fact false (see the module doc)."""
    if isinstance(cond.tree, Const):
        return cond.tree.value
    return _holds(cond.tree, _canonical_facts(cond, facts))


def compile_predicate(cond: Condition) -> Callable[[Mapping[str, object]], bool]:
    """``evaluate`` as a closure over canonical fact values (already checked), for speed."""
    return _predicate(cond.tree)


def _predicate(node: Node) -> Callable[[Mapping[str, object]], bool]:
    if isinstance(node, Const):
        constant = node.value
        return lambda values: constant
    if isinstance(node, Atom):
        fact, expected, compare = node.fact, node.value, _COMPARE[node.op]

        def test(values: Mapping[str, object]) -> bool:
            actual = values.get(fact)
            return actual is not None and compare(actual, expected)

        return test
    parts = tuple(_predicate(t) for t in node.terms)
    if isinstance(node, AllOf):
        return lambda values: all(p(values) for p in parts)
    return lambda values: any(p(values) for p in parts)


# --------------------------------------------------------------------------- durable


_RESERVED_KEYS = frozenset({"id", "sid"})


def durable_key(name: str) -> str:
    """The property name of fact ``name`` in durable_rules: '.' is a path separator there,
    so ``event.reason`` becomes ``event-reason`` ('-' never occurs in a fact name, which
    keeps the mapping one-to-one); ``id`` and ``sid`` are durable's own, so they get a
    leading '-'."""
    key = name.replace(".", "-")
    return "-" + key if key in _RESERVED_KEYS else key


def _durable_value(value: bool | int | str) -> int | str:
    return int(value) if isinstance(value, bool) else value


def _durable(node: Node) -> dict[str, object]:
    if isinstance(node, Atom):
        key, value = durable_key(node.fact), _durable_value(node.value)
        if node.op == "==":
            return {key: value}
        return {_DURABLE_OPS[node.op]: {key: value}}
    if isinstance(node, AllOf):
        return {"$and": [_durable(t) for t in node.terms]}
    if isinstance(node, AnyOf):
        return {"$or": [_durable(t) for t in node.terms]}
    raise ValueError(f"the constant condition {node} has no durable_rules form")


_DURABLE_OPS = {"!=": "$neq", "<": "$lt", "<=": "$lte", ">": "$gt", ">=": "$gte"}


def to_durable(cond: Condition) -> dict[str, object]:
    """The ``m`` object of a durable_rules rule for ``cond``. Constant conditions have none
    (check ``cond.constant`` first); every test needs its property present, so an encoded
    fact without the property - or durable's own session state - never matches."""
    return _durable(cond.tree)


def encode_facts(
    facts: Mapping[str, object],
    used: Iterable[str],
    types: Mapping[str, FactType] | None = None,
) -> dict[str, int | str]:
    """The ``used`` facts as durable_rules properties: bool -> 0/1, dates -> epoch days,
    ints and text as they are, unknown (None) left out, names made safe (``durable_key``).
    With ``types``, every value must also match its fact's type. Raises ``FactValueError``."""
    out: dict[str, int | str] = {}
    kinds = types or {}
    for name in used:
        value = canonical_value(name, facts.get(name), kinds.get(name))
        if value is not None:
            out[durable_key(name)] = _durable_value(value)
    return out


# --------------------------------------------------------------------------- explain


@dataclass(frozen=True)
class LeafResult:
    """One comparison as written, the fact's actual value (None: unknown), and whether the
    comparison holds (an unknown fact never does)."""

    text: str
    fact: str | None
    actual: object
    passed: bool
    shown: str  # the actual value as a person reads it: $12.50, 2026-01-31, "en-GB", unknown


@dataclass(frozen=True)
class Explanation:
    matched: bool
    leaves: tuple[LeafResult, ...]
    summary: str  # one line: what made it false (or true)


def _show(value: object, kind: FactType | None) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind is FactType.MONEY and isinstance(value, int):
        sign = "-" if value < 0 else ""
        return f"{sign}${abs(value) // 100}.{abs(value) % 100:02d}"
    if kind is FactType.DATE and isinstance(value, int):
        try:
            return (date(1970, 1, 1) + timedelta(days=value)).isoformat()
        except OverflowError:
            return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


class _Explainer:
    """Three-valued evaluation of the tree as written: None is unknown. Matches
    ``evaluate`` exactly (a condition matches only when it is true)."""

    def __init__(self, cond: Condition, values: Mapping[str, object]) -> None:
        self.cond = cond
        self.values = values
        self.results: dict[int, tuple[bool | None, LeafResult | None]] = {}
        self.leaves: list[LeafResult] = []

    def leaf(self, expr: Expr, text: str, fact: str | None, verdict: bool | None) -> bool | None:
        actual = self.values.get(fact) if fact else None
        kind = self.cond.types.get(fact) if fact else None
        result = LeafResult(text, fact, actual, verdict is True, _show(actual, kind))
        self.leaves.append(result)
        self.results[id(expr)] = (verdict, result)
        return verdict

    def value(self, expr: Expr) -> bool | None:
        verdict: bool | None
        if isinstance(expr, And):
            parts = [self.value(o) for o in expr.operands]
            verdict = False if False in parts else (None if None in parts else True)
        elif isinstance(expr, Or):
            parts = [self.value(o) for o in expr.operands]
            verdict = True if True in parts else (None if None in parts else False)
        elif isinstance(expr, Not):
            inner = self.value(expr.operand)
            verdict = None if inner is None else not inner
        elif isinstance(expr, FactRef):
            actual = self.values.get(expr.name)
            return self.leaf(expr, expr.name, expr.name, None if actual is None else bool(actual))
        elif isinstance(expr, Literal):
            return self.leaf(expr, expr.text, None, bool(expr.value))
        else:
            subject = expr.left if isinstance(expr, Comparison) else expr.subject
            ref = subject if isinstance(subject, FactRef) else expr.right  # type: ignore[union-attr]
            assert isinstance(ref, FactRef)
            if self.values.get(ref.name) is None:
                return self.leaf(expr, str(expr), ref.name, None)
            holds = _holds(_nnf(expr, False, self.cond.types), self.values)
            return self.leaf(expr, str(expr), ref.name, holds)
        self.results[id(expr)] = (verdict, None)
        return verdict

    def reasons(self, expr: Expr) -> list[LeafResult]:
        """The leaves that settle ``expr``'s true or false value."""
        verdict, leaf = self.results[id(expr)]
        if leaf is not None:
            return [leaf]
        if isinstance(expr, Not):
            return self.reasons(expr.operand)
        assert isinstance(expr, And | Or)
        found: list[LeafResult] = []
        for operand in expr.operands:
            if self.results[id(operand)][0] == verdict:
                found.extend(self.reasons(operand))
        return found

    def why_not(self, expr: Expr, target: bool) -> list[LeafResult]:
        """The leaves that keep ``expr`` from being ``target`` (it is the other or unknown)."""
        verdict, leaf = self.results[id(expr)]
        if leaf is not None:
            return [leaf]
        if isinstance(expr, Not):
            return self.why_not(expr.operand, not target)
        assert isinstance(expr, And | Or)
        # an "and" is not true by its operands that are not; an "or" is not false likewise;
        # otherwise every operand stands in the way
        every = isinstance(expr, And) != target
        found: list[LeafResult] = []
        for operand in expr.operands:
            if every or self.results[id(operand)][0] is not target:
                found.extend(self.why_not(operand, target))
        return found


def _describe(leaf: LeafResult) -> str:
    if leaf.fact is None:
        return f"the condition says {leaf.text}"
    if leaf.actual is None:
        return f"{leaf.fact} is unknown"
    if leaf.text == leaf.fact:
        return f"{leaf.fact} is {leaf.shown}"
    return f"{leaf.text} is {'true' if leaf.passed else 'false'}: {leaf.fact} is {leaf.shown}"


def explain(cond: Condition, facts: Mapping[str, object]) -> Explanation:
    """Whether ``cond`` holds, every comparison's result, and one line saying what made it
    false (or true), e.g. ``orders_count >= 5 is false: orders_count is 2``."""
    values = _canonical_facts(cond, facts)
    explainer = _Explainer(cond, values)
    verdict = explainer.value(cond.expr)
    matched = verdict is True
    seen: dict[str, None] = {}
    deciding = explainer.reasons(cond.expr) if matched else explainer.why_not(cond.expr, True)
    for leaf in deciding:
        seen[_describe(leaf)] = None
    return Explanation(matched, tuple(explainer.leaves), "; ".join(seen))

"""Counts in words, for every message a person reads: "1 message", "2 messages", "none"."""

from __future__ import annotations

from collections.abc import Iterable


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """``1 message``, ``0 messages``, ``1,200 customers``; ``plural_form`` for irregular
    words (``plural(2, "reply", "replies")``)."""
    word = singular if count == 1 else (plural_form or f"{singular}s")
    return f"{count:,} {word}"


def listing(parts: Iterable[str], empty: str = "none") -> str:
    """The parts joined by commas, or ``empty`` when there are none (never a dangling
    ``, ;``)."""
    joined = ", ".join(part for part in parts if part)
    return joined or empty

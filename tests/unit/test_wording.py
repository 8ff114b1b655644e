"""Counts in words: no "1 messages", no dangling ", ;"."""

from __future__ import annotations

from engine.wording import listing, plural


def test_plural_says_one_thing_or_many() -> None:
    assert plural(1, "message") == "1 message"
    assert plural(0, "message") == "0 messages"
    assert plural(1200, "customer") == "1,200 customers"
    assert plural(2, "try", "tries") == "2 tries"


def test_listing_says_none_rather_than_nothing() -> None:
    assert listing([]) == "none"
    assert listing(["3 site_visit", "", "1 signed_up"]) == "3 site_visit, 1 signed_up"

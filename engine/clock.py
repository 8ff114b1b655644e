"""Time, passed in: every engine function takes ``now`` so a fake clock can drive it."""

from __future__ import annotations

from datetime import UTC, date, datetime


def utcnow() -> datetime:
    """The real current time, aware, in UTC (the engine's convention)."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """Accept an aware or naive datetime; a naive one is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


EPOCH = date(1970, 1, 1)


def epoch_days(day: date) -> int:
    return (day - EPOCH).days


def whole_days_between(earlier: datetime, later: datetime) -> int:
    """Whole days elapsed, never negative (an event stamped slightly in the future counts as 0)."""
    return max(0, (later - earlier).days)

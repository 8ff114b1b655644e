"""Durations have one spelling: a whole number and a unit, ``90m``, ``36h``, ``2d`` or ``1w``."""

from __future__ import annotations

import re
from datetime import timedelta

from engine.errors import DurationError

_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_PATTERN = re.compile(r"^(\d+)([mhdw])$")


def parse_duration(text: object) -> timedelta:
    match = _PATTERN.match(str(text).strip()) if isinstance(text, str | int) else None
    if match is None:
        raise DurationError(str(text))
    amount, unit = int(match.group(1)), match.group(2)
    try:
        return timedelta(**{_UNITS[unit]: amount})
    except OverflowError:  # more than timedelta holds (999,999,999 days)
        raise DurationError(str(text)) from None


def format_duration(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    for unit, size in (("w", 7 * 24 * 60), ("d", 24 * 60), ("h", 60)):
        if minutes and minutes % size == 0:
            return f"{minutes // size}{unit}"
    return f"{minutes}m"

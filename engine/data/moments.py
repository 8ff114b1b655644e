"""Moments in raw SQL: how a statement that bypasses SQLAlchemy's types passes and reads
datetimes (the batch paths do, for speed).

SQLite stores SQLAlchemy's UTCDateTime as text ("2026-03-02 09:00:00.000000", UTC), which
compares correctly as text; PostgreSQL has a real timestamp type, which psycopg handles.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session

from engine.data.bulk import sqlite_datetime


def read_moment(value: Any) -> datetime | None:
    """A moment as a raw statement returns it, as an aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def moment_parameter(dialect: str, moment: datetime | None) -> Any:
    """A moment as a raw statement of ``dialect`` must pass it to compare with a column."""
    if moment is None:
        return None
    return sqlite_datetime(moment) if dialect == "sqlite" else moment


def session_moment(session: Session, moment: datetime) -> Any:
    """``moment_parameter`` for the session's database."""
    return moment_parameter(session.get_bind().dialect.name, moment)

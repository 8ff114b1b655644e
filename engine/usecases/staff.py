"""Staff sessions and sign-in attempts, kept in the database so every serve process and
the CLI see the same ones.

Sessions: the console's cookie carries a random token (signed, with the CSRF token);
the database keeps its SHA-256 with the staff name, the fingerprint of their password
hash at sign-in, and when it expires or was revoked. Checking a request is one lookup by
primary key. Sign-out revokes that one session; ``lifecycle staff revoke NAME`` revokes
all of a member's sessions; a changed password (a new hash in LIFECYCLE_STAFF_PASSWORDS)
no longer matches the fingerprint, which ends them all too.

Sign-in attempts: each attempt that reaches the password check is one row per key
("account:<name>", "address:<ip>"); a key with ``limit`` of them within the last ``window``
is refused until the oldest leaves the window (a moving window). Why the database and not an in-process limiter (the
``limits`` package's memory storage): every serve process shares it, and it needs no
other service (Redis) for a one-machine deployment.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, insert, select, update
from sqlmodel import col

from engine.data.models import SignInAttempt, StaffSession
from engine.data.uow import reading, unit_of_work

# last_seen_at is moved at most this often: a page view is a read, not a write.
TOUCH_EVERY = timedelta(minutes=5)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(
    db: Engine, staff: str, fingerprint: str, client: str, now: datetime, lifetime: timedelta
) -> str:
    """Record a new session; returns the token for the cookie (never stored as such)."""
    token = secrets.token_urlsafe(32)
    with unit_of_work(db) as session:
        session.add(
            StaffSession(
                id=token_digest(token),
                staff=staff,
                fingerprint=fingerprint,
                client=client[:64],
                created_at=now,
                last_seen_at=now,
                expires_at=now + lifetime,
            )
        )
    return token


@dataclass(frozen=True)
class LiveSession:
    """A session that is neither revoked nor expired (the fingerprint is the caller's)."""

    staff: str
    fingerprint: str


def live_session(db: Engine, token: str, now: datetime) -> LiveSession | None:
    """The session of ``token`` if it is neither revoked nor expired: one indexed lookup."""
    key = token_digest(token)
    with reading(db) as session:
        row = session.get(StaffSession, key)
        if row is None or row.revoked_at is not None or row.expires_at <= now:
            return None
        found = LiveSession(row.staff, row.fingerprint)
        stale = row.last_seen_at + TOUCH_EVERY <= now
    if stale:
        with unit_of_work(db) as session:
            session.execute(
                update(StaffSession).where(col(StaffSession.id) == key).values(last_seen_at=now)
            )
    return found


def end_session(db: Engine, token: str, now: datetime) -> None:
    """Sign-out: this session only."""
    with unit_of_work(db) as session:
        session.execute(
            update(StaffSession)
            .where(
                col(StaffSession.id) == token_digest(token), col(StaffSession.revoked_at).is_(None)
            )
            .values(revoked_at=now)
        )


def revoke_staff(db: Engine, staff: str, now: datetime) -> int:
    """End every live session of ``staff``; returns how many there were."""
    with unit_of_work(db) as session:
        result = session.execute(
            update(StaffSession)
            .where(
                col(StaffSession.staff) == staff,
                col(StaffSession.revoked_at).is_(None),
                col(StaffSession.expires_at) > now,
            )
            .values(revoked_at=now)
        )
    return int(getattr(result, "rowcount", 0) or 0)


def live_sessions(db: Engine, now: datetime, staff: str | None = None) -> list[StaffSession]:
    """Sessions neither revoked nor expired, newest first."""
    statement = select(StaffSession).where(
        col(StaffSession.revoked_at).is_(None), col(StaffSession.expires_at) > now
    )
    if staff is not None:
        statement = statement.where(col(StaffSession.staff) == staff)
    with reading(db) as session:
        return list(session.scalars(statement.order_by(col(StaffSession.created_at).desc())))


# ── sign-in attempts ────────────────────────────────────────────────────────────────


def attempt_keys(name: str, address: str) -> list[str]:
    return [f"account:{name.strip().casefold()[:150]}", f"address:{address[:150]}"]


@dataclass(frozen=True)
class Attempt:
    """A sign-in attempt that was counted. ``waits`` holds, for each key over its limit,
    the seconds until it allows another attempt; empty, the attempt may go on to the
    password check."""

    ids: tuple[int, ...]
    waits: dict[str, int]

    @property
    def wait(self) -> int | None:
        return max(self.waits.values()) if self.waits else None


def begin_attempt(
    db: Engine, keys: list[str], now: datetime, limit: int, window: timedelta
) -> Attempt:
    """Count an attempt before its password is checked.

    The attempt is written first and counted after, so concurrent attempts see each
    other: however many arrive at once, at most ``limit`` per key and window get to the
    (slow) password check. A refused attempt is taken back, so that a flood does not
    push the window on; a failed one stays; a successful one is cleared (attempt_succeeded).
    """
    with unit_of_work(db) as session:
        table = SignInAttempt.__table__  # type: ignore[attr-defined]
        ids: tuple[int, ...] = tuple(
            session.scalars(
                insert(table).returning(table.c.id), [{"key": key, "at": now} for key in keys]
            )
        )
    statement = (
        select(col(SignInAttempt.key), col(SignInAttempt.at))
        .where(col(SignInAttempt.key).in_(keys), col(SignInAttempt.at) > now - window)
        .where(col(SignInAttempt.id).not_in(ids))
    )
    earlier: dict[str, list[datetime]] = {key: [] for key in keys}
    with reading(db) as session:
        for key, at in session.execute(statement):
            earlier[key].append(at)
    waits = {
        key: _wait(sorted(times), limit, window, now)
        for key, times in earlier.items()
        if len(times) >= limit
    }
    if not waits:
        return Attempt(ids, {})
    with unit_of_work(db) as session:
        session.execute(delete(SignInAttempt).where(col(SignInAttempt.id).in_(ids)))
    return Attempt((), waits)


class LockedKeys:
    """What this process already knows is refused, and until when: repeated attempts on a
    locked key are answered without a database round trip (the database stays the judge
    of everything else; a key locked by another process is learnt on its next attempt)."""

    def __init__(self, most: int = 10_000) -> None:
        self._until: dict[str, datetime] = {}
        self._most = most

    def wait(self, keys: list[str], now: datetime) -> int | None:
        waits = [
            math.ceil((until - now).total_seconds())
            for key in keys
            if (until := self._until.get(key)) is not None and until > now
        ]
        return max(waits) if waits else None

    def lock(self, waits: dict[str, int], now: datetime) -> None:
        if len(self._until) >= self._most:  # forget the expired, then the oldest
            self._until = {k: u for k, u in self._until.items() if u > now}
            while len(self._until) >= self._most:
                self._until.pop(next(iter(self._until)))
        for key, seconds in waits.items():
            self._until[key] = now + timedelta(seconds=seconds)


def _wait(times: list[datetime], limit: int, window: timedelta, now: datetime) -> int:
    """Seconds until fewer than ``limit`` of ``times`` are inside the window."""
    leaving = times[len(times) - limit]
    return max(1, math.ceil((leaving + window - now).total_seconds()))


def attempt_succeeded(db: Engine, attempt: Attempt, account_key: str) -> None:
    """A successful sign-in is no failure, and forgets the account's failures (not the
    address's: one good password must not wipe a flood from that address)."""
    with unit_of_work(db) as session:
        session.execute(
            delete(SignInAttempt).where(
                (col(SignInAttempt.key) == account_key) | col(SignInAttempt.id).in_(attempt.ids)
            )
        )

"""The outbox's writes: claim, lease, attempt, record, recover and settle, set-based.

Every statement here moves many rows at once (``UPDATE ... WHERE id IN (...) AND guard
RETURNING id``, a value that differs per row as ``CASE id WHEN ... END``; the recipients
of a batch as one executemany), each a cached statement, each guarded by the state it
expects:

- a claim takes ``queued`` rows that are due and gives them a fresh ``claim_token`` and
  a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two dispatchers never take the
  same row; SQLite has one writer at a time);
- every later write of the dispatcher holds ``status = 'sending' AND claim_token = ?``:
  a dispatcher whose lease ran out and whose rows were taken over changes nothing;
- when a webhook got there first (the row is already sent, delivered, bounced or
  failed), the dispatcher's record never moves it back: it only fills in the provider's
  id if the row lacks one, and only while the row still carries the dispatcher's token
  (no other dispatcher has sent it since);
- settlement moves only rows that are still ``ambiguous``.

``RETURNING id`` tells which rows a statement moved, so the caller knows exactly which
messages are still its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    String,
    Table,
    bindparam,
    case,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.types import TypeEngine
from sqlmodel import Session
from sqlmodel.sql.sqltypes import UTCDateTime

from engine.data.models import Decision, Message, MessageStatus, Suppression
from engine.delivery.lease import LeaseClock

# Statuses only a provider's webhook (or settlement) gives a row that was being sent.
MOVED_ON = (
    MessageStatus.SENT,
    MessageStatus.DELIVERED,
    MessageStatus.BOUNCED,
    MessageStatus.FAILED,
)
ROWS_PER_STATEMENT = 500  # far below SQLite's 32,766 bound parameters
# Core tables: these statements skip the ORM's bulk-update machinery (a tenth of their cost).
MESSAGES: Table = Message.__table__  # type: ignore[attr-defined]
DECISIONS: Table = Decision.__table__  # type: ignore[attr-defined]
M = MESSAGES.c


# ── what a batch decided, per message ───────────────────────────────────────────────


@dataclass(frozen=True)
class Accepted:
    """The provider took the message and gave it ``provider_id``."""

    message: Message
    provider: str
    provider_id: str


@dataclass(frozen=True)
class Retry:
    """A transient failure: back to ``queued``, due again at ``due_at``."""

    message: Message
    due_at: datetime
    reason: str


@dataclass(frozen=True)
class AddressSuppression:
    """An address that must get nothing more, and who said so."""

    channel: str
    address: str
    reason: str
    source: str


@dataclass(frozen=True)
class Finished:
    """The message ends unsent: ``failed`` or ``cancelled``, with the reason."""

    message: Message
    status: MessageStatus
    reason: str
    suppress: AddressSuppression | None = None


@dataclass(frozen=True)
class Deferred:
    """Held back (not an attempt at the provider): queued again until ``until``."""

    message: Message
    until: datetime
    reason: str


Outcome = Accepted | Retry | Finished | Deferred


@dataclass(frozen=True)
class Claim:
    """The rows one claim took, and the token every later write is guarded by."""

    token: str
    ids: list[str]


@dataclass
class Recorded:
    """Which messages a record moved (``applied``), and which accepted ones a webhook had
    already moved on (``late``: only their provider id was filled in)."""

    applied: set[str] = field(default_factory=set)
    late: set[str] = field(default_factory=set)


# ── the statements ──────────────────────────────────────────────────────────────────


def _held(token: str) -> list[ColumnElement[bool]]:
    return [M.status == MessageStatus.SENDING, M.claim_token == token]


def _moved(session: Session, statement: Any) -> set[str]:
    return set(session.scalars(statement.returning(M.id)))


def _update_rows(
    session: Session,
    rows: Sequence[tuple[str, tuple[Any, ...]]],
    types: tuple[TypeEngine[Any], ...],
    guard: Sequence[ColumnElement[bool]],
    assign: Callable[..., dict[str, Any]],
) -> set[str]:
    """``UPDATE messages SET assign(*values) WHERE id IN (...) AND guard RETURNING id`` for
    rows that each carry their own values (of ``types``); the ids it moved.

    One statement for all the rows (up to ``ROWS_PER_STATEMENT``): a value the rows share
    is bound once, one that differs is ``CASE id WHEN ... THEN ... END``. The statement is
    cached per number of rows; a ``VALUES`` list would say the same, but SQLAlchemy
    cannot cache it, and compiling it for every group of writes cost more than the writes.
    """
    moved: set[str] = set()
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[start : start + ROWS_PER_STATEMENT]
        ids = [message_id for message_id, _ in chunk]
        exprs: list[Any] = []
        for position, type_ in enumerate(types):
            each = [values[position] for _, values in chunk]
            if all(value == each[0] for value in each):
                exprs.append(literal(each[0], type_))
            else:
                whens = {i: literal(v, type_) for i, v in zip(ids, each, strict=True)}
                exprs.append(case(whens, value=M.id))
        statement = update(MESSAGES).where(M.id.in_(ids), *guard).values(**assign(*exprs))
        moved |= _moved(session, statement)
    return moved


def claim(
    session: Session,
    clock: LeaseClock,
    worker: str,
    now: datetime,
    size: int,
    lease: timedelta,
    postgres: bool,
) -> Claim:
    """Take up to ``size`` due queued rows, most urgent first, under a fresh token."""
    token = uuid.uuid4().hex
    due = (
        select(M.id)
        .where(M.status == MessageStatus.QUEUED, M.due_at <= now)
        .order_by(M.priority, M.due_at)
        .limit(size)
    )
    if postgres:
        due = due.with_for_update(skip_locked=True)
    # A CTE, materialized: PostgreSQL runs it exactly once. As "id IN (subquery)" the
    # planner may rescan the subquery per row (a nested-loop semi join), and each rescan
    # of LIMIT ... FOR UPDATE SKIP LOCKED yields more rows: the claim took everything due.
    chosen = due.cte("due")
    if postgres:
        chosen = chosen.prefix_with("MATERIALIZED")
    statement = (
        update(MESSAGES)
        .add_cte(chosen)
        .where(
            M.id == chosen.c["id"],
            M.status == MessageStatus.QUEUED,
        )
        .values(
            status=MessageStatus.SENDING,
            claimed_by=worker,
            claimed_at=now,
            claim_token=token,
            lease_expires_at=clock.after(lease),
            attempted_at=None,
            settle_after=None,
            attempts=M.attempts + 1,
            updated_at=now,
        )
    )
    return Claim(token, sorted(_moved(session, statement)))


def renew(session: Session, clock: LeaseClock, token: str, lease: timedelta) -> int:
    """Extend the lease of every row the claim still holds; how many it holds."""
    statement = update(MESSAGES).where(*_held(token)).values(lease_expires_at=clock.after(lease))
    return len(_moved(session, statement))


def recover(
    session: Session, clock: LeaseClock, now: datetime, grace: timedelta
) -> tuple[int, int]:
    """The recovery rule for rows whose lease ran out: (requeued, marked ambiguous)."""
    expired = [
        M.status == MessageStatus.SENDING,
        (M.lease_expires_at < clock.now()) | M.lease_expires_at.is_(None),
    ]
    released = dict(claim_token=None, lease_expires_at=None, updated_at=now)
    requeued = _moved(
        session,
        update(MESSAGES)
        .where(*expired, M.attempted_at.is_(None))
        .values(
            status=MessageStatus.QUEUED,
            claimed_by=None,
            last_error="requeued: its dispatcher stopped before calling the provider",
            **released,
        ),
    )
    ambiguous = _moved(
        session,
        update(MESSAGES)
        .where(*expired, M.attempted_at.is_not(None))
        .values(
            status=MessageStatus.AMBIGUOUS,
            settle_after=clock.after(grace),
            last_error="ambiguous: its dispatcher stopped during the provider call; "
            "not resent unless the provider shows it never arrived",
            **released,
        ),
    )
    return len(requeued), len(ambiguous)


def prepare(session: Session, token: str, rows: Sequence[Mapping[str, Any]]) -> set[str]:
    """Store each message's recipient and body digest (``id``, ``to_address``,
    ``body_digest``) before any provider call (one executemany); the ids the claim still
    holds (one select)."""
    if not rows:
        return set()
    session.execute(
        update(MESSAGES)
        .where(
            M.id == bindparam("b_id"),
            M.status == MessageStatus.SENDING,
            M.claim_token == token,
        )
        .values(to_address=bindparam("b_to"), body_digest=bindparam("b_digest")),
        [{"b_id": r["id"], "b_to": r["to_address"], "b_digest": r["body_digest"]} for r in rows],
    )
    held: set[str] = set()
    ids = [r["id"] for r in rows]
    for start in range(0, len(ids), ROWS_PER_STATEMENT):
        chunk = ids[start : start + ROWS_PER_STATEMENT]
        held |= set(session.scalars(select(M.id).where(M.id.in_(chunk), *_held(token))))
    return held


def mark_attempted(
    session: Session, clock: LeaseClock, token: str, ids: Sequence[str], now: datetime
) -> set[str]:
    """Stamp ``attempted_at`` just before these messages' provider call; the ids that
    are still the claim's (only those may be sent)."""
    if not ids:
        return set()
    statement = (
        update(MESSAGES)
        .where(M.id.in_(list(ids)), *_held(token))
        .values(attempted_at=clock.now(), updated_at=now)
    )
    return _moved(session, statement)


def record(
    session: Session, token: str, outcomes: Sequence[Outcome], now: datetime, rules_version: str
) -> Recorded:
    """Record what happened to each message of the claim, guarded (see the module)."""
    result = Recorded()
    decisions: list[dict[str, Any] | None] = []
    accepted = [o for o in outcomes if isinstance(o, Accepted)]
    if accepted:
        _record_accepted(session, token, accepted, now, rules_version, result, decisions)
    retries = [(o.message, o.due_at, o.reason) for o in outcomes if isinstance(o, Retry)]
    result.applied |= _requeue(session, token, retries, now, attempted=True)
    for status in (MessageStatus.FAILED, MessageStatus.CANCELLED):
        finished = [o for o in outcomes if isinstance(o, Finished) and o.status == status]
        moved = _update_rows(
            session,
            [(o.message.id, (o.reason[:1000],)) for o in finished],
            (String(),),
            _held(token),
            _finishing(status, now),
        )
        result.applied |= moved
        for ended in (o for o in finished if o.message.id in moved):
            decisions.append(decision(ended.message, str(status), ended.reason, now, rules_version))
            if ended.suppress is not None:
                s = ended.suppress
                suppress(session, s.channel, s.address, s.reason, s.source, now)
    deferred = [o for o in outcomes if isinstance(o, Deferred)]
    held_back = [(o.message, o.until, o.reason) for o in deferred]
    moved = _requeue(session, token, held_back, now, attempted=False)
    result.applied |= moved
    for held in (o for o in deferred if o.message.id in moved):
        # A decision when the reason changes, not on every recheck of the same hold.
        if held.message.last_error != held.reason:
            decisions.append(
                decision(
                    held.message, "deferred", held.reason, now, rules_version, until=held.until
                )
            )
    insert_decisions(session, decisions)
    return result


def _requeue(
    session: Session,
    token: str,
    rows: Sequence[tuple[Message, datetime, str]],
    now: datetime,
    *,
    attempted: bool,
) -> set[str]:
    """Back to ``queued``, each row due again at its time with its reason. A row that was
    held back (``attempted=False``) gives back the attempt its claim counted."""
    counted: dict[str, Any] = {}
    if not attempted:
        counted["attempts"] = case((M.attempts > 0, M.attempts - 1), else_=0)
    return _update_rows(
        session,
        [(m.id, (due, why[:1000])) for m, due, why in rows],
        (UTCDateTime(), String()),
        _held(token),
        lambda due, why: {
            "status": MessageStatus.QUEUED,
            "due_at": due,
            "last_error": why,
            "attempted_at": None,
            **counted,
            **_released(now),
        },
    )


def _finishing(status: MessageStatus, now: datetime) -> Callable[[str], dict[str, Any]]:
    def assign(reason: str) -> dict[str, Any]:
        return {"status": status, "last_error": reason, "lease_expires_at": None, "updated_at": now}

    return assign


def _released(now: datetime) -> dict[str, Any]:
    return {"claimed_by": None, "claim_token": None, "lease_expires_at": None, "updated_at": now}


def _record_accepted(
    session: Session,
    token: str,
    accepted: Sequence[Accepted],
    now: datetime,
    rules_version: str,
    result: Recorded,
    decisions: list[dict[str, Any] | None],
) -> None:
    rows = [(o.message.id, (o.provider, o.provider_id)) for o in accepted]
    sent = _update_rows(
        session,
        rows,
        (String(), String()),
        _held(token),
        lambda provider, provider_id: {
            "status": MessageStatus.SENT,
            "provider": provider,
            "provider_id": provider_id,
            "sent_at": now,
            "last_error": None,
            "lease_expires_at": None,
            "updated_at": now,
        },
    )
    # A webhook that arrived first wins; only a missing provider id is filled in.
    late = _update_rows(
        session,
        [row for row in rows if row[0] not in sent],
        (String(), String()),
        [M.claim_token == token, M.status.in_(MOVED_ON)],
        lambda provider, provider_id: {
            "provider": func.coalesce(M.provider, provider),
            "provider_id": func.coalesce(M.provider_id, provider_id),
            "sent_at": func.coalesce(M.sent_at, now),
            "lease_expires_at": None,
        },
    )
    result.applied |= sent
    result.late |= late
    for o in accepted:
        if o.message.id in sent or o.message.id in late:
            why = f"{o.provider} id {o.provider_id}"
            decisions.append(decision(o.message, "sent", why, now, rules_version))


# ── settlement ──────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Found:
    """Settlement found the message at its provider."""

    message: Message
    provider: str
    provider_id: str
    status: MessageStatus  # sent, delivered or failed
    note: str


def settle_found(
    session: Session, found: Sequence[Found], now: datetime, rules_version: str
) -> set[str]:
    """Ambiguous rows the provider has: sent (or what the provider says became of it)."""
    moved = _update_rows(
        session,
        [(f.message.id, (f.status, f.provider, f.provider_id, f.note[:1000])) for f in found],
        (String(), String(), String(), String()),
        [M.status == MessageStatus.AMBIGUOUS],
        lambda status, provider, provider_id, note: {
            "status": status,
            "provider": provider,
            "provider_id": provider_id,
            "last_error": note,
            "sent_at": func.coalesce(M.sent_at, now),
            "settle_after": None,
            "updated_at": now,
        },
    )
    insert_decisions(
        session,
        [
            decision(
                f.message,
                "failed" if f.status == MessageStatus.FAILED else "sent",
                f.note,
                now,
                rules_version,
            )
            for f in found
            if f.message.id in moved
        ],
    )
    return moved


def settle_missing(session: Session, ids: Sequence[str], now: datetime, note: str) -> set[str]:
    """Ambiguous rows the provider provably never received: queued to be sent again."""
    if not ids:
        return set()
    statement = (
        update(MESSAGES)
        .where(M.id.in_(list(ids)), M.status == MessageStatus.AMBIGUOUS)
        .values(
            status=MessageStatus.QUEUED,
            due_at=now,
            attempted_at=None,
            settle_after=None,
            last_error=note[:1000],
            **_released(now),
        )
    )
    return _moved(session, statement)


def settle_later(
    session: Session,
    clock: LeaseClock,
    notes: Mapping[str, str],
    retry: timedelta,
    now: datetime,
) -> set[str]:
    """Ambiguous rows the provider could not tell about now: asked again after ``retry``."""
    return _update_rows(
        session,
        [(message_id, (note[:1000],)) for message_id, note in notes.items()],
        (String(),),
        [M.status == MessageStatus.AMBIGUOUS],
        lambda note: {"last_error": note, "settle_after": clock.after(retry)},
    )


# ── decisions and suppressions ──────────────────────────────────────────────────────


def decision(
    message: Message,
    outcome: str,
    reason: str,
    now: datetime,
    rules_version: str,
    until: datetime | None = None,
) -> dict[str, Any] | None:
    """The decision row about a message (None: staff notifications have none)."""
    if message.kind == "staff" or not message.customer_id:
        return None
    return {
        "at": now,
        "customer_id": message.customer_id,
        "playbook": message.playbook or "",
        "step_id": message.step_id,
        "outcome": outcome,
        "reason": reason[:500],
        "until": until,
        "enrollment_id": message.enrollment_id,
        "message_id": message.id,
        "rules_version": rules_version,
        "facts": {},
    }


def insert_decisions(session: Session, rows: Iterable[Mapping[str, Any] | None]) -> None:
    """Every decision row in one executemany."""
    wanted = [row for row in rows if row is not None]
    if wanted:
        session.execute(insert(DECISIONS), wanted)


def suppress(
    session: Session, channel: str, address: str, reason: str, source: str, now: datetime
) -> bool:
    """Record that an address must get nothing more; True if it was new."""
    if not address:
        return False
    nested = session.begin_nested()
    try:
        session.add(
            Suppression(
                channel=channel,
                address=address,
                reason=reason[:200],
                source=source[:100],
                created_at=now,
            )
        )
        session.flush()
        nested.commit()
        return True
    except IntegrityError:
        nested.rollback()
        return False

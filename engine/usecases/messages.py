"""The outbox as people see it: listing messages and retrying the ones that stopped.

Shared by ``lifecycle messages`` and the console's messages page. Messages are named by
id or by any unique prefix of it (the list shows the first ``SHOWN_ID`` characters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, func, literal, or_, select, update
from sqlmodel import Session, col

from engine.data.models import Message, MessageStatus
from engine.errors import AmbiguousPrefix, IllegalTransition, InvalidChoice, NotFound

RETRYABLE = (MessageStatus.AMBIGUOUS, MessageStatus.FAILED)
SHOWN_ID = 8  # how many characters of an id the list shows; retry takes them


def parse_status(status: str) -> MessageStatus:
    """A message status by name; ``InvalidChoice`` lists the names."""
    try:
        return MessageStatus(status)
    except ValueError as exc:
        raise InvalidChoice("message status", status, [s.value for s in MessageStatus]) from exc


def parse_retryable(status: str) -> MessageStatus:
    """A status whose messages can be retried (ambiguous or failed)."""
    wanted = parse_status(status)
    if wanted not in RETRYABLE:
        raise InvalidChoice("status to retry", status, [s.value for s in RETRYABLE])
    return wanted


def since_attempt() -> ColumnElement[datetime]:
    """How old a message is, for ``older_than``: since its last provider call (an
    ambiguous message always has one), else since it last changed."""
    return func.coalesce(col(Message.attempted_at), col(Message.updated_at))


def find_messages(
    session: Session,
    *,
    status: MessageStatus | None = None,
    customer: str | None = None,
    older_than: datetime | None = None,
    limit: int = 50,
) -> list[Message]:
    """Messages, newest first; ``older_than``: attempted (or changed) before it."""
    statement = select(Message).order_by(col(Message.created_at).desc()).limit(limit)
    if status is not None:
        statement = statement.where(col(Message.status) == status)
    if customer:
        statement = statement.where(col(Message.customer_id) == customer)
    if older_than is not None:
        statement = statement.where(since_attempt() <= older_than)
    return list(session.scalars(statement))


@dataclass(frozen=True)
class Retried:
    """What became of one id a person asked to retry: queued, or refused and why."""

    asked: str
    message_id: str | None
    refusal: str | None = None

    @property
    def queued(self) -> bool:
        return self.refusal is None


def resolve_ids(session: Session, asked: Sequence[str]) -> dict[str, str | Exception]:
    """Each id or unique id prefix → the message id, or the error naming the problem
    (``NotFound``, ``AmbiguousPrefix``); one query for all of them."""
    wanted = [a.strip() for a in asked if a.strip()]
    if not wanted:
        return {}
    statement = select(col(Message.id)).where(
        or_(*(col(Message.id).startswith(a, autoescape=True) for a in wanted))
    )
    ids = sorted(session.scalars(statement))
    resolved: dict[str, str | Exception] = {}
    for a in wanted:
        if a in ids:
            resolved[a] = a
            continue
        matches = [i for i in ids if i.startswith(a)]
        if not matches:
            resolved[a] = NotFound("message", a)
        elif len(matches) > 1:
            resolved[a] = AmbiguousPrefix("message", a, matches)
        else:
            resolved[a] = matches[0]
    return resolved


def retry(session: Session, asked: Sequence[str], now: datetime) -> list[Retried]:
    """Queue again, due now, every ambiguous or failed message named by ``asked`` (ids or
    unique prefixes; it may arrive twice). Each one refused says why."""
    resolved = resolve_ids(session, asked)
    found = [v for v in resolved.values() if isinstance(v, str)]
    queued = _queue_again(session, found, now)
    refused = [i for i in found if i not in queued]
    statuses = {
        message_id: status
        for message_id, status in session.execute(
            select(col(Message.id), col(Message.status)).where(col(Message.id).in_(refused))
        )
    }
    outcomes = []
    for a, value in resolved.items():
        if isinstance(value, Exception):
            outcomes.append(Retried(a, None, str(value)))
        elif value in queued:
            outcomes.append(Retried(a, value))
        else:
            refusal = IllegalTransition("message", value, str(statuses.get(value)), "retry")
            outcomes.append(Retried(a, value, str(refusal)))
    return outcomes


def retry_matching(
    session: Session, status: MessageStatus, older_than: datetime, now: datetime
) -> list[Retried]:
    """Queue again every message with ``status`` (ambiguous or failed) attempted before
    ``older_than``."""
    if status not in RETRYABLE:
        raise InvalidChoice("status to retry", status.value, [s.value for s in RETRYABLE])
    statement = select(col(Message.id)).where(
        col(Message.status) == status,
        since_attempt() <= older_than,
    )
    ids = sorted(session.scalars(statement))
    queued = _queue_again(session, ids, now)
    moved = f"it is no longer {status.value}"
    return [Retried(i, i) if i in queued else Retried(i, i, moved) for i in ids]


def _queue_again(session: Session, ids: Sequence[str], now: datetime) -> set[str]:
    """One guarded statement: only rows still ambiguous or failed move."""
    if not ids:
        return set()
    statement = (
        update(Message)
        .where(col(Message.id).in_(list(ids)), col(Message.status).in_(RETRYABLE))
        .values(
            status=MessageStatus.QUEUED,
            due_at=now,
            attempts=0,
            attempted_at=None,
            settle_after=None,
            claim_token=None,
            last_error=literal("retried by hand (was ") + col(Message.status) + ")",
            updated_at=now,
        )
        .returning(col(Message.id))
        .execution_options(synchronize_session=False)
    )
    return set(session.scalars(statement))

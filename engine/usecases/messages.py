"""The outbox as people see it: listing messages and retrying the ones that stopped.

Shared by ``lifecycle messages`` and the console's messages page.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlmodel import Session, col

from engine.data.models import Message, MessageStatus
from engine.errors import IllegalTransition, InvalidChoice, NotFound

RETRYABLE = (MessageStatus.AMBIGUOUS, MessageStatus.FAILED)


def parse_status(status: str) -> MessageStatus:
    """A message status by name; ``InvalidChoice`` lists the names."""
    try:
        return MessageStatus(status)
    except ValueError as exc:
        raise InvalidChoice("message status", status, [s.value for s in MessageStatus]) from exc


def find_messages(
    session: Session,
    *,
    status: MessageStatus | None = None,
    customer: str | None = None,
    limit: int = 50,
) -> list[Message]:
    """Messages, newest first."""
    statement = select(Message).order_by(col(Message.created_at).desc()).limit(limit)
    if status is not None:
        statement = statement.where(col(Message.status) == status)
    if customer:
        statement = statement.where(col(Message.customer_id) == customer)
    return list(session.scalars(statement))


def retry(session: Session, message_id: str, now: datetime) -> Message:
    """Queue an ambiguous or failed message again, due now (it may arrive twice)."""
    message = session.get(Message, message_id)
    if message is None:
        raise NotFound("message", message_id)
    if message.status not in RETRYABLE:
        raise IllegalTransition("message", message_id, message.status, "retry")
    previous = message.status
    message.status = MessageStatus.QUEUED
    message.due_at = now
    message.attempts = 0
    message.last_error = f"retried by hand (was {previous})"
    message.updated_at = now
    return message

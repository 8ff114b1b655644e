"""Settlement: deciding an ambiguous message with the provider's own records.

A message is ambiguous when its dispatcher died during the provider call: the provider
may or may not have it. Where the provider can be asked (a ``LookupChannel``: Twilio
through its Messages API, and the console and memory channels), each dispatch tick asks
about a bounded number of them (``DispatchConfig.settle_per_tick``, oldest first) and
decides each one:

- the provider holds a record matching what we sent (the SMS body's digest, or our own
  message id) that no other message has claimed → **found**: the row takes the
  provider's id and status (sent, delivered or failed), and is never sent again;
- the provider holds nothing for that recipient from the attempt's time on that is not
  already another message's → **missing**: it provably never arrived, so the row is
  queued and sent again (once: the send is a new attempt with its own mark);
- the provider cannot answer (unreachable, too many records to read) or holds records we
  cannot match to this message (a rewritten body, another sender's message) → the row
  stays ambiguous with the reason, and is asked about again after
  ``DispatchConfig.settle_retry``; what stays unknown is listed by ``lifecycle messages
  list --status ambiguous`` and in the console, for a person to decide.

SendGrid cannot be asked (its activity API is a paid add-on with minutes of lag, no
proof of absence): ambiguous emails settle when SendGrid's event webhook reports our
``lifecycle_message_id`` (``engine.usecases.ledger``).

Deciding is a pure function (``verdict``); the lookups are the only I/O per message, and
the writes are three set-based statements per tick (``engine.delivery.outbox``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, or_, select
from sqlmodel import col

from engine.data.models import Message, MessageStatus
from engine.data.uow import reading, unit_of_work
from engine.delivery.lease import LeaseClock
from engine.delivery.outbound import Attempt, LookupChannel, ProviderRecord, lookup_safely
from engine.delivery.outbox import (
    ROWS_PER_STATEMENT,
    Found,
    settle_found,
    settle_later,
    settle_missing,
)
from engine.errors import ChannelError

STATUSES = {
    "sent": MessageStatus.SENT,
    "delivered": MessageStatus.DELIVERED,
    "failed": MessageStatus.FAILED,
}


@dataclass(frozen=True)
class Missing:
    """The provider provably never received the message."""

    message: Message
    note: str


@dataclass(frozen=True)
class Unknown:
    """The provider cannot tell now; ``note`` says why."""

    message: Message
    note: str


Verdict = Found | Missing | Unknown


@dataclass
class SettleReport:
    found: int = 0
    requeued: int = 0
    unknown: int = 0


def verdict(
    message: Message,
    provider: str,
    answer: Sequence[ProviderRecord] | ChannelError,
    taken: Callable[[str], bool],
) -> Verdict:
    """Decide one ambiguous message from the provider's ``answer`` (see the module).

    ``taken(provider_id)`` is true when that provider id already belongs to another
    message (recorded in the outbox, or found for another message in this round).
    """
    if isinstance(answer, ChannelError):
        return Unknown(message, f"settlement: {answer}; asking again later")
    free = [record for record in answer if not taken(record.provider_id)]
    matching = [record for record in free if record.matches]
    if matching:
        record = matching[0]
        detail = record.detail or record.status
        return Found(
            message,
            provider,
            record.provider_id,
            STATUSES[record.status],
            f"settled: {provider} has it as {record.provider_id} ({detail})",
        )
    if not free:
        return Missing(message, f"settled: {provider} never received it; queued to send again")
    return Unknown(
        message,
        f"settlement: {provider} holds {len(free)} message(s) to {message.to_address} from "
        "that time that do not match what we sent; retry by hand if it did not arrive",
    )


def settle(
    db: Engine,
    clock: LeaseClock,
    channels: Mapping[str, Any],
    now: datetime,
    *,
    limit: int,
    retry: timedelta,
    rules_version: str,
    pool: Executor | None = None,
) -> SettleReport:
    """Ask the providers about up to ``limit`` ambiguous messages and settle them."""
    lookups = {name: ch for name, ch in channels.items() if isinstance(ch, LookupChannel)}
    report = SettleReport()
    if not lookups or limit <= 0:
        return report
    with reading(db) as session:
        messages = list(
            session.scalars(
                select(Message)
                .where(
                    col(Message.status) == MessageStatus.AMBIGUOUS,
                    col(Message.channel).in_(list(lookups)),
                    or_(
                        col(Message.settle_after) <= clock.now(),
                        col(Message.settle_after).is_(None),
                    ),
                )
                .order_by(col(Message.settle_after).asc().nulls_first(), col(Message.id))
                .limit(limit)
            )
        )
    if not messages:
        return report

    def ask(message: Message) -> list[ProviderRecord] | ChannelError:
        return lookup_safely(lookups[message.channel], attempt_of(message))

    answers = list(pool.map(ask, messages) if pool is not None else map(ask, messages))
    verdicts = decide(db, lookups, messages, answers)
    found = [v for v in verdicts if isinstance(v, Found)]
    missing = [v for v in verdicts if isinstance(v, Missing)]
    unknown = [v for v in verdicts if isinstance(v, Unknown)]
    with unit_of_work(db) as session:
        report.found = len(settle_found(session, found, now, rules_version))
        for note in {v.note for v in missing}:
            ids = [v.message.id for v in missing if v.note == note]
            report.requeued += len(settle_missing(session, ids, now, note))
        notes = {v.message.id: v.note for v in unknown}
        report.unknown = len(settle_later(session, clock, notes, retry, now))
    return report


def attempt_of(message: Message) -> Attempt:
    return Attempt(
        message_id=message.id,
        to=message.to_address,
        # A row from before attempts were stamped: its creation bounds the search.
        attempted_at=message.attempted_at or message.created_at,
        body_digest=message.body_digest,
        provider_id=message.provider_id,
    )


def decide(
    db: Engine,
    lookups: Mapping[str, Any],
    messages: Sequence[Message],
    answers: Sequence[Sequence[ProviderRecord] | ChannelError],
) -> list[Verdict]:
    """The verdict for each message; a provider id goes to one message at most."""
    mentioned = {
        record.provider_id
        for answer in answers
        if not isinstance(answer, ChannelError)
        for record in answer
    }
    owners = _owners(db, mentioned)
    verdicts: list[Verdict] = []
    for message, answer in zip(messages, answers, strict=True):

        def taken(provider_id: str, message: Message = message) -> bool:
            return owners.get(provider_id, message.id) != message.id

        result = verdict(message, str(lookups[message.channel].provider), answer, taken)
        if isinstance(result, Found):
            owners[result.provider_id] = message.id
        verdicts.append(result)
    return verdicts


def _owners(db: Engine, provider_ids: Iterable[str]) -> dict[str, str]:
    """Which message already carries each provider id (one query per 500 ids)."""
    wanted = sorted(provider_ids)
    owners: dict[str, str] = {}
    with reading(db) as session:
        for start in range(0, len(wanted), ROWS_PER_STATEMENT):
            chunk = wanted[start : start + ROWS_PER_STATEMENT]
            rows = session.execute(
                select(col(Message.provider_id), col(Message.id)).where(
                    col(Message.provider_id).in_(chunk)
                )
            )
            owners.update({str(pid): str(message_id) for pid, message_id in rows})
    return owners

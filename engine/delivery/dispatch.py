"""Dispatch: claim due outbox rows, render, send through the channels, record the result.

A message row moves  queued → sending → sent  (then delivered, bounced... by webhooks),
or to failed (permanent error, retries used up), cancelled (consent gone before sending)
or ambiguous (see below).

Claiming is one statement, ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)``
on PostgreSQL (a single writer makes it atomic on SQLite), so several dispatchers never
claim the same row.

Recovery rule for a dispatcher that dies (the lease of a ``sending`` row expires):
- it died between claim and provider call — ``attempted_at`` is unset, because it is
  committed just before the provider is called — so the row goes back to ``queued`` and
  is sent once by the next dispatcher: nothing lost, nothing twice;
- it died after ``attempted_at`` was committed — the provider may have accepted the
  message — so the row becomes ``ambiguous`` and is NOT sent again (at most once: a
  marketing message sent twice is worse than one missing). Ambiguous rows are listed by
  ``lifecycle messages list --status ambiguous`` and in the console, can be retried by
  hand with ``lifecycle messages retry ID``, and are settled to ``sent`` automatically
  when the provider's webhook reports our ``lifecycle_message_id``.

Transient errors (429, 5xx, timeouts, refused connections) go back to ``queued`` with
exponential backoff and full jitter (or the provider's rate-limit reset when it gives
one), up to ``max_attempts``; permanent errors fail the row with the provider's reason and
suppress the address when that is what the error means.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

from itsdangerous import URLSafeSerializer
from sqlalchemy import CursorResult, Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from engine.data.facts import (
    build_facts,
    customer_rows,
    open_complaint_counts,
    suppressed_addresses,
)
from engine.data.models import Decision, Message, MessageStatus, Suppression
from engine.data.uow import unit_of_work
from engine.delivery.outbound import Email, Sent, Sms, send_many
from engine.delivery.templates import RenderedEmail, RenderedSms, TemplateStore
from engine.errors import ChannelError, PermanentChannelError, TemplateError
from engine.journeys.policies import Proposal, complaint_pause, consent
from engine.playbooks.model import RuleSet

SERIALIZER_SALT = "unsubscribe"


@dataclass(frozen=True)
class DispatchConfig:
    batch_size: int = 200
    max_attempts: int = 6
    backoff_base: timedelta = timedelta(seconds=30)
    backoff_cap: timedelta = timedelta(hours=1)
    lease: timedelta = timedelta(minutes=5)
    send_threads: int = 8  # provider calls are I/O: overlap them within one dispatcher
    public_base_url: str = "http://127.0.0.1:8000"
    unsubscribe_mailto: str = "unsubscribe@lifecycle.example"
    secret_key: str = "dev-only-change-me"
    pause_recheck: timedelta = timedelta(hours=1)


@dataclass
class DispatchReport:
    claimed: int = 0
    sent: dict[str, int] = field(default_factory=dict)
    retried: int = 0
    failed: int = 0
    cancelled: int = 0
    deferred: int = 0
    requeued_after_crash: int = 0
    marked_ambiguous: int = 0

    def merge(self, other: DispatchReport) -> None:
        self.claimed += other.claimed
        for channel, count in other.sent.items():
            self.sent[channel] = self.sent.get(channel, 0) + count
        for name in (
            "retried",
            "failed",
            "cancelled",
            "deferred",
            "requeued_after_crash",
            "marked_ambiguous",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())


class UnsubscribeLink(NamedTuple):
    """What a signed unsubscribe link says: whose, which channel, which message, and the
    message's subscription topic (None: a message without one, or a link signed before
    topics existed)."""

    customer_id: str
    channel: str
    message_id: str
    topic: str | None = None


def unsubscribe_token(
    secret_key: str, customer_id: str, channel: str, message_id: str, topic: str | None = None
) -> str:
    fields = [customer_id, channel, message_id]
    return URLSafeSerializer(secret_key, salt=SERIALIZER_SALT).dumps(
        [*fields, topic] if topic else fields
    )


def read_unsubscribe_token(secret_keys: str | Sequence[str], token: str) -> UnsubscribeLink:
    """Raises itsdangerous.BadSignature for a forged or damaged token. ``secret_keys`` may be
    a list, oldest first: a token signed with any of them verifies (key rotation)."""
    keys = [secret_keys] if isinstance(secret_keys, str) else list(secret_keys)
    serializer = URLSafeSerializer(keys, salt=SERIALIZER_SALT)
    customer_id, channel, message_id, *rest = serializer.loads(token)
    topic = str(rest[0]) if rest and rest[0] else None
    return UnsubscribeLink(str(customer_id), str(channel), str(message_id), topic)


def backoff(attempts: int, config: DispatchConfig, rng: random.Random) -> timedelta:
    """Exponential backoff with full jitter: uniform in [base, base * 2**(n-1)], capped."""
    ceiling = min(config.backoff_cap, config.backoff_base * (2 ** max(0, attempts - 1)))
    seconds = rng.uniform(
        config.backoff_base.total_seconds(),
        max(ceiling.total_seconds(), config.backoff_base.total_seconds()),
    )
    return timedelta(seconds=seconds)


class Dispatcher:
    """Sends due outbox rows through the channels. ``hooks`` lets a test stop the process
    at a chosen point (``claimed``, ``sent``) to prove the recovery rule."""

    def __init__(
        self,
        db: Engine,
        rules: RuleSet,
        templates: TemplateStore,
        channels: dict[str, Any],
        config: DispatchConfig | None = None,
        *,
        worker_id: str | None = None,
        hooks: dict[str, Callable[[list[str]], None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.db = db
        self.rules = rules
        self.templates = templates
        self.channels = channels
        self.config = config or DispatchConfig()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.hooks = hooks or {}
        self.rng = rng or random.Random()
        self._pool = ThreadPoolExecutor(
            max_workers=self.config.send_threads, thread_name_prefix="send"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------ the loop

    def run_once(self, now: datetime, *, limit: int | None = None) -> DispatchReport:
        """Recover expired leases, then claim and send batches until nothing is due."""
        report = DispatchReport()
        report.merge(self.recover(now))
        while limit is None or report.claimed < limit:
            size = (
                self.config.batch_size
                if limit is None
                else min(self.config.batch_size, limit - report.claimed)
            )
            ids = self.claim(now, size)
            if not ids:
                break
            report.claimed += len(ids)
            self._hook("claimed", ids)
            report.merge(self._send_claimed(ids, now))
        return report

    def _hook(self, point: str, ids: list[str]) -> None:
        hook = self.hooks.get(point)
        if hook is not None:
            hook(ids)

    def claim(self, now: datetime, size: int) -> list[str]:
        due = (
            select(col(Message.id))
            .where(col(Message.status) == MessageStatus.QUEUED, col(Message.due_at) <= now)
            .order_by(col(Message.priority), col(Message.due_at))
            .limit(size)
        )
        if self.db.dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        statement = (
            update(Message)
            .where(col(Message.id).in_(due.scalar_subquery()))
            .values(
                status=MessageStatus.SENDING,
                claimed_by=self.worker_id,
                claimed_at=now,
                attempted_at=None,
                attempts=Message.attempts + 1,
                updated_at=now,
            )
            .returning(col(Message.id))
            .execution_options(synchronize_session=False)
        )
        with unit_of_work(self.db) as session:
            ids = list(session.scalars(statement))
        return ids

    def recover(self, now: datetime) -> DispatchReport:
        """Apply the recovery rule to rows whose dispatcher's lease has expired."""
        report = DispatchReport()
        expired = now - self.config.lease
        with unit_of_work(self.db) as session:
            requeued = cast(
                "CursorResult[Any]",
                session.execute(
                    update(Message)
                    .where(
                        col(Message.status) == MessageStatus.SENDING,
                        col(Message.claimed_at) < expired,
                        col(Message.attempted_at).is_(None),
                    )
                    .values(
                        status=MessageStatus.QUEUED,
                        claimed_by=None,
                        last_error="requeued: its dispatcher stopped before calling the provider",
                        updated_at=now,
                    )
                ),
            ).rowcount
            ambiguous = cast(
                "CursorResult[Any]",
                session.execute(
                    update(Message)
                    .where(
                        col(Message.status) == MessageStatus.SENDING,
                        col(Message.claimed_at) < expired,
                        col(Message.attempted_at).is_not(None),
                    )
                    .values(
                        status=MessageStatus.AMBIGUOUS,
                        last_error="ambiguous: its dispatcher stopped after calling the provider; not resent",
                        updated_at=now,
                    )
                ),
            ).rowcount
        report.requeued_after_crash = requeued
        report.marked_ambiguous = ambiguous
        return report

    # ------------------------------------------------------------ one batch

    def _send_claimed(self, ids: list[str], now: datetime) -> DispatchReport:
        report = DispatchReport()
        with Session(self.db, expire_on_commit=False) as session:
            messages = list(session.scalars(select(Message).where(col(Message.id).in_(ids))))
            ready = self._prepare(session, messages, now, report)
            for message, _ in ready:
                message.attempted_at = now
            session.commit()
            by_channel: dict[str, list[tuple[Message, Email | Sms]]] = {}
            for message, rendered in ready:
                by_channel.setdefault(message.channel, []).append((message, rendered))
            outcomes = self._send_all(by_channel)
            self._hook("sent", [m.id for m, _ in outcomes])
            for message, outcome in outcomes:
                self._record(session, message, outcome, now, report)
            session.commit()
        return report

    def _send_all(
        self, by_channel: dict[str, list[tuple[Message, Email | Sms]]]
    ) -> list[tuple[Message, Sent | ChannelError]]:
        """Send every rendered message; provider calls overlap in the thread pool, each
        thread taking a contiguous slice of a channel's messages (so identical emails
        still batch into one SendGrid request within a slice)."""
        threads = max(1, self.config.send_threads)
        jobs: list[
            tuple[list[tuple[Message, Email | Sms]], Callable[..., list[Sent | ChannelError]]]
        ] = []
        for channel, items in by_channel.items():
            size = -(-len(items) // threads)
            for start in range(0, len(items), size):
                chunk = items[start : start + size]
                rendered = [r for _, r in chunk]
                if self.config.send_threads > 0:
                    future = self._pool.submit(send_many, self.channels[channel], rendered)
                    jobs.append((chunk, future.result))
                else:
                    results = send_many(self.channels[channel], rendered)
                    jobs.append((chunk, lambda results=results: results))
        outcomes: list[tuple[Message, Sent | ChannelError]] = []
        for chunk, result in jobs:
            outcomes.extend(zip((m for m, _ in chunk), result(), strict=True))
        return outcomes

    def _prepare(
        self, session: Session, messages: Sequence[Message], now: datetime, report: DispatchReport
    ) -> list[tuple[Message, Email | Sms]]:
        """Render every claimed message; re-check consent; fail only the ones that break."""
        customer_ids = sorted(
            {m.customer_id for m in messages if m.customer_id and m.kind != "staff"}
        )
        rows = {row.id: row for row in customer_rows(session, customer_ids)}
        complaints = open_complaint_counts(session, customer_ids)
        suppressed = suppressed_addresses(session, list(rows.values()))
        staff_suppressed = {
            (s.channel, s.address)
            for s in session.scalars(
                select(Suppression).where(
                    col(Suppression.address).in_(
                        [m.to_address for m in messages if m.kind == "staff"]
                    )
                )
            )
        }
        ready: list[tuple[Message, Email | Sms]] = []
        for message in messages:
            if message.kind == "staff":
                if (message.channel, message.to_address) in staff_suppressed:
                    self._finish(
                        session,
                        message,
                        MessageStatus.CANCELLED,
                        "the address is suppressed",
                        now,
                        report,
                    )
                    continue
                facts: dict[str, Any] = {}
                customer: dict[str, Any] = {"id": message.customer_id}
            else:
                row = rows.get(message.customer_id or "")
                if row is None:
                    self._finish(
                        session,
                        message,
                        MessageStatus.FAILED,
                        "the customer no longer exists",
                        now,
                        report,
                    )
                    continue
                facts = build_facts(
                    row,
                    self.rules.catalog,
                    now,
                    open_complaints=complaints.get(row.id, 0),
                    suppressed=suppressed,
                )
                playbook = self.rules.playbooks.get(message.playbook or "")
                proposal = Proposal(
                    message.channel,
                    message.kind == "marketing",
                    message.priority,
                    topic=playbook.topic if playbook is not None else None,
                )
                refused = consent(proposal, facts)
                if refused is not None:
                    self._finish(
                        session,
                        message,
                        MessageStatus.CANCELLED,
                        f"at send time: {refused.reason}",
                        now,
                        report,
                    )
                    continue
                paused = complaint_pause(proposal, facts, now)
                if paused is not None:
                    self._defer(
                        session,
                        message,
                        now + self.config.pause_recheck,
                        paused.reason,
                        now,
                        report,
                    )
                    continue
                message.to_address = row.email if message.channel == "email" else row.phone
                customer = {
                    "id": row.id,
                    "first_name": row.first_name,
                    "email": row.email,
                    "phone": row.phone,
                    "locale": row.locale,
                    "timezone": row.timezone,
                }
            try:
                ready.append((message, self._render(message, customer, facts)))
            except (TemplateError, ValueError) as exc:
                self._finish(
                    session, message, MessageStatus.FAILED, f"render failed: {exc}", now, report
                )
        return ready

    def _render(
        self, message: Message, customer: dict[str, Any], facts: dict[str, Any]
    ) -> Email | Sms:
        playbook = self.rules.playbooks.get(message.playbook or "")
        # The link names the message's topic: the page offers to leave only that topic.
        topic = playbook.topic if playbook is not None and message.kind == "marketing" else None
        token = unsubscribe_token(
            self.config.secret_key, message.customer_id or "", message.channel, message.id, topic
        )
        unsubscribe_url = f"{self.config.public_base_url}/u/{token}"
        context = {
            "customer": customer,
            "facts": facts,
            "event": message.context.get("event", {}),
            "unsubscribe_url": unsubscribe_url,
            "brand": self.rules.policies.brand,
            "message_id": message.id,
            **{k: v for k, v in message.context.items() if k not in ("event",)},
        }
        rendered = self.templates.render(
            message.channel,
            message.template,
            context,
            locale=customer.get("locale"),
            currency=self.rules.policies.currency,
        )
        if isinstance(rendered, RenderedEmail):
            headers: dict[str, str] = {}
            if message.kind == "marketing":
                headers = {
                    "List-Unsubscribe": f"<mailto:{self.config.unsubscribe_mailto}?subject=unsubscribe-{token}>, <{unsubscribe_url}>",
                    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                }
            return Email(
                message_id=message.id,
                to=message.to_address,
                subject=rendered.subject,
                html=rendered.html,
                text=rendered.text,
                headers=headers,
                category=message.playbook or message.kind,
            )
        assert isinstance(rendered, RenderedSms)
        body = rendered.body
        if message.kind == "marketing" and playbook is not None and playbook.sms_opt_out_hint:
            body = f"{body} {playbook.sms_opt_out_hint}"
        return Sms(message_id=message.id, to=message.to_address, body=body)

    # ------------------------------------------------------------ outcomes

    def _record(
        self,
        session: Session,
        message: Message,
        outcome: Sent | ChannelError,
        now: datetime,
        report: DispatchReport,
    ) -> None:
        if isinstance(outcome, Sent):
            message.status = MessageStatus.SENT
            message.provider = outcome.provider
            message.provider_id = outcome.provider_id
            message.sent_at = now
            message.last_error = None
            message.updated_at = now
            report.sent[message.channel] = report.sent.get(message.channel, 0) + 1
            self._decide(
                session, message, "sent", f"{outcome.provider} id {outcome.provider_id}", now
            )
            return
        if outcome.transient and message.attempts < self.config.max_attempts:
            wait = (
                timedelta(seconds=outcome.retry_after)
                if outcome.retry_after
                else backoff(message.attempts, self.config, self.rng)
            )
            message.status = MessageStatus.QUEUED
            message.due_at = now + wait
            message.claimed_by = None
            message.attempted_at = None
            message.last_error = (
                f"attempt {message.attempts}: {outcome}; retry at {message.due_at:%H:%M:%S}"
            )
            message.updated_at = now
            report.retried += 1
            return
        reason = (
            str(outcome)
            if not outcome.transient
            else f"gave up after {message.attempts} attempts: {outcome}"
        )
        self._finish(session, message, MessageStatus.FAILED, reason, now, report)
        if isinstance(outcome, PermanentChannelError) and outcome.suppress:
            suppress(
                session,
                message.channel,
                message.to_address,
                f"{outcome.reason}",
                f"provider:{outcome.channel}",
                now,
            )

    def _finish(
        self,
        session: Session,
        message: Message,
        status: MessageStatus,
        reason: str,
        now: datetime,
        report: DispatchReport,
    ) -> None:
        message.status = status
        message.last_error = reason[:1000]
        message.updated_at = now
        if status == MessageStatus.FAILED:
            report.failed += 1
        else:
            report.cancelled += 1
        self._decide(session, message, str(status), reason, now)

    def _defer(
        self,
        session: Session,
        message: Message,
        until: datetime,
        reason: str,
        now: datetime,
        report: DispatchReport,
    ) -> None:
        first_time = message.last_error != reason
        message.status = MessageStatus.QUEUED
        message.due_at = until
        message.claimed_by = None
        message.attempts = max(0, message.attempts - 1)  # not an attempt at the provider
        message.last_error = reason
        message.updated_at = now
        report.deferred += 1
        if first_time:
            self._decide(session, message, "deferred", reason, now, until=until)

    def _decide(
        self,
        session: Session,
        message: Message,
        outcome: str,
        reason: str,
        now: datetime,
        until: datetime | None = None,
    ) -> None:
        if message.kind == "staff" or not message.customer_id:
            return
        session.add(
            Decision(
                at=now,
                customer_id=message.customer_id,
                playbook=message.playbook or "",
                step_id=message.step_id,
                outcome=outcome,
                reason=reason[:500],
                until=until,
                enrollment_id=message.enrollment_id,
                message_id=message.id,
                rules_version=self.rules.version,
            )
        )


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

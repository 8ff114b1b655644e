"""Dispatch: claim due outbox rows, render, send through the channels, record the result,
and settle what a crash left in doubt.

A message row moves through explicit states:

    queued ──claim──► sending ──provider call──► sent ──webhooks──► delivered / bounced / failed
      ▲                  │  └─► queued (transient error, with backoff) · failed (permanent,
      │                  │      or retries used up) · cancelled (consent gone) · queued (held)
      │                  └─ lease ran out: requeued if never attempted, else ambiguous
      └──── settlement: the provider never received it ◄── ambiguous ──► sent (it has it)

Each tick runs ``recover`` (the recovery rule below), ``settle`` (engine.delivery.settlement)
and then claims and sends batches until nothing is due.

Exactly once, message by message:

- **Claims.** One statement takes a batch under a fresh claim token and a lease
  (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so two dispatchers never take the same row.
  The lease is kept on one clock (``engine.delivery.lease``: the database's on
  PostgreSQL, the machine's on SQLite), never on a tick's ``now``, and a heartbeat
  renews it while the batch is being sent, so it runs out only when its dispatcher died.
- **Attempts.** A message is marked attempted (``attempted_at``, committed) just before
  its own provider call, by the send thread that makes the call. Send threads write their
  marks and outcomes through one group commit (``engine.data.group_commit``), and a
  thread records a call's outcome in the same write that marks its next one. So after a
  crash the
  rows in doubt are at most the messages of the calls in flight: one message per send
  thread (``send_threads``) for SMS and personalized email; a SendGrid request that
  batches identical emails is one call carrying up to 1,000 of them, all accepted or
  none (one HTTP request), and SendGrid's events settle them.
- **Recovery.** When a lease has run out: no ``attempted_at`` → the row goes back to
  ``queued`` and is sent once; ``attempted_at`` set → ``ambiguous``, never resent
  blindly: settlement asks the provider, or waits for its webhook.
- **Guarded records.** Every write after the provider call holds ``status = 'sending'
  AND claim_token = ?`` (engine.delivery.outbox), set-based per group of calls: a
  webhook that got there first (delivered, bounced) is never moved back to ``sent``,
  and a dispatcher that lost its claim changes nothing.
- **One message's failure is its own.** A channel that raises anything (a bug) fails
  only the messages of that call, as a transient error naming the exception (logged with
  its traceback); the rest of the batch is recorded.

Transient errors (429, 5xx, timeouts, refused connections) go back to ``queued`` with
exponential backoff and full jitter (or the provider's rate-limit reset when it gives
one), up to ``max_attempts``; permanent errors fail the row with the provider's reason and
suppress the address when that is what the error means.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from itsdangerous import URLSafeSerializer
from sqlalchemy import Engine, select
from sqlmodel import Session, col

from engine.data.facts import (
    build_facts,
    customer_rows,
    open_complaint_counts,
    suppressed_addresses,
)
from engine.data.group_commit import GroupCommit
from engine.data.models import Message, MessageStatus, Suppression
from engine.data.uow import reading, unit_of_work
from engine.delivery import outbox
from engine.delivery.lease import Heartbeat, LeaseClock
from engine.delivery.outbound import Email, Sent, Sms, body_digest, prepare_unit, units
from engine.delivery.outbox import (
    Accepted,
    AddressSuppression,
    Claim,
    Deferred,
    Finished,
    Outcome,
    Recorded,
    Retry,
)
from engine.delivery.settlement import settle
from engine.delivery.templates import RenderedEmail, RenderedSms, TemplateStore
from engine.errors import ChannelError, PermanentChannelError, TemplateError
from engine.journeys.policies import Proposal, complaint_pause, consent
from engine.playbooks.model import RuleSet

if TYPE_CHECKING:
    from engine.delivery.throttle import Throttle

log = logging.getLogger(__name__)

SERIALIZER_SALT = "unsubscribe"


@dataclass(frozen=True)
class DispatchConfig:
    batch_size: int = 200
    max_attempts: int = 6
    backoff_base: timedelta = timedelta(seconds=30)
    backoff_cap: timedelta = timedelta(hours=1)
    # Real elapsed time (engine.delivery.lease), renewed three times per lease while a
    # batch is being sent.
    lease: timedelta = timedelta(minutes=5)
    send_threads: int = 8  # provider calls are I/O: overlap them within one dispatcher
    # An ambiguous row is first looked up this long after its lease ran out (any request
    # its dead dispatcher had on the wire has landed by then), then every settle_retry.
    settle_grace: timedelta = timedelta(seconds=30)
    settle_retry: timedelta = timedelta(minutes=5)
    settle_per_tick: int = 50  # provider lookups per tick (they are one call per message)
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
    settled: int = 0  # ambiguous rows the provider had
    settled_requeued: int = 0  # ambiguous rows the provider never received: sent again
    still_ambiguous: int = 0  # looked up, and the provider could not tell
    claims_lost: int = 0  # outcomes not recorded: the claim had been taken over

    def merge(self, other: DispatchReport) -> None:
        for name in (f.name for f in fields(self)):
            if name == "sent":
                for channel, count in other.sent.items():
                    self.sent[channel] = self.sent.get(channel, 0) + count
            else:
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


# ── what the send threads hand to the group commit ─────────────────────────────────


@dataclass(frozen=True)
class _Prepare:
    """Before any call: the outcomes decided without the provider, and each ready
    message's recipient and body digest. Answers (recorded, ids still held)."""

    outcomes: list[Outcome]
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class _Step:
    """A send thread between two provider calls: the outcomes of the call it made (to
    record) and the messages of the call it is about to make (to mark attempted), in one
    transaction. Answers (recorded, ids of the next call still held: only those are sent)."""

    outcomes: list[Outcome]
    ids: list[str]


@dataclass(frozen=True)
class _Renew:
    """The heartbeat. Answers how many rows the claim still holds."""


_Op = _Prepare | _Step | _Renew


@dataclass(frozen=True)
class _Ready:
    message: Message
    rendered: Email | Sms


class Dispatcher:
    """Sends due outbox rows through the channels. ``hooks`` lets a test stop the process
    at a chosen point to prove the recovery rule: ``claimed`` (a batch is claimed),
    ``attempted`` (a call's messages are marked, the call not made) and ``sent`` (the
    call returned, its outcome not recorded); each gets the message ids concerned."""

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
        clock: LeaseClock | None = None,
        throttle: Throttle | None = None,
    ) -> None:
        self.db = db
        self.throttle = throttle
        self.rules = rules
        self.templates = templates
        self.channels = channels
        self.config = config or DispatchConfig()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.hooks = hooks or {}
        self.rng = rng or random.Random()
        self.clock = clock or LeaseClock(db)
        self._pool = (
            ThreadPoolExecutor(max_workers=self.config.send_threads, thread_name_prefix="send")
            if self.config.send_threads > 0
            else None
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # ------------------------------------------------------------ the loop

    def run_once(self, now: datetime, *, limit: int | None = None) -> DispatchReport:
        """Recover expired leases, settle ambiguous rows, then claim and send batches
        until nothing is due."""
        report = DispatchReport()
        report.merge(self.recover(now))
        report.merge(self.settle(now))
        while limit is None or report.claimed < limit:
            size = (
                self.config.batch_size
                if limit is None
                else min(self.config.batch_size, limit - report.claimed)
            )
            claim = self.claim(now, size)
            if not claim.ids:
                break
            report.claimed += len(claim.ids)
            self._hook("claimed", claim.ids)
            report.merge(self._send_claimed(claim, now))
        return report

    def _hook(self, point: str, ids: list[str]) -> None:
        hook = self.hooks.get(point)
        if hook is not None:
            hook(ids)

    def claim(self, now: datetime, size: int) -> Claim:
        postgres = self.db.dialect.name == "postgresql"
        with unit_of_work(self.db) as session:
            return outbox.claim(
                session, self.clock, self.worker_id, now, size, self.config.lease, postgres
            )

    def recover(self, now: datetime) -> DispatchReport:
        """Apply the recovery rule to rows whose lease has run out."""
        with unit_of_work(self.db) as session:
            requeued, ambiguous = outbox.recover(session, self.clock, now, self.config.settle_grace)
        return DispatchReport(requeued_after_crash=requeued, marked_ambiguous=ambiguous)

    def settle(self, now: datetime) -> DispatchReport:
        """Ask the providers about ambiguous rows (engine.delivery.settlement)."""
        settled = settle(
            self.db,
            self.clock,
            self.channels,
            now,
            limit=self.config.settle_per_tick,
            retry=self.config.settle_retry,
            rules_version=self.rules.version,
            pool=self._pool,
        )
        return DispatchReport(
            settled=settled.found,
            settled_requeued=settled.requeued,
            still_ambiguous=settled.unknown,
        )

    # ------------------------------------------------------------ one batch

    def _send_claimed(self, claim: Claim, now: datetime) -> DispatchReport:
        with reading(self.db) as session:
            messages = list(session.scalars(select(Message).where(col(Message.id).in_(claim.ids))))
            decided, ready = self._prepare(session, messages, now)

        def write(session: Session, ops: Sequence[_Op]) -> list[Any]:
            return self._write(session, ops, claim.token, now)

        writer: GroupCommit[_Op, Any] = GroupCommit(self.db, write)
        rows = [
            {
                "id": r.message.id,
                "to_address": r.message.to_address,
                "body_digest": body_digest(r.rendered.body)
                if isinstance(r.rendered, Sms)
                else None,
            }
            for r in ready
        ]
        recorded, held = writer.submit(_Prepare(decided, rows))
        report = self._tally(decided, recorded)
        ready = [r for r in ready if r.message.id in held]
        beat = Heartbeat(self.config.lease / 3, lambda: writer.submit(_Renew()), "lease")
        with beat:
            for part in self._send_all(writer, ready, now):
                report.merge(part)
        return report

    def _send_all(
        self, writer: GroupCommit[_Op, Any], ready: list[_Ready], now: datetime
    ) -> list[DispatchReport]:
        """Every provider call (``units``), made by the send threads: each takes the next
        call from a shared queue, so up to ``send_threads`` calls overlap."""
        calls: queue.SimpleQueue[tuple[str, list[_Ready]]] = queue.SimpleQueue()
        by_channel: dict[str, list[_Ready]] = {}
        for item in ready:
            by_channel.setdefault(item.message.channel, []).append(item)
        for channel, items in by_channel.items():
            for unit in units(self.channels[channel], [i.rendered for i in items]):
                calls.put((channel, [items[i] for i in unit]))
        if self._pool is None:
            return [self._send_calls(writer, calls, now)]
        threads = min(self.config.send_threads, calls.qsize())
        futures: list[Future[DispatchReport]] = [
            self._pool.submit(self._send_calls, writer, calls, now) for _ in range(threads)
        ]
        wait(futures)  # every call finishes (and is recorded) before an error surfaces
        return [future.result() for future in futures]

    def _send_calls(
        self,
        writer: GroupCommit[_Op, Any],
        calls: queue.SimpleQueue[tuple[str, list[_Ready]]],
        now: datetime,
    ) -> DispatchReport:
        """One send thread: prepare a call, then in one write record the previous call and
        mark this one's messages attempted, then make it; until no call is left. So at any
        moment at most one call per thread is marked and not recorded."""
        report = DispatchReport()
        made: list[Outcome] = []
        while True:
            try:
                channel, items = calls.get_nowait()
            except queue.Empty:
                channel, items = "", []
            if not items and not made:
                return report
            ids = [i.message.id for i in items]
            call = (
                prepare_unit(self.channels[channel], [i.rendered for i in items]) if items else None
            )
            try:
                recorded, held = writer.submit(_Step(made, ids))
            except Exception:
                # Unrecorded calls become ambiguous once the lease runs out, for settlement;
                # unmarked messages were not attempted and are requeued.
                log.exception(
                    "could not record %d message(s) and mark %d attempted; stopping this "
                    "send thread",
                    len(made),
                    len(ids),
                )
                return report
            report.merge(self._tally(made, recorded))
            if call is None:
                return report
            if len(held) < len(ids):  # some were taken over: build the call for the rest
                report.claims_lost += len(ids) - len(held)
                items = [i for i in items if i.message.id in held]
                call = prepare_unit(self.channels[channel], [i.rendered for i in items])
            if not items:
                made = []
                continue
            self._hook("attempted", ids)
            if self.throttle is not None:
                # After the mark, so the slot is spent on a call that is really made; a
                # crash while waiting leaves these few ambiguous, which settlement resolves.
                self.throttle.acquire(channel, len(items))
            results = call()
            self._hook("sent", ids)
            if self.throttle is not None:
                self._cool_down_on_429(channel, results)
            made = [self._outcome(i.message, r, now) for i, r in zip(items, results, strict=True)]

    def _cool_down_on_429(self, channel: str, results: Sequence[Sent | ChannelError]) -> None:
        limited = [r for r in results if isinstance(r, ChannelError) and r.status == 429]
        if limited and self.throttle is not None:
            self.throttle.cool_down(channel, max(r.retry_after or 0 for r in limited) or None)

    def _write(self, session: Session, ops: Sequence[_Op], token: str, now: datetime) -> list[Any]:
        """One group of the group commit: every record, then every mark, as few
        statements as the group allows."""
        decided = [o for op in ops if isinstance(op, _Prepare | _Step) for o in op.outcomes]
        recorded = outbox.record(session, token, decided, now, self.rules.version)
        rows = [row for op in ops if isinstance(op, _Prepare) for row in op.rows]
        prepared = outbox.prepare(session, token, rows)
        marks = [i for op in ops if isinstance(op, _Step) for i in op.ids]
        marked = outbox.mark_attempted(session, self.clock, token, marks, now)
        renewed = (
            outbox.renew(session, self.clock, token, self.config.lease)
            if any(isinstance(op, _Renew) for op in ops)
            else 0
        )
        results: list[Any] = []
        for op in ops:
            if isinstance(op, _Prepare):
                results.append(
                    (_part(recorded, op.outcomes), prepared & {r["id"] for r in op.rows})
                )
            elif isinstance(op, _Step):
                results.append((_part(recorded, op.outcomes), marked & set(op.ids)))
            else:
                results.append(renewed)
        return results

    def _tally(self, outcomes: Sequence[Outcome], recorded: Recorded) -> DispatchReport:
        report = DispatchReport()
        for o in outcomes:
            message = o.message
            if message.id not in recorded.applied and message.id not in recorded.late:
                report.claims_lost += 1
                log.warning(
                    "message %s: its claim was taken over before its outcome (%s) was "
                    "recorded; left as the database has it",
                    message.id,
                    type(o).__name__,
                )
            elif isinstance(o, Accepted):
                report.sent[message.channel] = report.sent.get(message.channel, 0) + 1
            elif isinstance(o, Retry):
                report.retried += 1
            elif isinstance(o, Deferred):
                report.deferred += 1
            elif o.status == MessageStatus.FAILED:
                report.failed += 1
            else:
                report.cancelled += 1
        return report

    def _outcome(self, message: Message, result: Sent | ChannelError, now: datetime) -> Outcome:
        if isinstance(result, Sent):
            return Accepted(message, result.provider, result.provider_id)
        if result.transient and message.attempts < self.config.max_attempts:
            wait_for = (
                timedelta(seconds=result.retry_after)
                if result.retry_after
                else backoff(message.attempts, self.config, self.rng)
            )
            due = now + wait_for
            reason = f"attempt {message.attempts}: {result}; retry at {due:%H:%M:%S}"
            return Retry(message, due, reason)
        reason = (
            str(result)
            if not result.transient
            else f"gave up after {message.attempts} attempts: {result}"
        )
        suppression = None
        if isinstance(result, PermanentChannelError) and result.suppress:
            suppression = AddressSuppression(
                message.channel, message.to_address, result.reason, f"provider:{result.channel}"
            )
        return Finished(message, MessageStatus.FAILED, reason, suppression)

    def _prepare(
        self, session: Session, messages: Sequence[Message], now: datetime
    ) -> tuple[list[Outcome], list[_Ready]]:
        """Render every claimed message and re-check consent: the messages ready to send,
        and the outcomes of the others (cancelled, failed to render, held back)."""
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
        decided: list[Outcome] = []
        ready: list[_Ready] = []
        for message in messages:
            if message.kind == "staff":
                if (message.channel, message.to_address) in staff_suppressed:
                    decided.append(
                        Finished(message, MessageStatus.CANCELLED, "the address is suppressed")
                    )
                    continue
                facts: dict[str, Any] = {}
                customer: dict[str, Any] = {"id": message.customer_id}
            else:
                row = rows.get(message.customer_id or "")
                if row is None:
                    decided.append(
                        Finished(message, MessageStatus.FAILED, "the customer no longer exists")
                    )
                    continue
                facts = build_facts(
                    row,
                    self.rules.catalog,
                    now,
                    open_complaints=complaints.get(row.id, 0),
                    suppressed=suppressed,
                    stages=self.rules.stages,
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
                    reason = f"at send time: {refused.reason}"
                    decided.append(Finished(message, MessageStatus.CANCELLED, reason))
                    continue
                paused = complaint_pause(proposal, facts, now)
                if paused is not None:
                    until = now + self.config.pause_recheck
                    decided.append(Deferred(message, until, paused.reason))
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
                ready.append(_Ready(message, self._render(message, customer, facts)))
            except (TemplateError, ValueError) as exc:
                reason = f"render failed: {exc}"
                decided.append(Finished(message, MessageStatus.FAILED, reason))
        return decided, ready

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


def _part(recorded: Recorded, outcomes: Sequence[Outcome]) -> Recorded:
    """The share of a group's record that belongs to these outcomes."""
    ids = {o.message.id for o in outcomes}
    return Recorded(applied=recorded.applied & ids, late=recorded.late & ids)

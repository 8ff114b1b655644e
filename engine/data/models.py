"""The SQL data model: customers, events, journeys, the outbox, escalations and the audit log.

Times are aware UTC datetimes everywhere in the engine; SQLModel's UTCDateTime column type
refuses naive ones and hands back UTC (SQLite stores them without an offset). A customer's
own time zone is applied only where local time matters (quiet hours, display).

Journey state lives here, never in the rules engine. The customer row also carries
roll-ups of the events it has seen (orders, spend, last activity, latest NPS), updated in
the same transaction as each event is ingested, so the facts for a batch of customers come
from one indexed query instead of an aggregate over the whole events table.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, String, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from engine.statuses import EnrollmentStatus, EscalationStatus, MessageStatus

__all__ = [
    "Customer",
    "Decision",
    "EngineState",
    "Enrollment",
    "EnrollmentStatus",
    "Escalation",
    "EscalationNote",
    "EscalationStatus",
    "Erasure",
    "Event",
    "Message",
    "MessageStatus",
    "StageTransition",
    "Suppression",
    "Tick",
    "TickTask",
    "WebhookReceipt",
    "WorkerSeen",
]

# Statuses (engine.statuses) are stored as their plain text values (VARCHAR, not a
# database enum), so raw SQL, reports and later additions need no type migration.


class Customer(SQLModel, table=True):
    __tablename__ = "customers"

    id: str = Field(primary_key=True, max_length=64)
    email: str | None = Field(default=None, max_length=320, index=True)
    phone: str | None = Field(default=None, max_length=16, index=True)  # E.164
    first_name: str | None = Field(default=None, max_length=100)
    timezone: str = Field(default="UTC", max_length=64)  # IANA
    locale: str = Field(default="en-GB", max_length=16)
    email_opt_in: bool = False
    email_opt_in_at: datetime | None = None
    email_opt_out_at: datetime | None = None
    sms_opt_in: bool = False
    sms_opt_in_at: datetime | None = None
    sms_opt_out_at: datetime | None = None  # STOP received
    attributes: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # The preference centre: the customer's own choices of subscription topics (declared in
    # rules/catalog.yaml), {"offers": {"opted_in": false, "at": "<ISO time>", "via": "..."}};
    # a topic not listed takes its default (engine.data.topics).
    topics: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False, server_default="{}")
    )
    signed_up_at: datetime
    # Roll-ups of ingested events, maintained by engine.data.ingest in the event's transaction.
    orders_count: int = 0
    total_spend_cents: int = Field(default=0, sa_type=BigInteger)  # cents: past 2**31 on PostgreSQL
    last_order_at: datetime | None = None
    last_activity_at: datetime | None = None
    nps_score: int | None = None
    # Bumped on every change that can change the customer's facts, so an incremental tick
    # re-evaluates exactly the customers whose facts may have moved.
    changed_at: datetime = Field(index=True)
    created_at: datetime
    updated_at: datetime
    # Set by a GDPR erasure (engine.usecases.gdpr): the personal data is gone, the row and
    # its counts stay.
    erased_at: datetime | None = None
    # The lifecycle stage (rules/stages.yaml) the last evaluation recorded, since when, and
    # the one before it; written by the journey store when it changes (never bumps
    # changed_at: the evaluation that changed it already saw the new stage).
    stage: str | None = Field(default=None, max_length=64)
    stage_since: datetime | None = None
    previous_stage: str | None = Field(default=None, max_length=64)


class StageTransition(SQLModel, table=True):
    """A customer's move from one stage to another (from None: their first stage), when,
    and under which rules version: the history behind the transition matrix."""

    __tablename__ = "stage_transitions"
    __table_args__ = (
        Index("ix_stage_transitions_at", "at"),
        Index("ix_stage_transitions_customer_at", "customer_id", "at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    customer_id: str = Field(foreign_key="customers.id", max_length=64)
    from_stage: str | None = Field(default=None, max_length=64)
    to_stage: str = Field(max_length=64)
    at: datetime
    rules_version: str = Field(max_length=64)


class Event(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_customer_occurred", "customer_id", "occurred_at"),
        # The events still to evaluate, by customer: a sweep reads them shard by shard.
        Index(
            "ix_events_pending",
            "customer_id",
            "occurred_at",
            sqlite_where=text("evaluated_at IS NULL"),
            postgresql_where=text("evaluated_at IS NULL"),
        ),
    )

    id: str = Field(primary_key=True, max_length=128)  # the sender's id: ingestion is idempotent
    customer_id: str = Field(foreign_key="customers.id", max_length=64)
    type: str = Field(max_length=64, index=True)
    properties: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    occurred_at: datetime
    received_at: datetime
    evaluated_at: datetime | None = None  # None: not yet evaluated


class Enrollment(SQLModel, table=True):
    __tablename__ = "enrollments"
    __table_args__ = (
        # One live enrollment per customer and playbook: active_key is "customer|playbook"
        # while active and NULL afterwards (NULLs never collide, on SQLite and PostgreSQL).
        UniqueConstraint("active_key", name="uq_enrollments_active_key"),
        # The n-th entry of a customer into a playbook can exist once: two evaluators that
        # both saw n-1 earlier entries cannot both enter, even if one already finished.
        UniqueConstraint("customer_id", "playbook", "entry_number", name="uq_enrollments_entry"),
        Index("ix_enrollments_customer_playbook", "customer_id", "playbook"),
        Index("ix_enrollments_status_due", "status", "next_due_at"),
        Index("ix_enrollments_playbook_arm", "playbook", "arm"),
    )

    id: int | None = Field(default=None, primary_key=True)
    customer_id: str = Field(foreign_key="customers.id", max_length=64)
    playbook: str = Field(max_length=64)
    status: EnrollmentStatus = Field(default=EnrollmentStatus.ACTIVE, sa_type=String(16))
    active_key: str | None = Field(default=None, max_length=140)
    entry_number: int = 1
    # The id of the step to run next (of the rules in force when it runs); None once every
    # step has run, while the journey waits for its last message's due time to complete.
    step_id: str | None = Field(default=None, max_length=64)
    next_due_at: datetime | None = None
    # Bumped by every change: a writer moves the row only from the version it read, so an
    # evaluator that lost a race to another changes nothing.
    version: int = 0
    # Messages this enrollment queued (one that queued none and was left starts no re-entry
    # cooldown: engine.journeys.plan, "Re-entry").
    queued_count: int = 0
    # The journey graph: the split arm taken ("holdout" and "control": sent nothing); since
    # when it waits for an event; its latest message (or held-out send), which a
    # conversion is credited to; and the conversion, once.
    arm: str | None = Field(default=None, max_length=64)
    waiting_since: datetime | None = None
    last_touch_at: datetime | None = None
    last_touch_step: str | None = Field(default=None, max_length=64)
    converted_at: datetime | None = None
    conversion_event_id: str | None = Field(default=None, max_length=128)
    conversion_step: str | None = Field(default=None, max_length=64)
    rules_version: str = Field(max_length=64)
    trigger_event_id: str | None = Field(default=None, max_length=128)
    # Why the next step is being held back (complaint pause, frequency cap...), so a
    # decision row is written when the reason changes, not on every tick.
    hold_reason: str | None = Field(default=None, max_length=200)
    entered_at: datetime
    ended_at: datetime | None = None
    end_reason: str | None = Field(default=None, max_length=200)


class Message(SQLModel, table=True):
    """The outbox: written in the same transaction as the enrollment step that queues it."""

    __tablename__ = "messages"
    __table_args__ = (
        # A step is sent at most once per enrollment, even when two evaluators race.
        UniqueConstraint("dedupe_key", name="uq_messages_dedupe_key"),
        Index("ix_messages_status_due", "status", "due_at"),
        Index("ix_messages_customer", "customer_id", "created_at"),
        # Exiting a journey cancels its queued messages by enrollment.
        Index("ix_messages_enrollment", "enrollment_id", "status"),
    )

    id: str = Field(primary_key=True, max_length=36)
    # "journey:<customer>:<playbook>:<entry>:<step>" or "case:...": see engine.journeys.plan
    dedupe_key: str = Field(max_length=200)
    customer_id: str | None = Field(default=None, max_length=64)
    enrollment_id: int | None = Field(default=None, foreign_key="enrollments.id")
    escalation_id: int | None = Field(default=None)
    playbook: str | None = Field(default=None, max_length=64)
    step_id: str | None = Field(default=None, max_length=64)
    kind: str = Field(default="marketing", max_length=16)  # marketing | transactional | staff
    channel: str = Field(max_length=8)  # email | sms
    template: str = Field(max_length=100)
    to_address: str = Field(max_length=320)
    context: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    priority: int = 100
    status: MessageStatus = Field(default=MessageStatus.QUEUED, sa_type=String(16))
    due_at: datetime
    attempts: int = 0
    claimed_by: str | None = Field(default=None, max_length=100)
    claimed_at: datetime | None = None  # the engine's ``now`` of the claiming tick
    # The claim that holds the row (a fresh token per claimed batch): every write after
    # the provider call is guarded by it, so a dispatcher that lost its claim changes
    # nothing. Leases use one clock, never a tick's ``now`` (simulations run on a fake
    # one): the database's on PostgreSQL, the machine's on SQLite. See
    # engine.delivery.dispatch for the recovery rule.
    claim_token: str | None = Field(default=None, max_length=32)
    lease_expires_at: datetime | None = None
    # Stamped (lease clock) and committed just before this message's own provider call:
    # a dispatcher that dies with this unset never reached the provider (safe to
    # retry); with it set, it may have.
    attempted_at: datetime | None = None
    # An ambiguous row: when settlement may ask the provider about it next (lease clock).
    settle_after: datetime | None = None
    # SHA-256 of the SMS body handed to the provider, so settlement can recognise the
    # message among the provider's records (Twilio returns bodies, not our ids).
    body_digest: str | None = Field(default=None, max_length=64)
    provider: str | None = Field(default=None, max_length=16)
    provider_id: str | None = Field(default=None, max_length=100, index=True)
    last_error: str | None = Field(default=None, max_length=1000)
    created_at: datetime
    sent_at: datetime | None = None
    updated_at: datetime


class Escalation(SQLModel, table=True):
    __tablename__ = "escalations"
    __table_args__ = (Index("ix_escalations_status_sla", "status", "sla_due_at"),)

    id: int | None = Field(default=None, primary_key=True)
    customer_id: str = Field(foreign_key="customers.id", max_length=64, index=True)
    reason: str = Field(max_length=500)
    trigger_event_id: str | None = Field(default=None, max_length=128)
    priority: str = Field(default="normal", max_length=16)  # urgent | high | normal | low
    queue: str = Field(default="support", max_length=64)
    status: EscalationStatus = Field(default=EscalationStatus.OPEN, sa_type=String(16))
    owner: str | None = Field(default=None, max_length=100)
    sla_due_at: datetime
    notified_tier: int = 0  # the highest roster tier notified so far
    breach_notified_at: datetime | None = None  # the one breach notification went out
    opened_at: datetime
    acknowledged_at: datetime | None = None
    resolved_at: datetime | None = None
    updated_at: datetime


class EscalationNote(SQLModel, table=True):
    """The history of a case: every change, who made it and why."""

    __tablename__ = "escalation_history"

    id: int | None = Field(default=None, primary_key=True)
    escalation_id: int = Field(foreign_key="escalations.id", index=True)
    at: datetime
    actor: str = Field(max_length=100)
    action: str = Field(max_length=32)
    note: str = Field(default="", max_length=2000)


class Suppression(SQLModel, table=True):
    """An address or number that must get nothing more (bounce, spam report, STOP...)."""

    __tablename__ = "suppressions"
    __table_args__ = (UniqueConstraint("channel", "address", name="uq_suppressions_address"),)

    id: int | None = Field(default=None, primary_key=True)
    channel: str = Field(max_length=8)
    address: str = Field(max_length=320)
    reason: str = Field(max_length=200)
    source: str = Field(max_length=100)
    created_at: datetime


class Erasure(SQLModel, table=True):
    """The audit of a GDPR erasure: whose data, when, on whose request, and how many rows
    of each kind were erased or anonymised. It holds no personal data itself."""

    __tablename__ = "erasures"

    id: int | None = Field(default=None, primary_key=True)
    customer_id: str = Field(max_length=64, index=True)
    erased_at: datetime
    erased_by: str = Field(max_length=100)
    counts: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Decision(SQLModel, table=True):
    """The audit log: every outcome, with the facts it saw, so 'why' has one answer."""

    __tablename__ = "decisions"
    __table_args__ = (Index("ix_decisions_customer_at", "customer_id", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    at: datetime
    customer_id: str = Field(max_length=64)
    playbook: str = Field(max_length=64, index=True)
    step_id: str | None = Field(default=None, max_length=64)
    outcome: str = Field(max_length=16)  # enrolled queued deferred skipped exited completed ...
    reason: str = Field(default="", max_length=500)
    until: datetime | None = None
    enrollment_id: int | None = None
    message_id: str | None = Field(default=None, max_length=36)
    rules_version: str = Field(default="", max_length=64)
    facts: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class WebhookReceipt(SQLModel, table=True):
    """Provider event ids already processed: a webhook delivered twice has the effect of one."""

    __tablename__ = "webhook_receipts"
    __table_args__ = (
        UniqueConstraint("provider", "event_key", name="uq_webhook_receipts"),
        Index("ix_webhook_receipts_received", "received_at"),  # pruning (housekeeping)
    )

    id: int | None = Field(default=None, primary_key=True)
    provider: str = Field(max_length=16)
    event_key: str = Field(max_length=200)
    received_at: datetime


class EngineState(SQLModel, table=True):
    """Small named values the scheduler keeps between ticks (watermarks, last sweep)."""

    __tablename__ = "engine_state"

    name: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=200)
    updated_at: datetime


class StaffSession(SQLModel, table=True):
    """A signed-in console session, so that it can be ended server-side.

    The cookie carries a random token; only its SHA-256 is stored, so a copy of this table
    signs nobody in. A session is valid while it is not revoked (sign-out, ``lifecycle
    staff revoke``), not expired, and its staff member's password hash still has the
    fingerprint it had at sign-in (a changed password ends every session of that account).
    """

    __tablename__ = "staff_sessions"
    __table_args__ = (Index("ix_staff_sessions_staff", "staff", "revoked_at"),)

    id: str = Field(primary_key=True, max_length=64)  # sha256 hex of the cookie's token
    staff: str = Field(max_length=100)
    fingerprint: str = Field(max_length=64)
    client: str = Field(default="", max_length=64)  # the address it signed in from
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None


class SignInAttempt(SQLModel, table=True):
    """A failed console sign-in, counted per account and per client address (one row
    each) in a moving window; shared by every serve process through the database."""

    __tablename__ = "sign_in_attempts"
    __table_args__ = (Index("ix_sign_in_attempts_key_at", "key", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=200)  # "account:<name>" or "address:<ip>"
    at: datetime


class Tick(SQLModel, table=True):
    """One planned tick of the distributed runner (engine.runners.distributed): its kind,
    its ``now``, the rules version its tasks must be run with, and how many tasks it has.
    ``completed_at`` is set, once, by the task that finishes last; only then does an
    incremental tick's ``watermark`` become the evaluation watermark."""

    __tablename__ = "ticks"
    __table_args__ = (Index("ix_ticks_kind_completed", "kind", "completed_at"),)

    id: str = Field(primary_key=True, max_length=40)
    kind: str = Field(max_length=16)  # evaluate, full_sweep, realtime, dispatch, sla
    now: datetime
    rules_version: str = Field(max_length=64)
    tasks: int
    watermark: str | None = Field(default=None, max_length=40)
    planned_at: datetime
    completed_at: datetime | None = None


class TickTask(SQLModel, table=True):
    """One task of a tick (an evaluation shard, a dispatch batch, an SLA check): the
    task-run key (tick, number) that makes a redelivered task a no-op once it is done."""

    __tablename__ = "tick_tasks"

    tick_id: str = Field(foreign_key="ticks.id", primary_key=True, max_length=40)
    number: int = Field(primary_key=True)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    enqueued_at: datetime
    runs: int = 0  # how many times a worker started it (more than 1: redelivered)
    done_at: datetime | None = None
    worker: str | None = Field(default=None, max_length=100)
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class WorkerSeen(SQLModel, table=True):
    """A `lifecycle worker` process, as last seen (a heartbeat every few seconds)."""

    __tablename__ = "workers_seen"

    id: str = Field(primary_key=True, max_length=100)  # host:pid
    rules_version: str | None = Field(default=None, max_length=64)
    started_at: datetime
    seen_at: datetime

"""The journey planner's vocabulary, as plain data: what it reads and what it decides.

The store (engine.journeys.store) loads a ``CustomerSnapshot`` per customer of a batch;
the planner (engine.journeys.plan) turns snapshots and evaluations into a ``Plan``: per
customer, a list of effects; the store writes them set-based. Nothing here does I/O.

Rows created by a plan do not have their database ids yet: effects name them by a key
(an enrollment's key is ``customer|playbook|entry number``, a case's
``case:<customer>:<opening event or step>``), and the store resolves keys to the ids it
allocates. A reference to a row is therefore ``int`` (an existing row) or ``str`` (a row
of this plan).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from engine.statuses import EnrollmentStatus

Ref = int | str  # an existing row's id, or the key of a row this plan creates


# ---------------------------------------------------------------- the snapshot (read)


@dataclass(frozen=True, slots=True)
class Journey:
    """An active enrollment as the store read it."""

    id: int
    playbook: str
    step_id: str | None  # None: every step done, completing at due_at
    due_at: datetime | None
    version: int
    hold_reason: str | None
    entry_number: int
    entered_at: datetime
    queued_count: int
    trigger_event_id: str | None
    arm: str | None = None  # the split arm it took, "holdout" or "control"
    waiting_since: datetime | None = None  # waiting for an event (its step's wait_for)
    last_touch_at: datetime | None = None  # its latest message (or held-out send)
    last_touch_step: str | None = None
    converted_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Touched:
    """An ended enrollment whose latest message is recent enough that its goal can still
    be credited to it (within the playbook's attribution window), not yet converted."""

    id: int
    playbook: str
    arm: str | None
    last_touch_at: datetime
    last_touch_step: str | None


@dataclass(frozen=True, slots=True)
class Entries:
    """A customer's past on one playbook: how many entries, and when a cooldown began."""

    last_number: int
    cooldown_from: datetime | None  # entered_at of the latest entry that queued a message


@dataclass(frozen=True, slots=True)
class OpenCase:
    """The customer's unresolved escalation case (a repeat complaint joins it)."""

    id: int
    priority: str


@dataclass(frozen=True)
class CustomerSnapshot:
    """One customer's journey state. ``recent`` and ``open_case`` are loaded only for
    customers with something to plan (see ``plan.has_work``)."""

    customer_id: str
    active: Mapping[str, Journey] = field(default_factory=dict)  # by playbook
    entries: Mapping[str, Entries] = field(default_factory=dict)  # by playbook
    recent: tuple[tuple[datetime, str], ...] = ()  # (due, channel) of counted marketing
    open_case: OpenCase | None = None
    touched: tuple[Touched, ...] = ()  # ended, and still within a goal's window


# ---------------------------------------------------------------- effects (decided)


@dataclass(frozen=True, slots=True)
class JourneyState:
    """Where an enrollment stands after the plan: written whole by Enroll and Move."""

    status: EnrollmentStatus
    step_id: str | None
    due_at: datetime | None
    hold_reason: str | None
    queued_count: int
    ended_at: datetime | None = None
    end_reason: str | None = None
    arm: str | None = None
    waiting_since: datetime | None = None
    last_touch_at: datetime | None = None
    last_touch_step: str | None = None
    converted_at: datetime | None = None
    conversion_event_id: str | None = None
    conversion_step: str | None = None


@dataclass(frozen=True, slots=True)
class Convert:
    """An ended enrollment's goal came within its window: the conversion is credited to
    it (guarded: an enrollment converts once)."""

    enrollment_id: int
    customer_id: str
    at: datetime
    event_id: str | None
    step_id: str | None


@dataclass(frozen=True, slots=True)
class ClaimEvents:
    """Mark the customer's evaluated events consumed, or lose the race for them."""

    event_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Enroll:
    """A new enrollment, inserted with its state at the end of this plan."""

    key: str
    customer_id: str
    playbook: str
    entry_number: int
    trigger_event_id: str | None
    entered_at: datetime
    rules_version: str
    state: JourneyState


@dataclass(frozen=True, slots=True)
class Move:
    """An existing enrollment moves to ``state``, guarded by the version it was read at.

    ``kind`` says what happened (the store writes every kind with one statement):
    ``advance`` to another step, ``hold`` on the same step (a pause, a cap), ``end``."""

    enrollment_id: int
    version: int
    kind: str  # advance | hold | end
    state: JourneyState


@dataclass(frozen=True, slots=True)
class CancelQueued:
    """Cancel what the enrollment still has queued (it exited, converted or was cancelled)."""

    enrollment: Ref
    customer_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Queue:
    """A message into the outbox. ``dedupe_key`` is unique: a step goes at most once."""

    message_id: str
    dedupe_key: str
    customer_id: str
    enrollment: Ref | None
    case: Ref | None  # staff notifications: the case they are about
    playbook: str
    step_id: str
    kind: str  # marketing | transactional | staff
    channel: str
    template: str
    to_address: str  # staff messages only; a customer's address is resolved at send time
    context: dict[str, Any]
    priority: int
    due_at: datetime


@dataclass(frozen=True, slots=True)
class Decide:
    """A decision row: the audit log's answer to "why"."""

    customer_id: str
    playbook: str
    step_id: str | None
    outcome: str
    reason: str
    enrollment: Ref | None
    facts: Mapping[str, Any]  # shared by the customer's decisions of one evaluation
    until: datetime | None = None
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class OpenCaseEffect:
    """A new escalation case."""

    key: str
    customer_id: str
    reason: str
    trigger_event_id: str | None
    priority: str
    queue: str
    sla_due_at: datetime
    notified_tier: int


@dataclass(frozen=True, slots=True)
class JoinCase:
    """A repeat complaint joins the open case, raising its priority if it is more urgent."""

    case_id: int
    priority: str


@dataclass(frozen=True, slots=True)
class CaseNote:
    """A line of a case's history."""

    case: Ref
    actor: str
    action: str
    note: str


@dataclass(frozen=True, slots=True)
class TouchCustomer:
    """The customer's facts changed outside the customers table (a case opened): the next
    incremental tick must look at them again."""

    customer_id: str


@dataclass(frozen=True, slots=True)
class RecordStage:
    """The customer's lifecycle stage changed: recorded on the customer (guarded by the
    stage the evaluation read) and as a row of the stage history."""

    customer_id: str
    from_stage: str | None
    to_stage: str
    at: datetime
    rules_version: str


Effect = (
    ClaimEvents
    | Enroll
    | Move
    | Convert
    | CancelQueued
    | Queue
    | Decide
    | OpenCaseEffect
    | JoinCase
    | CaseNote
    | TouchCustomer
    | RecordStage
)


@dataclass(frozen=True)
class CustomerPlan:
    """Everything decided for one customer: applied together, or dropped together."""

    customer_id: str
    effects: tuple[Effect, ...]
    # What was decided, for the tick's report: (kind, playbook, channel or reason).
    tally: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class Plan:
    customers: tuple[CustomerPlan, ...]

    def without(self, customer_ids: Iterable[str]) -> Plan:
        dropped = set(customer_ids)
        return Plan(tuple(c for c in self.customers if c.customer_id not in dropped))

    def effects(self) -> Iterable[Effect]:
        for customer in self.customers:
            yield from customer.effects

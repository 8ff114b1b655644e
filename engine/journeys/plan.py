"""The journey planner: evaluations and a snapshot of journey state in, effects out.

``plan(snapshot, evaluations, rules, now) -> Plan`` decides every rule of a journey and
does nothing else: no database, no clock, no randomness (message ids are derived from
their dedupe keys), so every rule is a unit test of plain data. engine.journeys.store
loads the snapshot and writes the plan.

Per customer, in this order (the batch's events first, in the order they happened, so a
complaint that arrives with an entry pauses it):

1. each pending event: playbooks entered on that event type whose enter rule holds are
   entered (re-entry permitting) and their due steps run at once with the event's facts;
2. the sweep: playbooks without an event trigger whose enter rule holds are entered;
3. each active journey, by playbook priority (a frequency cap lets the lower number go
   first): its playbook or step removed → cancelled; goal reached → converted; exit
   condition holds → exited (no longer eligible); otherwise its due steps run.

A step either is skipped (its ``when`` is false, or consent is missing: the journey goes
on), held (an open complaint case pauses marketing; a frequency cap defers it; the step
stays due), dropped (a cap with ``when_capped: drop``: the journey ends, so no later step
follows up on a message that was never sent), or done (an escalation, a message queued,
deferred to the next allowed minute by quiet hours). After the last step the journey
completes when its last message is due, not before: until then it can still convert or
exit, which cancels that message.

Re-entry: a playbook is entered again only after its ``reentry`` cooldown, counted from
the latest entry that counts: one that queued a message, ran to completion, or had its
message dropped by a cap. An entry that ended before queueing anything because the
customer left (exited, converted) or the rules changed (cancelled) starts no cooldown:
a referral ask paused by a complaint and then left is asked again once the case is
resolved.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from engine.evaluation.model import Evaluation
from engine.journeys.effects import (
    CancelQueued,
    CaseNote,
    ClaimEvents,
    Convert,
    CustomerPlan,
    CustomerSnapshot,
    Decide,
    Effect,
    Enroll,
    Entries,
    JoinCase,
    Journey,
    JourneyState,
    Move,
    OpenCaseEffect,
    Plan,
    Queue,
    RecordStage,
    Ref,
    TouchCustomer,
)
from engine.journeys.policies import (
    Proposal,
    Skip,
    complaint_pause,
    consent,
    frequency_caps,
    quiet_hours,
)
from engine.language import conditions
from engine.language.durations import format_duration
from engine.playbooks.model import (
    CONTROL_ARM,
    HOLDOUT_ARM,
    RESERVED_ARMS,
    Arm,
    Playbook,
    RuleSet,
    Split,
    Step,
    branch_rule,
    enter_rule,
    exit_rule,
    goal_event_rule,
    goal_rule,
    step_rule,
    wait_rule,
)
from engine.stages.model import StageChange
from engine.statuses import EnrollmentStatus

__all__ = [
    "changes_stage",
    "stage_plans",
    "has_work",
    "may_enter",
    "message_id_for",
    "plan",
    "resolve_step",
]

# Message ids are derived from the dedupe key: the same step of the same enrollment gets
# the same id in every process, so even the primary key refuses a second copy.
_MESSAGE_NAMESPACE = uuid.UUID("6f4c1a52-54d1-4f0e-9a4c-6b1f3c0e9d27")
PRIORITY_ORDER = {"urgent": 0, "high": 1, "normal": 2, "low": 3}
HELD_OUT = {
    HOLDOUT_ARM: "held out: this playbook's holdout, sent nothing",
    CONTROL_ARM: "held out: the global control group, sent no marketing",
}
# Endings that start a re-entry cooldown even when nothing was queued (module docstring).
COOLDOWN_ENDINGS = (EnrollmentStatus.COMPLETED, EnrollmentStatus.DROPPED)
REMOVED_PLAYBOOK_PRIORITY = 10**6


def message_id_for(dedupe_key: str) -> str:
    return str(uuid.uuid5(_MESSAGE_NAMESPACE, dedupe_key))


def journey_dedupe_key(customer_id: str, playbook: str, entry_number: int, step_id: str) -> str:
    return f"journey:{customer_id}:{playbook}:{entry_number}:{step_id}"


# ---------------------------------------------------------------- entry points


def plan(
    snapshot: Mapping[str, CustomerSnapshot],
    evaluations: Sequence[Evaluation],
    rules: RuleSet,
    now: datetime,
) -> Plan:
    """Decide everything for the customers of ``evaluations``; see the module docstring."""
    customers = []
    for customer_id, (sweep, events) in _by_customer(evaluations).items():
        known = snapshot.get(customer_id) or CustomerSnapshot(customer_id)
        planner = _CustomerPlanner(known, rules, now, sweep)
        planner.run(events)
        customers.append(planner.result())
    return Plan(tuple(customers))


def has_work(
    snapshot: CustomerSnapshot,
    evaluations: Sequence[Evaluation],
    rules: RuleSet,
    now: datetime,
) -> bool:
    """Whether planning the customer can change anything (most of a sweep cannot): the
    store loads the rest of the snapshot only for those that can."""
    sweep = next((e for e in evaluations if e.subject.event_id is None), None)
    if len(evaluations) > (1 if sweep is not None else 0):
        return True  # pending events are consumed, whatever they lead to
    for playbook_id, journey in snapshot.active.items():
        playbook = rules.playbooks.get(playbook_id)
        if playbook is None or journey.due_at is None or journey.due_at <= now:
            return True
        if journey.step_id is not None and playbook.step(journey.step_id) is None:
            return True
        if sweep is not None and (
            exit_rule(playbook_id) in sweep.fired or goal_rule(playbook_id) in sweep.fired
        ):
            return True
    if sweep is None:
        return False
    return any(
        playbook.enter_on is None
        and playbook.id not in snapshot.active
        and enter_rule(playbook.id) in sweep.fired
        and may_enter(playbook, snapshot.entries.get(playbook.id), now)
        and not _ends_at_once(playbook, sweep.fired)
        for playbook in rules.playbooks.values()
    )


def stage_plans(evaluations: Sequence[Evaluation], rules: RuleSet, now: datetime) -> Plan:
    """The plans of customers whose journeys cannot move (``has_work`` is false) but whose
    stage changes: the ``RecordStage`` alone, without running the journey planner (the
    first sweep under a stage model gives every customer a stage)."""
    customers = []
    for evaluation in evaluations:
        change = evaluation.subject.stage_change
        if change is not None:
            effect, tally = _record_stage(evaluation.subject.customer_id, change, rules, now)
            customers.append(CustomerPlan(effect.customer_id, (effect,), (tally,)))
    return Plan(tuple(customers))


def _record_stage(
    customer_id: str, change: StageChange, rules: RuleSet, now: datetime
) -> tuple[RecordStage, tuple[str, str, str]]:
    effect = RecordStage(customer_id, change.from_stage, change.to_stage, now, rules.version)
    return effect, ("stage", change.from_stage or "", change.to_stage)


def changes_stage(evaluations: Sequence[Evaluation]) -> bool:
    """Whether the customer's stage changes at this evaluation: planned (for the
    ``RecordStage`` alone) even when ``has_work`` says no journey can move."""
    return any(e.subject.stage_change is not None for e in evaluations)


def _by_customer(
    evaluations: Sequence[Evaluation],
) -> dict[str, tuple[Evaluation | None, list[Evaluation]]]:
    grouped: dict[str, tuple[Evaluation | None, list[Evaluation]]] = {}
    for evaluation in evaluations:
        customer_id = evaluation.subject.customer_id
        sweep, events = grouped.get(customer_id, (None, []))
        if evaluation.subject.event_id is None:
            sweep = evaluation
        else:
            events.append(evaluation)
        grouped[customer_id] = (sweep, events)
    for _, events in grouped.values():
        events.sort(key=_event_order)
    return grouped


def _event_order(evaluation: Evaluation) -> tuple[datetime, str]:
    subject = evaluation.subject
    assert subject.occurred_at is not None and subject.event_id is not None
    return (subject.occurred_at, subject.event_id)


@dataclass(frozen=True)
class _Order:
    """The playbooks of a rules version by priority (a frequency cap lets the lower
    number go first), with their enter rule ids: worked out once, used per customer."""

    on_event: Mapping[str, tuple[tuple[Playbook, str], ...]]
    on_sweep: tuple[tuple[Playbook, str], ...]


_ORDERS: dict[str, _Order] = {}


def _order(rules: RuleSet) -> _Order:
    found = _ORDERS.get(rules.version)
    if found is None:
        ranked = sorted(rules.playbooks.values(), key=lambda p: (p.priority, p.id))
        on_event: dict[str, list[tuple[Playbook, str]]] = {}
        for playbook in ranked:
            if playbook.enter_on is not None:
                on_event.setdefault(playbook.enter_on, []).append(
                    (playbook, enter_rule(playbook.id))
                )
        found = _ORDERS[rules.version] = _Order(
            {kind: tuple(entries) for kind, entries in on_event.items()},
            tuple((p, enter_rule(p.id)) for p in ranked if p.enter_on is None),
        )
    return found


def may_enter(playbook: Playbook, entries: Entries | None, now: datetime) -> bool:
    """Re-entry: never, or after the cooldown since the latest entry that sent something."""
    if entries is None or entries.cooldown_from is None:
        return True
    return playbook.reentry is not None and now >= entries.cooldown_from + playbook.reentry


def _ends_at_once(playbook: Playbook, fired: frozenset[str]) -> bool:
    """Entering would only end again: the goal is reached, or the customer is not eligible."""
    return exit_rule(playbook.id) in fired or goal_rule(playbook.id) in fired


# ---------------------------------------------------------------- one customer


@dataclass(slots=True)
class _Place:
    """Where an enrollment stands while the plan is being made (JourneyState, mutable)."""

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

    @classmethod
    def of(cls, journey: Journey) -> _Place:
        return cls(
            EnrollmentStatus.ACTIVE,
            journey.step_id,
            journey.due_at,
            journey.hold_reason,
            journey.queued_count,
            arm=journey.arm,
            waiting_since=journey.waiting_since,
            last_touch_at=journey.last_touch_at,
            last_touch_step=journey.last_touch_step,
            converted_at=journey.converted_at,
        )

    def frozen(self) -> JourneyState:
        return JourneyState(
            self.status,
            self.step_id,
            self.due_at,
            self.hold_reason,
            self.queued_count,
            self.ended_at,
            self.end_reason,
            self.arm,
            self.waiting_since,
            self.last_touch_at,
            self.last_touch_step,
            self.converted_at,
            self.conversion_event_id,
            self.conversion_step,
        )

    def goto(self, step_id: str | None, due_at: datetime) -> None:
        self.step_id, self.due_at, self.hold_reason, self.waiting_since = (
            step_id,
            due_at,
            None,
            None,
        )


@dataclass(slots=True)
class _Working:
    """An enrollment while the plan is being made: the row as read (or new) and where it
    stands now."""

    playbook: Playbook | None
    ref: Ref
    state: _Place
    entry_number: int
    trigger_event_id: str | None
    read: Journey | None = None  # None: created by this plan
    entered_at: datetime | None = None  # new ones only

    @property
    def active(self) -> bool:
        return self.state.status is EnrollmentStatus.ACTIVE

    @property
    def held_out(self) -> bool:
        """Held out (the playbook's holdout, the global control group): sent nothing."""
        return self.state.arm in RESERVED_ARMS

    def effect(self, customer_id: str, rules: RuleSet) -> Effect | None:
        if self.read is None:
            assert isinstance(self.ref, str) and self.playbook and self.entered_at
            return Enroll(
                key=self.ref,
                customer_id=customer_id,
                playbook=self.playbook.id,
                entry_number=self.entry_number,
                trigger_event_id=self.trigger_event_id,
                entered_at=self.entered_at,
                rules_version=rules.version,
                state=self.state.frozen(),
            )
        read = self.read
        state = self.state.frozen()
        if state == _Place.of(read).frozen():
            return None
        if not self.active:
            kind = "end"
        elif self.state.step_id != read.step_id:
            kind = "advance"
        else:
            kind = "hold"
        return Move(read.id, read.version, kind, state)


@dataclass
class _Case:
    """The customer's open case as the plan goes: read, or opened by this plan."""

    ref: Ref
    priority: str
    opened: OpenCaseEffect | None = None  # when opened by this plan
    raised_to: str | None = None  # a repeat complaint's higher priority


def share_of(key: str) -> float:
    """A stable number in [0, 1) for a key: the same in every run and every process (a
    hash, not a random draw), so re-evaluation and every worker agree on who is held out
    and which arm of a split a customer takes."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_control_group(rules: RuleSet, customer_id: str) -> bool:
    """The global control group: customers who get no marketing at all."""
    share = rules.policies.control_group
    return share > 0 and share_of(f"control:{customer_id}") < share


def arm_of(split: Split, playbook: str, step: str, customer_id: str) -> Arm:
    """The arm of a split a customer takes, by weight, the same on every run."""
    point = share_of(f"split:{playbook}:{step}:{customer_id}") * split.total
    for arm in split.arms:
        point -= arm.weight
        if point < 0:
            return arm
    return split.arms[-1]


class _CustomerPlanner:
    def __init__(
        self,
        snapshot: CustomerSnapshot,
        rules: RuleSet,
        now: datetime,
        sweep: Evaluation | None,
    ) -> None:
        self.customer_id = snapshot.customer_id
        self.rules = rules
        self.now = now
        self.sweep = sweep
        self.entries = dict(snapshot.entries)
        self.recent = list(snapshot.recent)
        self.touched_before = list(snapshot.touched)
        self.case: _Case | None = (
            _Case(snapshot.open_case.id, snapshot.open_case.priority)
            if snapshot.open_case is not None
            else None
        )
        self.journeys: dict[str, _Working] = {
            playbook_id: self._working(journey) for playbook_id, journey in snapshot.active.items()
        }
        # Every enrollment the plan touches, including one that ended in this plan and
        # was entered again (a second complaint in the batch): each is written.
        self.touched: list[_Working] = list(self.journeys.values())
        self.effects: list[Effect] = []
        self.tally: list[tuple[str, str, str]] = []
        self._documents: dict[int, dict[str, Any]] = {}

    def _working(self, journey: Journey) -> _Working:
        return _Working(
            playbook=self.rules.playbooks.get(journey.playbook),
            ref=journey.id,
            state=_Place.of(journey),
            entry_number=journey.entry_number,
            trigger_event_id=journey.trigger_event_id,
            read=journey,
        )

    # ------------------------------------------------------------ the order of things

    def run(self, events: Sequence[Evaluation]) -> None:
        claimed = tuple(e.subject.event_id for e in events if e.subject.event_id is not None)
        if claimed:
            self.effects.append(ClaimEvents(claimed))
        change = self.sweep.subject.stage_change if self.sweep is not None else None
        if change is not None:
            effect, tally = _record_stage(self.customer_id, change, self.rules, self.now)
            self.effects.append(effect)
            self.tally.append(tally)
        order = _order(self.rules)
        for event in events:
            self._event_came(event)
            for playbook, rule in order.on_event.get(event.subject.event_type or "", ()):
                if rule in event.fired:
                    self._enter(playbook, event)
        if self.sweep is not None:
            for playbook, rule in order.on_sweep:
                if rule in self.sweep.fired:
                    self._enter(playbook, self.sweep)
        for working in sorted(self.journeys.values(), key=self._priority_of):
            if working.active:
                self._move_on(working)

    def result(self) -> CustomerPlan:
        effects = list(self.effects)
        for working in self.touched:
            effect = working.effect(self.customer_id, self.rules)
            if effect is not None:
                effects.append(effect)
        if self.case is not None:
            if self.case.opened is not None:
                opened = self.case.opened
                priority = self.case.raised_to or opened.priority
                effects.append(replace(opened, priority=priority))
            elif self.case.raised_to is not None:
                assert isinstance(self.case.ref, int)
                effects.append(JoinCase(self.case.ref, self.case.raised_to))
        return CustomerPlan(self.customer_id, tuple(effects), tuple(self.tally))

    @staticmethod
    def _priority_of(working: _Working) -> tuple[int, str]:
        if working.playbook is None:
            return (REMOVED_PLAYBOOK_PRIORITY, str(working.ref))
        return (working.playbook.priority, working.playbook.id)

    # ------------------------------------------------------------ an event came

    def _event_came(self, event: Evaluation) -> None:
        """What an event does to the customer's journeys before any entry: it ends the
        waits it answers, and it may be a playbook's goal."""
        subject = event.subject
        occurred = subject.occurred_at
        assert occurred is not None
        facts, fired = subject.facts, event.fired
        if self.sweep is not None:
            fired = fired | self.sweep.fired
        for working in sorted(self.journeys.values(), key=self._priority_of):
            playbook = working.playbook
            if not working.active or playbook is None:
                continue
            step = playbook.step(working.state.step_id or "")
            waited = (
                step is not None
                and step.wait_for is not None
                and (
                    working.state.waiting_since is not None
                    and working.state.waiting_since <= occurred
                    and wait_rule(playbook.id, step.id) in event.fired
                )
            )
            goal = playbook.goal_event is not None and goal_event_rule(playbook.id) in event.fired
            if goal:
                self._convert(working, occurred, subject.event_id)
            if waited:
                assert step is not None and step.wait_for is not None
                reason = f"{subject.event_type} event {subject.event_id} came"
                self._decide(working, step.id, "event came", reason, facts)
                target = step.wait_for.then
                self._goto(working, playbook, target, facts)
                self._run_due(working, facts, fired)
            elif goal:
                self._finish_early(
                    working,
                    EnrollmentStatus.CONVERTED,
                    "goal reached",
                    playbook,
                    facts,
                    source=f"{subject.event_type} event {subject.event_id}",
                )
        for touched in list(self.touched_before):
            playbook = self.rules.playbooks.get(touched.playbook)
            if (
                playbook is not None
                and playbook.goal_event is not None
                and goal_event_rule(playbook.id) in event.fired
                and touched.last_touch_at
                <= occurred
                <= touched.last_touch_at + playbook.goal_within
            ):
                self.effects.append(
                    Convert(
                        touched.id,
                        self.customer_id,
                        occurred,
                        subject.event_id,
                        touched.last_touch_step,
                    )
                )
                self.tally.append(("conversion", playbook.id, touched.arm or ""))
                self.touched_before.remove(touched)

    def _convert(self, working: _Working, at: datetime, event_id: str | None) -> None:
        """Credit the goal to this enrollment's latest message (or held-out send), when it
        came within the playbook's attribution window; once per enrollment."""
        playbook, state = working.playbook, working.state
        if playbook is None or state.converted_at is not None or state.last_touch_at is None:
            return
        if not state.last_touch_at <= at <= state.last_touch_at + playbook.goal_within:
            return
        state.converted_at, state.conversion_event_id = at, event_id
        state.conversion_step = state.last_touch_step
        self.tally.append(("conversion", playbook.id, state.arm or ""))

    # ------------------------------------------------------------ entering

    def _enter(self, playbook: Playbook, evaluation: Evaluation) -> None:
        current = self.journeys.get(playbook.id)
        if current is not None and current.active:
            return  # already on this journey (a repeat complaint is handled by its case)
        if not may_enter(playbook, self.entries.get(playbook.id), self.now):
            return  # inside the re-entry cooldown; `lifecycle explain` shows it
        sweep_fired = self.sweep.fired if self.sweep is not None else frozenset()
        if _ends_at_once(playbook, sweep_fired):
            return
        previous = self.entries.get(playbook.id)
        number = (previous.last_number if previous else 0) + 1
        first = playbook.steps[0]
        subject = evaluation.subject
        working = _Working(
            playbook=playbook,
            ref=f"{self.customer_id}|{playbook.id}|{number}",
            state=_Place(
                EnrollmentStatus.ACTIVE,
                first.id,
                self.now + first.wait,
                None,
                0,
                arm=self._held_out_arm(playbook),
            ),
            entry_number=number,
            trigger_event_id=subject.event_id,
            entered_at=self.now,
        )
        self.journeys[playbook.id] = working
        self.touched.append(working)
        self.entries[playbook.id] = Entries(number, previous.cooldown_from if previous else None)
        reason = playbook.enter.source
        if subject.event_id is not None:
            reason = f"{subject.event_type} event {subject.event_id}; {reason}"
        if working.held_out:
            reason += f"; {HELD_OUT[working.state.arm or '']}"
        self._decide(working, None, "enrolled", reason, subject.facts)
        self.tally.append(("enrolled", playbook.id, working.state.arm or ""))
        if subject.event_id is not None and self.sweep is not None:
            # The event's properties matter to this journey's first steps (the complaint
            # reason in the apology, the case): run them now, with the event's facts.
            self._run_due(working, subject.facts, evaluation.fired | self.sweep.fired)

    def _held_out_arm(self, playbook: Playbook) -> str | None:
        """Marketing for a customer of the global control group, or of this playbook's
        holdout, is planned like anyone's and sent to no one."""
        if not playbook.marketing:
            return None
        if in_control_group(self.rules, self.customer_id):
            return CONTROL_ARM
        if (
            playbook.holdout
            and share_of(f"holdout:{playbook.id}:{self.customer_id}") < playbook.holdout
        ):
            return HOLDOUT_ARM
        return None

    # ------------------------------------------------------------ moving on

    def _move_on(self, working: _Working) -> None:
        playbook = working.playbook
        facts = self.sweep.subject.facts if self.sweep is not None else {}
        if playbook is None:
            self._cancel(working, "the playbook was removed", facts)
            return
        step_id = resolve_step(playbook, working.state.step_id)
        if step_id != working.state.step_id:
            working.state.step_id = step_id
        if step_id is not None and playbook.step(step_id) is None:
            self._cancel(working, f"its next step {step_id!r} is no longer in the playbook", facts)
            return
        if self.sweep is None:
            return  # no current facts for this customer in this batch: steps wait
        fired = self.sweep.fired
        if playbook.goal is not None and goal_rule(playbook.id) in fired:
            self._convert(working, self.now, None)
            self._finish_early(working, EnrollmentStatus.CONVERTED, "goal reached", playbook, facts)
            return
        if playbook.exit is not None and exit_rule(playbook.id) in fired:
            self._finish_early(
                working, EnrollmentStatus.EXITED, "no longer eligible", playbook, facts
            )
            return
        self._run_due(working, facts, fired)

    def _cancel(self, working: _Working, why: str, facts: Mapping[str, Any]) -> None:
        """A journey the rules no longer describe ends, and what it still has queued (a
        message held by the send window, say) is cancelled with it: a marketer who removes
        a playbook or a step does not expect its mail to keep going out."""
        self.effects.append(
            CancelQueued(
                working.ref, self.customer_id, f"journey {EnrollmentStatus.CANCELLED}: {why}"
            )
        )
        self._end(working, EnrollmentStatus.CANCELLED, why, facts)

    def _finish_early(
        self,
        working: _Working,
        status: EnrollmentStatus,
        why: str,
        playbook: Playbook,
        facts: Mapping[str, Any],
        *,
        source: str | None = None,
    ) -> None:
        if source is None:
            condition = playbook.goal if status is EnrollmentStatus.CONVERTED else playbook.exit
            assert condition is not None
            source = condition.source
        self.effects.append(CancelQueued(working.ref, self.customer_id, f"journey {status}: {why}"))
        self._end(working, status, f"{why}: {source}", facts)

    def _run_due(self, working: _Working, facts: Mapping[str, Any], fired: frozenset[str]) -> None:
        playbook = working.playbook
        assert playbook is not None
        while working.active and working.state.due_at is not None:
            if working.state.due_at > self.now:
                return
            step_id = working.state.step_id
            if step_id is None:
                self._end(working, EnrollmentStatus.COMPLETED, "every step done", facts)
                return
            step = playbook.step(step_id)
            assert step is not None
            if not self._run_step(working, playbook, step, facts, fired):
                return  # held or waiting: the step stays current, tried again later

    def _run_step(
        self,
        working: _Working,
        playbook: Playbook,
        step: Step,
        facts: Mapping[str, Any],
        fired: frozenset[str],
    ) -> bool:
        """Run one due step; False when it holds the journey (held back, or waiting)."""
        if step.wait_for is not None:
            return self._wait(working, playbook, step, facts)
        if step.branch is not None:
            self._branch(working, playbook, step, facts, fired)
            return True
        if step.split is not None:
            self._split(working, playbook, step, facts)
            return True
        if step.when is not None and step_rule(playbook.id, step.id) not in fired:
            why = conditions.explain(step.when, facts).summary
            self._decide(working, step.id, "skipped", f"condition false: {why}", facts)
            self.tally.append(("skipped", playbook.id, "condition false"))
            self._advance(working, playbook, step, None, facts)
            return True
        if step.escalate is not None:
            self._escalate(working, playbook, step, facts)
        send_at: datetime | None = None
        if step.send is not None:
            outcome = self._send(working, playbook, step, facts)
            if outcome == "held" or outcome == "dropped":
                return False
            send_at = outcome if isinstance(outcome, datetime) else None
        self._advance(working, playbook, step, send_at, facts)
        return True

    def _wait(
        self, working: _Working, playbook: Playbook, step: Step, facts: Mapping[str, Any]
    ) -> bool:
        """A wait for an event: opened when reached; its timeout leads ``otherwise``."""
        wait_for = step.wait_for
        assert wait_for is not None
        state = working.state
        if state.waiting_since is None:
            state.waiting_since = self.now
            state.due_at = self.now + wait_for.within
            reason = f"for {wait_for.event} until {state.due_at:%Y-%m-%d %H:%M} UTC"
            self._decide(working, step.id, "waiting", reason, facts, until=state.due_at)
            return False
        reason = f"no {wait_for.event} within {format_duration(wait_for.within)}"
        self._decide(working, step.id, "timed out", reason, facts)
        self._goto(working, playbook, wait_for.otherwise, facts)
        return True

    def _branch(
        self,
        working: _Working,
        playbook: Playbook,
        step: Step,
        facts: Mapping[str, Any],
        fired: frozenset[str],
    ) -> None:
        branch = step.branch
        assert branch is not None
        for i, (condition, target) in enumerate(branch.cases):
            if branch_rule(playbook.id, step.id, i) in fired:
                reason = f"{condition.source} -> {target or 'end'}"
                break
        else:
            target = branch.otherwise
            reason = f"no case held -> {target or 'end'}"
        self._decide(working, step.id, "branched", reason, facts)
        self._goto(working, playbook, target, facts)

    def _split(
        self, working: _Working, playbook: Playbook, step: Step, facts: Mapping[str, Any]
    ) -> None:
        split = step.split
        assert split is not None
        arm = arm_of(split, playbook.id, step.id, self.customer_id)
        reason = f"arm {arm.name} (weight {arm.weight} of {split.total})"
        if working.held_out:
            reason += f", {HELD_OUT[working.state.arm or '']}"  # follows the arm, sends nothing
        else:
            working.state.arm = arm.name
        self._decide(working, step.id, "split", reason, facts)
        self.tally.append(("split", playbook.id, arm.name))
        self._goto(working, playbook, arm.goto, facts)

    def _goto(
        self, working: _Working, playbook: Playbook, target: str | None, facts: Mapping[str, Any]
    ) -> None:
        """Move to ``target`` (due after its own wait), or end the journey (None)."""
        if target is None:
            self._end(working, EnrollmentStatus.COMPLETED, "every step done", facts)
            return
        step = playbook.step(target)
        assert step is not None  # the loader checked every id a step names
        working.state.goto(target, self.now + step.wait)

    def _advance(
        self,
        working: _Working,
        playbook: Playbook,
        step: Step,
        send_at: datetime | None,
        facts: Mapping[str, Any],
    ) -> None:
        if step.following is not None:
            self._goto(working, playbook, step.following, facts)
            return
        if send_at is not None and send_at > self.now:
            # The last message waits (quiet hours): the journey completes when it is due.
            working.state.goto(None, send_at)
            return
        self._end(working, EnrollmentStatus.COMPLETED, "every step done", facts)

    def _end(
        self,
        working: _Working,
        status: EnrollmentStatus,
        reason: str,
        facts: Mapping[str, Any],
    ) -> None:
        state = working.state
        state.status, state.due_at, state.hold_reason = status, None, None
        state.waiting_since = None
        state.ended_at, state.end_reason = self.now, reason[:200]
        self._decide(working, None, str(status), reason, facts)
        if working.playbook is not None:
            self.tally.append((str(status), working.playbook.id, ""))
        if status in COOLDOWN_ENDINGS:
            self._start_cooldown(working)

    def _start_cooldown(self, working: _Working) -> None:
        """The entry counts for re-entry (see the module docstring)."""
        if working.playbook is None:
            return
        entered_at = working.entered_at or (working.read.entered_at if working.read else self.now)
        self.entries[working.playbook.id] = Entries(working.entry_number, entered_at)

    # ------------------------------------------------------------ sending

    def _send(
        self, working: _Working, playbook: Playbook, step: Step, facts: Mapping[str, Any]
    ) -> datetime | str | None:
        """Queue the step's message through the policies: the time it is queued for (or,
        held out, would have been), "held" (the step stays due) or "dropped" (the journey
        ended), or None when it was skipped (no consent: the journey goes on)."""
        assert step.send is not None
        channel = step.send.channel
        proposal = Proposal(
            channel=channel,
            marketing=playbook.marketing,
            priority=playbook.priority,
            topic=playbook.topic,
        )
        refused = consent(proposal, facts)
        if isinstance(refused, Skip):
            self._decide(working, step.id, "skipped", refused.reason, facts)
            self.tally.append(("skipped", playbook.id, refused.reason))
            return None
        paused = complaint_pause(proposal, self._complaint_facts(facts), self.now)
        if paused is not None:
            self._hold(working, step, paused.reason, None, facts, "complaint pause")
            return "held"
        capped = frequency_caps(proposal, self.now, self.rules.policies.frequency_caps, self.recent)
        if capped is not None:
            if playbook.when_capped == "drop":
                reason = f"dropped by {capped.reason}"
                self._decide(working, step.id, "skipped", reason, facts)
                self.tally.append(("skipped", playbook.id, "frequency cap (dropped)"))
                self._end(
                    working,
                    EnrollmentStatus.DROPPED,
                    f"its {step.id!r} message was dropped by a frequency cap, so no later "
                    "step follows up on it",
                    facts,
                )
                return "dropped"
            self._hold(working, step, capped.reason, capped.until, facts, "frequency cap")
            return "held"
        send_at = self.now
        quiet = quiet_hours(
            self.now, self.rules.send_window(playbook, channel), str(facts.get("timezone") or "UTC")
        )
        if quiet is not None:
            send_at = quiet.until
            self._decide(working, step.id, "deferred", quiet.reason, facts, until=send_at)
            self.tally.append(("deferred", playbook.id, "quiet hours"))
        if working.held_out:
            # Everything a treated customer meets applies alike (consent, the complaint
            # pause, the caps of what they were really sent, quiet hours), so the holdout
            # is touched when its message would have gone and the comparison is fair;
            # then nothing is sent (and nothing counts against a cap).
            self._decide(working, step.id, "held out", HELD_OUT[working.state.arm or ""], facts)
            self.tally.append(("held out", playbook.id, working.state.arm or ""))
            self._touch(working, step, send_at)
            return send_at
        self._queue(working, playbook, step, facts, send_at)
        return send_at

    def _touch(self, working: _Working, step: Step, at: datetime) -> None:
        """A message went (or, held out, would have gone): the goal is credited to the
        latest one, and the entry now counts for re-entry."""
        working.state.last_touch_at, working.state.last_touch_step = at, step.id
        self._start_cooldown(working)

    def _complaint_facts(self, facts: Mapping[str, Any]) -> Mapping[str, Any]:
        """The facts as the complaint pause sees them: a case this plan opened counts."""
        if self.case is not None and self.case.opened is not None:
            return {**facts, "open_complaints": max(1, int(facts.get("open_complaints") or 0))}
        return facts

    def _hold(
        self,
        working: _Working,
        step: Step,
        reason: str,
        until: datetime | None,
        facts: Mapping[str, Any],
        tally: str,
    ) -> None:
        """Keep the step due; a decision is written only when the reason for holding
        changes, not on every tick."""
        state = working.state
        due = until if until is not None else state.due_at
        if state.hold_reason != reason:
            self._decide(working, step.id, "deferred", reason, facts, until=until)
            assert working.playbook is not None
            self.tally.append(("deferred", working.playbook.id, tally))
        state.hold_reason, state.due_at = reason[:200], due

    def _queue(
        self,
        working: _Working,
        playbook: Playbook,
        step: Step,
        facts: Mapping[str, Any],
        send_at: datetime,
    ) -> None:
        assert step.send is not None
        key = journey_dedupe_key(self.customer_id, playbook.id, working.entry_number, step.id)
        message_id = message_id_for(key)
        event = {
            name.removeprefix("event."): value
            for name, value in facts.items()
            if name.startswith("event.") and value is not None
        }
        self.effects.append(
            Queue(
                message_id=message_id,
                dedupe_key=key,
                customer_id=self.customer_id,
                enrollment=working.ref,
                case=None,
                playbook=playbook.id,
                step_id=step.id,
                kind=playbook.kind,
                channel=step.send.channel,
                template=step.send.template,
                # The address is resolved from the customer at send time, when consent is
                # checked again.
                to_address="",
                context={"event": event},
                priority=playbook.priority,
                due_at=send_at,
            )
        )
        working.state.queued_count += 1
        self._touch(working, step, send_at)
        if playbook.marketing:
            self.recent.append((send_at, step.send.channel))
        detail = f"{step.send.channel} {step.send.template}"
        self._decide(
            working, step.id, "queued", detail, facts, until=send_at, message_id=message_id
        )
        self.tally.append(("queued", playbook.id, step.send.channel))

    # ------------------------------------------------------------ escalating

    def _escalate(
        self, working: _Working, playbook: Playbook, step: Step, facts: Mapping[str, Any]
    ) -> None:
        escalate = step.escalate
        assert escalate is not None
        # The playbook may choose the priority by a fact (the complaint's severity).
        priority, chosen_by = escalate.priority_for(facts)
        reason = str(facts.get("event.reason") or f"{playbook.id} step {step.id}")[:500]
        self.tally.append(("escalated", playbook.id, ""))
        if self.case is not None:
            case = self.case
            self.effects.append(
                CaseNote(case.ref, playbook.id, "joined", f"repeat complaint: {reason}")
            )
            current = case.raised_to or case.priority
            if PRIORITY_ORDER.get(priority, 9) < PRIORITY_ORDER.get(current, 9):
                case.raised_to = priority
            label = f"case {case.ref}" if isinstance(case.ref, int) else "the case opened now"
            note = f"joined {label} (repeat complaint)"
            self._decide(working, step.id, "escalated", note, facts)
            return
        sla_due_at = self.now + escalate.sla
        key = f"case:{self.customer_id}:{working.trigger_event_id or working.ref}"
        lead = self.rules.roster.on_duty(1)
        opened = OpenCaseEffect(
            key=key,
            customer_id=self.customer_id,
            reason=reason,
            trigger_event_id=working.trigger_event_id,
            priority=priority,
            queue=escalate.queue,
            sla_due_at=sla_due_at,
            notified_tier=lead.tier if lead is not None else 0,
        )
        self.case = _Case(key, priority, opened=opened)
        self.effects.append(CaseNote(key, playbook.id, "opened", reason))
        self.effects.append(TouchCustomer(self.customer_id))
        why = f" as {chosen_by}" if chosen_by else ""
        note = (
            f"case opened ({priority}{why}, queue {escalate.queue}); "
            f"SLA {sla_due_at:%Y-%m-%d %H:%M} UTC"
        )
        if lead is None:
            note += "; nobody on duty to notify"
        self._decide(working, step.id, "escalated", note, facts)
        if lead is not None:
            self._notify_lead(opened, lead.name, lead.tier, lead.email, lead.phone)

    def _notify_lead(
        self, case: OpenCaseEffect, name: str, tier: int, email: str, phone: str | None
    ) -> None:
        """The on-duty lead hears of a new case by email (and SMS with a phone), through
        the outbox like any message; the store writes the case's id into the context."""
        targets = [("email", email)] + ([("sms", phone)] if phone else [])
        for channel, address in targets:
            key = f"{case.key}:opened:{tier}:{channel}"
            self.effects.append(
                Queue(
                    message_id=message_id_for(key),
                    dedupe_key=key,
                    customer_id=self.customer_id,
                    enrollment=None,
                    case=case.key,
                    playbook="complaint_escalation",
                    step_id="opened",
                    kind="staff",
                    channel=channel,
                    template="case_opened",
                    to_address=address,
                    context={
                        "case": {
                            "reason": case.reason,
                            "priority": case.priority,
                            "queue": case.queue,
                            "sla_due_at": case.sla_due_at.strftime("%Y-%m-%d %H:%M UTC"),
                            "customer_id": case.customer_id,
                        },
                        "lead": {"name": name, "tier": tier},
                    },
                    priority=0,
                    due_at=self.now,
                )
            )

    # ------------------------------------------------------------ the audit log

    def _decide(
        self,
        working: _Working,
        step_id: str | None,
        outcome: str,
        reason: str,
        facts: Mapping[str, Any],
        *,
        until: datetime | None = None,
        message_id: str | None = None,
    ) -> None:
        playbook = working.playbook.id if working.playbook is not None else _playbook_of(working)
        self.effects.append(
            Decide(
                customer_id=self.customer_id,
                playbook=playbook,
                step_id=step_id,
                outcome=outcome,
                reason=reason[:500],
                enrollment=working.ref,
                facts=self._document(facts),
                until=until,
                message_id=message_id,
            )
        )

    def _document(self, facts: Mapping[str, Any]) -> dict[str, Any]:
        """The facts a decision saw, without the unknown ones; one dict per facts object,
        so the store encodes it once for all of the customer's decisions."""
        document = self._documents.get(id(facts))
        if document is None:
            document = {k: v for k, v in facts.items() if v is not None}
            self._documents[id(facts)] = document
        return document


def _playbook_of(working: _Working) -> str:
    return working.read.playbook if working.read is not None else ""


def resolve_step(playbook: Playbook, step_id: str | None) -> str | None:
    """An enrollment of the first schema knew its step by position ("#2"): the step at
    that position of the rules in force, or the marker itself when there is none (which
    then ends the journey as a removed step)."""
    if step_id is None or not step_id.startswith("#"):
        return step_id
    try:
        position = int(step_id[1:])
    except ValueError:
        return step_id
    return playbook.steps[position].id if 0 <= position < len(playbook.steps) else step_id


@dataclass
class JourneyReport:
    """What a tick did to journeys, per playbook (and channel or reason)."""

    customers: int = 0
    lost_races: int = 0  # customers another evaluator moved first (planned again alone)
    counts: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def add(self, customer: CustomerPlan) -> None:
        for entry in customer.tally:
            self.counts[entry] = self.counts.get(entry, 0) + 1

    def merge(self, other: JourneyReport) -> None:
        self.customers += other.customers
        self.lost_races += other.lost_races
        for entry, count in other.counts.items():
            self.counts[entry] = self.counts.get(entry, 0) + count

    def total(self, kind: str) -> int:
        return sum(n for (k, _, _), n in self.counts.items() if k == kind)

    def by(self, kind: str) -> dict[tuple[str, str], int]:
        """``{(playbook, detail): count}`` of one kind (enrolled, queued, deferred...)."""
        return {(p, d): n for (k, p, d), n in self.counts.items() if k == kind}

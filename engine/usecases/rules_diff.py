"""Impact preview: what a change of the rules would do to the customers in the database.

``rules_diff(db, current, proposed, now)`` evaluates every customer and pending event
once per rules version, each with its own evaluator, reading the facts once (twice when
the fact catalogs differ), and compares, subject by subject, what each version matches:

- per playbook and step, who would newly enter (or newly match the step) and who would
  no longer: the same counting as `lifecycle evaluate` (customers for a playbook without
  ``enter.on``, pending events of its type for one with it), so the proposed count minus
  the current count is always "newly" minus "no longer"; the same for the customers
  whose goal holds and who are no longer eligible (the exit condition);
- the queued messages whose fate differs: cancelled under the proposed rules and not
  under the current ones (the goal or the exit now holds for the customer, or consent at
  send time fails with the playbook's new topic), no longer cancelled, or changed (the
  step now sends another template or channel; a queued message goes as it was queued);
- the active enrollments that a removed playbook or step strands: the next tick ends
  them (cancelled) and cancels what they still have queued.

Read-only: it reads in read transactions, and decides with the same pure functions the
planner uses (engine.journeys.plan.resolve_step, engine.journeys.policies.consent); no
plan is written. Sample customer ids come in id order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, text

from engine.data.facts import subjects_in_range
from engine.data.uow import reading
from engine.evaluation.evaluators import Evaluator, make_evaluator
from engine.evaluation.model import Subject
from engine.journeys.plan import resolve_step
from engine.journeys.policies import Proposal, consent
from engine.playbooks.model import (
    Playbook,
    RuleSet,
    enter_rule,
    exit_rule,
    goal_rule,
    step_rule,
)
from engine.runners.shards import shards_of_everyone

SAMPLES = 5


@dataclass
class Movement:
    """Subjects matching something under each version, and who moved."""

    current: int = 0
    proposed: int = 0
    newly: int = 0
    no_longer: int = 0
    newly_samples: list[str] = field(default_factory=list)
    no_longer_samples: list[str] = field(default_factory=list)

    def count(self, was: bool, will: bool, customer_id: str, samples: int) -> None:
        self.current += was
        self.proposed += will
        if will and not was:
            self.newly += 1
            _sample(self.newly_samples, customer_id, samples)
        elif was and not will:
            self.no_longer += 1
            _sample(self.no_longer_samples, customer_id, samples)

    @property
    def changed(self) -> bool:
        return bool(self.newly or self.no_longer)

    def as_dict(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "proposed": self.proposed,
            "newly": self.newly,
            "no_longer": self.no_longer,
            "newly_samples": self.newly_samples,
            "no_longer_samples": self.no_longer_samples,
        }


def _sample(samples: list[str], customer_id: str, limit: int) -> None:
    if len(samples) < limit and customer_id not in samples:
        samples.append(customer_id)


@dataclass
class PlaybookImpact:
    playbook: str
    change: str  # added | removed | kept
    counted_in: str  # customers | events (as `lifecycle evaluate` counts "matched")
    entry: Movement = field(default_factory=Movement)
    steps: dict[str, Movement] = field(default_factory=dict)
    goal: Movement = field(default_factory=Movement)  # customers whose goal holds
    exit: Movement = field(default_factory=Movement)  # customers no longer eligible

    def as_dict(self) -> dict[str, Any]:
        return {
            "change": self.change,
            "counted_in": self.counted_in,
            "entry": self.entry.as_dict(),
            "goal_met": self.goal.as_dict(),
            "no_longer_eligible": self.exit.as_dict(),
            "steps": {step: m.as_dict() for step, m in self.steps.items()},
        }


@dataclass
class QueuedImpact:
    """Queued messages of one step whose fate the change moves, for one reason."""

    playbook: str
    step_id: str
    effect: str  # cancelled | no longer cancelled | changed
    reason: str
    count: int = 0
    samples: list[str] = field(default_factory=list)  # customer ids

    def as_dict(self) -> dict[str, Any]:
        return {
            "playbook": self.playbook,
            "step": self.step_id,
            "effect": self.effect,
            "reason": self.reason,
            "count": self.count,
            "samples": self.samples,
        }


@dataclass
class StrandedImpact:
    """Active enrollments waiting at a playbook or step the proposed rules do not have."""

    playbook: str
    step_id: str | None
    removed: str  # playbook | step
    count: int = 0
    queued: int = 0  # messages they still have queued, cancelled with them
    samples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "playbook": self.playbook,
            "step": self.step_id,
            "removed": self.removed,
            "enrollments": self.count,
            "queued_messages_still_sent": self.queued,
            "samples": self.samples,
        }


@dataclass
class RulesDiff:
    current_version: str
    proposed_version: str
    at: datetime
    customers: int = 0
    pending_events: int = 0
    queued_messages: int = 0
    active_enrollments: int = 0
    seconds: float = 0.0
    playbooks: dict[str, PlaybookImpact] = field(default_factory=dict)
    queued: list[QueuedImpact] = field(default_factory=list)
    stranded: list[StrandedImpact] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "current_version": self.current_version,
            "proposed_version": self.proposed_version,
            "at": self.at.isoformat(),
            "customers": self.customers,
            "pending_events": self.pending_events,
            "queued_messages": self.queued_messages,
            "active_enrollments": self.active_enrollments,
            "seconds": round(self.seconds, 3),
            "playbooks": {pid: p.as_dict() for pid, p in sorted(self.playbooks.items())},
            "queued": [q.as_dict() for q in self.queued],
            "stranded": [s.as_dict() for s in self.stranded],
        }


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class QueuedRow:
    id: str
    customer_id: str
    playbook: str
    step_id: str
    channel: str
    template: str
    kind: str
    priority: int
    enrollment_id: int | None
    journey_active: bool
    journey_step: str | None = None  # the step the journey waits at (None: completing)


_QUEUED = text(
    "SELECT m.id, m.customer_id, m.playbook, m.step_id, m.channel, m.template, m.kind, "
    "m.priority, m.enrollment_id, e.status AS journey, e.step_id AS journey_step "
    "FROM messages m LEFT JOIN enrollments e ON e.id = m.enrollment_id "
    "WHERE m.status = 'queued' AND m.kind != 'staff' AND m.customer_id IS NOT NULL"
)
_ACTIVE = text(
    "SELECT id, customer_id, playbook, step_id FROM enrollments WHERE status = 'active' "
    "ORDER BY customer_id, id"
)


def _queued_rows(db: Engine) -> dict[str, list[QueuedRow]]:
    found: dict[str, list[QueuedRow]] = {}
    with reading(db) as session:
        for row in session.execute(_QUEUED):
            found.setdefault(row.customer_id, []).append(
                QueuedRow(
                    row.id,
                    row.customer_id,
                    row.playbook or "",
                    row.step_id or "",
                    row.channel,
                    row.template,
                    row.kind,
                    row.priority,
                    row.enrollment_id,
                    row.journey == "active",
                    row.journey_step,
                )
            )
    return found


# ---------------------------------------------------------------- deciding (pure)


def starts(rules: RuleSet, playbook_id: str, subject: Subject, fired: frozenset[str]) -> bool:
    """Whether ``subject`` matches the playbook's entry as `lifecycle evaluate` counts it:
    a customer (sweep) for a playbook without ``enter.on``, an event of its type."""
    playbook = rules.playbooks.get(playbook_id)
    if playbook is None:
        return False
    kind = subject.event_type if subject.event_id is not None else None
    return playbook.enter_on == kind and enter_rule(playbook_id) in fired


def step_matches(playbook: Playbook | None, step_id: str, fired: frozenset[str]) -> bool:
    if playbook is None:
        return False
    step = playbook.step(step_id)
    if step is None:
        return False
    return step.when is None or step_rule(playbook.id, step_id) in fired


def cancelled_by(
    rules: RuleSet, message: QueuedRow, fired: frozenset[str], facts: Mapping[str, Any]
) -> str | None:
    """Why the next tick or dispatch under ``rules`` would cancel a queued message, or
    None when it goes. The planner cancels what a journey queued when its goal or exit
    holds, or when the journey is stranded by a removed playbook or step; dispatch
    re-checks consent with the playbook's topic in force."""
    playbook = rules.playbooks.get(message.playbook)
    if message.journey_active and message.enrollment_id is not None:
        removed = stranding(rules, message.playbook, message.journey_step)
        if removed is not None:
            return f"the journey is cancelled (its {removed} was removed)"
    if playbook is not None and message.journey_active:
        if playbook.goal is not None and goal_rule(playbook.id) in fired:
            return f"the journey converts (goal reached: {playbook.goal.source})"
        if playbook.exit is not None and exit_rule(playbook.id) in fired:
            return f"the journey exits (no longer eligible: {playbook.exit.source})"
    proposal = Proposal(
        message.channel,
        message.kind == "marketing",
        message.priority,
        topic=playbook.topic if playbook is not None else None,
    )
    refused = consent(proposal, facts)
    return f"at send time: {refused.reason}" if refused is not None else None


def send_change(current: RuleSet, proposed: RuleSet, message: QueuedRow) -> str | None:
    """How the message's step sends differently under the proposed rules, if it does."""
    before = _send_of(current, message)
    after = _send_of(proposed, message)
    if before is None or after is None or before == after:
        return None
    return (
        f"the step now sends {after[0]} {after[1]} (was {before[0]} {before[1]}); "
        f"this message goes as queued ({message.channel} {message.template})"
    )


def _send_of(rules: RuleSet, message: QueuedRow) -> tuple[str, str] | None:
    playbook = rules.playbooks.get(message.playbook)
    step = playbook.step(message.step_id) if playbook is not None else None
    if step is None or step.send is None:
        return None
    return (step.send.channel, step.send.template)


def stranding(rules: RuleSet, playbook_id: str, step_id: str | None) -> str | None:
    """'playbook' or 'step' when an active enrollment there would be cancelled."""
    playbook = rules.playbooks.get(playbook_id)
    if playbook is None:
        return "playbook"
    resolved = resolve_step(playbook, step_id)
    if resolved is not None and playbook.step(resolved) is None:
        return "step"
    return None


# ---------------------------------------------------------------- the preview


class _Tally:
    def __init__(self, current: RuleSet, proposed: RuleSet, samples: int) -> None:
        self.current = current
        self.proposed = proposed
        self.samples = samples
        self.impacts: dict[str, PlaybookImpact] = {}
        for pid in sorted({*current.playbooks, *proposed.playbooks}):
            before, after = current.playbooks.get(pid), proposed.playbooks.get(pid)
            shown = after or before
            assert shown is not None
            change = "added" if before is None else "removed" if after is None else "kept"
            impact = PlaybookImpact(
                pid, change, "customers" if shown.enter_on is None else "events"
            )
            steps = [s.id for s in before.steps] if before else []
            steps += [s.id for s in after.steps if s.id not in steps] if after else []
            impact.steps = {step: Movement() for step in steps}
            self.impacts[pid] = impact
        self.queued: dict[tuple[str, str, str, str], QueuedImpact] = {}

    def subject(
        self, subject: Subject, was_fired: frozenset[str], will_fired: frozenset[str]
    ) -> None:
        customer_id = subject.customer_id
        for pid, impact in self.impacts.items():
            was = starts(self.current, pid, subject, was_fired)
            will = starts(self.proposed, pid, subject, will_fired)
            impact.entry.count(was, will, customer_id, self.samples)
            if subject.event_id is None:  # goals and exits are the customers' (as evaluate)
                impact.goal.count(
                    pid in self.current.playbooks and goal_rule(pid) in was_fired,
                    pid in self.proposed.playbooks and goal_rule(pid) in will_fired,
                    customer_id,
                    self.samples,
                )
                impact.exit.count(
                    pid in self.current.playbooks and exit_rule(pid) in was_fired,
                    pid in self.proposed.playbooks and exit_rule(pid) in will_fired,
                    customer_id,
                    self.samples,
                )
            if not (was or will):
                continue
            before = self.current.playbooks.get(pid)
            after = self.proposed.playbooks.get(pid)
            for step_id, movement in impact.steps.items():
                movement.count(
                    was and step_matches(before, step_id, was_fired),
                    will and step_matches(after, step_id, will_fired),
                    customer_id,
                    self.samples,
                )

    def messages(
        self,
        rows: Iterable[QueuedRow],
        was: tuple[frozenset[str], Mapping[str, Any]],
        will: tuple[frozenset[str], Mapping[str, Any]],
    ) -> None:
        for row in rows:
            before = cancelled_by(self.current, row, *was)
            after = cancelled_by(self.proposed, row, *will)
            if after is not None and before is None:
                self._queued(row, "cancelled", after)
            elif before is not None and after is None:
                self._queued(row, "no longer cancelled", f"was: {before}")
            elif before is None and (change := send_change(self.current, self.proposed, row)):
                self._queued(row, "changed", change)

    def _queued(self, row: QueuedRow, effect: str, reason: str) -> None:
        key = (row.playbook, row.step_id, effect, reason)
        impact = self.queued.get(key)
        if impact is None:
            impact = self.queued[key] = QueuedImpact(row.playbook, row.step_id, effect, reason)
        impact.count += 1
        _sample(impact.samples, row.customer_id, self.samples)


def rules_diff(
    db: Engine,
    current: RuleSet,
    proposed: RuleSet,
    now: datetime,
    *,
    batch_size: int = 2000,
    engine: str = "durable",
    samples: int = SAMPLES,
) -> RulesDiff:
    """The impact of replacing ``current`` by ``proposed`` on the database at ``now``."""
    started = time.perf_counter()
    report = RulesDiff(current.version, proposed.version, now)
    tally = _Tally(current, proposed, samples)
    queued = _queued_rows(db)
    report.queued_messages = sum(len(rows) for rows in queued.values())
    same_facts = current.catalog == proposed.catalog
    with (
        make_evaluator(current.conditions(), engine) as was_evaluator,
        make_evaluator(proposed.conditions(), engine) as will_evaluator,
    ):
        for shard in shards_of_everyone(db, batch_size):
            with reading(db) as session:
                was_subjects = subjects_in_range(
                    session, current.catalog, now, after=shard.after, upto=shard.upto
                )
                will_subjects = (
                    was_subjects
                    if same_facts
                    else subjects_in_range(
                        session, proposed.catalog, now, after=shard.after, upto=shard.upto
                    )
                )
            was_fired = _fired(was_evaluator, was_subjects)
            will_fired = _fired(will_evaluator, will_subjects)
            will_by_key = {s.key: (s, f) for s, f in zip(will_subjects, will_fired, strict=True)}
            for subject, fired in zip(was_subjects, was_fired, strict=True):
                other, other_fired = will_by_key[subject.key]
                if subject.event_id is None:
                    report.customers += 1
                else:
                    report.pending_events += 1
                tally.subject(subject, fired, other_fired)
                rows = queued.get(subject.customer_id) if subject.event_id is None else None
                if rows:
                    tally.messages(rows, (fired, subject.facts), (other_fired, other.facts))
    report.playbooks = tally.impacts
    report.queued = sorted(
        tally.queued.values(), key=lambda q: (q.playbook, q.step_id, q.effect, q.reason)
    )
    report.stranded, report.active_enrollments = _stranded(db, current, proposed, queued, samples)
    report.seconds = time.perf_counter() - started
    return report


def _fired(evaluator: Evaluator, subjects: Sequence[Subject]) -> list[frozenset[str]]:
    return [f for _, f in evaluator.evaluate_many([(s.key, s.facts) for s in subjects])]


def _stranded(
    db: Engine,
    current: RuleSet,
    proposed: RuleSet,
    queued: Mapping[str, Sequence[QueuedRow]],
    samples: int,
) -> tuple[list[StrandedImpact], int]:
    """Active enrollments the proposed rules strand and the current ones do not."""
    by_enrollment: dict[int, int] = {}
    for rows in queued.values():
        for row in rows:
            if row.enrollment_id is not None:
                by_enrollment[row.enrollment_id] = by_enrollment.get(row.enrollment_id, 0) + 1
    found: dict[tuple[str, str | None], StrandedImpact] = {}
    active = 0
    with reading(db) as session:
        for enrollment_id, customer_id, playbook, step_id in session.execute(_ACTIVE):
            active += 1
            removed = stranding(proposed, playbook, step_id)
            if removed is None or stranding(current, playbook, step_id) is not None:
                continue
            key = (playbook, step_id)
            impact = found.get(key)
            if impact is None:
                impact = found[key] = StrandedImpact(playbook, step_id, removed)
            impact.count += 1
            impact.queued += by_enrollment.get(enrollment_id, 0)
            _sample(impact.samples, customer_id, samples)
    return sorted(found.values(), key=lambda s: (s.playbook, s.step_id or "")), active

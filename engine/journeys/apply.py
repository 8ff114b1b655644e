"""Journeys: from evaluations to enrollments, step by step, to the outbox.

For each customer of a batch, in one savepoint: enter playbooks whose enter rule holds
(respecting re-entry), exit those whose goal holds (cancelling what is still queued),
and run every step that is due — through the policies — into the outbox. Journey state,
messages and decision rows are written in the same transaction.

Races between two evaluators are settled by the database, not by locks we hold:
- entering inserts an enrollment whose ``active_key`` is unique while it is active;
- advancing is ``UPDATE ... WHERE id = ? AND next_step = ?`` and must touch one row;
- a message carries ``dedupe_key = enrollment:<id>:<step>``, unique.
The loser of any of these rolls back its savepoint for that customer and moves on.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col

from engine.data.facts import Subject
from engine.data.models import (
    Decision,
    Enrollment,
    EnrollmentStatus,
    Event,
    Message,
    MessageStatus,
)
from engine.escalations import cases as escalations
from engine.evaluation.runs import Evaluation
from engine.journeys.policies import (
    Defer,
    Proposal,
    Skip,
    complaint_pause,
    consent,
    frequency_caps,
    quiet_hours,
)
from engine.language import conditions
from engine.playbooks.model import Playbook, RuleSet, Step, enter_rule, exit_rule, step_rule

COUNTED_STATUSES = (
    MessageStatus.QUEUED,
    MessageStatus.SENDING,
    MessageStatus.SENT,
    MessageStatus.DELIVERED,
)


class LostRace(Exception):
    """Another evaluator changed this customer's journey first; its work stands."""


@dataclass
class BatchReport:
    enrolled: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    queued: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    deferred: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    skipped: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    exited: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    completed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    escalated: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    lost_races: int = 0
    customers: int = 0

    def merge(self, other: BatchReport) -> None:
        for name in (
            "enrolled",
            "queued",
            "deferred",
            "skipped",
            "exited",
            "completed",
            "escalated",
        ):
            mine, theirs = getattr(self, name), getattr(other, name)
            for key, value in theirs.items():
                mine[key] += value
        self.lost_races += other.lost_races
        self.customers += other.customers


@dataclass
class CustomerJourney:
    """What the journey code knows of one customer during a batch."""

    customer_id: str
    sweep: Evaluation | None
    events: list[Evaluation]
    active: dict[str, Enrollment]
    last_entered: dict[str, tuple[datetime, int]]  # playbook -> (latest entry, entries so far)
    recent: list[tuple[datetime, str]]  # (due, channel) of counted marketing messages


def apply_batch(
    session: Session, rules: RuleSet, evaluations: Sequence[Evaluation], now: datetime
) -> BatchReport:
    """Apply one batch of evaluations; commits nothing (the caller owns the transaction).

    Fast path: the whole batch in one savepoint, events claimed with one statement and
    every outbox and decision row written with one executemany. If anything shows that
    another evaluator got there first (a claimed event, a unique key, a guarded update),
    the batch is rolled back and redone customer by customer, each in its own savepoint,
    so the winner's work stands and the rest of the batch still goes through.
    """
    by_customer: dict[str, list[Evaluation]] = defaultdict(list)
    for evaluation in evaluations:
        by_customer[evaluation.subject.customer_id].append(evaluation)
    report = BatchReport(customers=len(by_customer))
    journeys = _journeys_with_work(session, rules, by_customer, now)
    if not journeys:
        return report
    savepoint = session.begin_nested()
    attempt = BatchReport()
    try:
        _claim_events(session, [e.subject.event_id for j in journeys for e in j.events], now)
        for journey in journeys:
            _run_customer(session, rules, journey, now, attempt, claim_events=False)
        _write_buffers(session)
        session.flush()
        savepoint.commit()
        report.merge(attempt)
        return report
    except (LostRace, IntegrityError):
        _drop_buffers(session)
        savepoint.rollback()
    for journey in _journeys_with_work(session, rules, by_customer, now):
        savepoint = session.begin_nested()
        attempt = BatchReport()
        try:
            _run_customer(session, rules, journey, now, attempt, claim_events=True)
            _write_buffers(session)
            session.flush()
            savepoint.commit()
            report.merge(attempt)
        except (LostRace, IntegrityError):
            _drop_buffers(session)
            savepoint.rollback()
            report.lost_races += 1
    return report


def _journeys_with_work(
    session: Session, rules: RuleSet, by_customer: dict[str, list[Evaluation]], now: datetime
) -> list[CustomerJourney]:
    """The journey state of the batch's customers, from the database, for those with work."""
    ids = list(by_customer)
    active = _active_enrollments(session, ids)
    last_entered = _last_entered(session, ids)
    recent = _recent_marketing(session, ids, rules, now)
    journeys = []
    for customer_id in ids:
        items = by_customer[customer_id]
        journey = CustomerJourney(
            customer_id=customer_id,
            sweep=next((e for e in items if e.subject.event_id is None), None),
            events=[e for e in items if e.subject.event_id is not None],  # oldest first
            active=active.get(customer_id, {}),
            last_entered=last_entered.get(customer_id, {}),
            recent=recent.get(customer_id, []),
        )
        if _has_work(rules, journey, now):  # most customers of a sweep have none
            journeys.append(journey)
    return journeys


def _claim_events(session: Session, event_ids: list[str | None], now: datetime) -> None:
    """Mark the batch's events evaluated in one statement, or lose the race for them."""
    wanted = {event_id for event_id in event_ids if event_id is not None}
    if not wanted:
        return
    claimed = set(
        session.scalars(
            update(Event)
            .where(col(Event.id).in_(wanted), col(Event.evaluated_at).is_(None))
            .values(evaluated_at=now)
            .returning(col(Event.id))
            .execution_options(synchronize_session=False)
        )
    )
    if claimed != wanted:
        raise LostRace(sorted(wanted - claimed)[:3])


def _active_enrollments(session: Session, ids: Sequence[str]) -> dict[str, dict[str, Enrollment]]:
    found: dict[str, dict[str, Enrollment]] = defaultdict(dict)
    if not ids:
        return found
    statement = select(Enrollment).where(
        col(Enrollment.customer_id).in_(ids),
        col(Enrollment.status) == EnrollmentStatus.ACTIVE,
    )
    for enrollment in session.scalars(statement):
        found[enrollment.customer_id][enrollment.playbook] = enrollment
    return found


def _last_entered(
    session: Session, ids: Sequence[str]
) -> dict[str, dict[str, tuple[datetime, int]]]:
    found: dict[str, dict[str, tuple[datetime, int]]] = defaultdict(dict)
    if not ids:
        return found
    statement = (
        select(
            col(Enrollment.customer_id),
            col(Enrollment.playbook),
            func.max(col(Enrollment.entered_at)),
            func.max(col(Enrollment.entry_number)),
        )
        .where(col(Enrollment.customer_id).in_(ids))
        .group_by(col(Enrollment.customer_id), col(Enrollment.playbook))
    )
    for customer_id, playbook, entered, entries in session.execute(statement):
        found[customer_id][playbook] = (entered, entries)
    return found


def _recent_marketing(
    session: Session, ids: Sequence[str], rules: RuleSet, now: datetime
) -> dict[str, list[tuple[datetime, str]]]:
    found: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    caps = rules.policies.frequency_caps
    if not ids or not caps:
        return found
    horizon = now - max(cap.per for cap in caps)
    statement = select(col(Message.customer_id), col(Message.due_at), col(Message.channel)).where(
        col(Message.customer_id).in_(ids),
        col(Message.kind) == "marketing",
        col(Message.status).in_(COUNTED_STATUSES),
        col(Message.due_at) > horizon,
    )
    for customer_id, due, channel in session.execute(statement):
        found[customer_id].append((due, channel))
    return found


# ---------------------------------------------------------------- one customer


def _has_work(rules: RuleSet, journey: CustomerJourney, now: datetime) -> bool:
    """A cheap look before opening a savepoint: is there anything to do at all?"""
    if journey.events:
        return True
    for playbook_id, enrollment in journey.active.items():
        if playbook_id not in rules.playbooks:
            return True
        if enrollment.next_due_at is not None and enrollment.next_due_at <= now:
            return True
        if journey.sweep is not None and exit_rule(playbook_id) in journey.sweep.fired:
            return True
    if journey.sweep is None:
        return False
    for playbook in rules.playbooks.values():
        if (
            playbook.enter_on is None
            and playbook.id not in journey.active
            and enter_rule(playbook.id) in journey.sweep.fired
        ):
            last = journey.last_entered.get(playbook.id)
            if last is None or (playbook.reentry is not None and now >= last[0] + playbook.reentry):
                return True
    return False


def _run_customer(
    session: Session,
    rules: RuleSet,
    journey: CustomerJourney,
    now: datetime,
    report: BatchReport,
    *,
    claim_events: bool,
) -> None:
    playbook: Playbook | None
    for event_eval in journey.events:
        event_type = event_eval.subject.event_type
        if claim_events:
            _claim_event(session, event_eval.subject.event_id, now)
        for playbook in rules.playbooks.values():
            if playbook.enter_on == event_type and enter_rule(playbook.id) in event_eval.fired:
                _try_enter(session, rules, journey, playbook, event_eval, now, report)
    if journey.sweep is not None:
        for playbook in rules.playbooks.values():
            if playbook.enter_on is None and enter_rule(playbook.id) in journey.sweep.fired:
                _try_enter(session, rules, journey, playbook, journey.sweep, now, report)
    facts = journey.sweep.subject.facts if journey.sweep else None
    for enrollment in sorted(
        journey.active.values(),
        key=lambda e: (
            rules.playbooks[e.playbook].priority if e.playbook in rules.playbooks else 10**6
        ),
    ):
        playbook = rules.playbooks.get(enrollment.playbook)
        if playbook is None:
            _end(
                session,
                enrollment,
                EnrollmentStatus.CANCELLED,
                "the playbook was removed",
                now,
                rules,
                facts or {},
            )
            continue
        if facts is None:
            continue  # no current facts for this customer in this batch: steps wait
        fired = journey.sweep.fired if journey.sweep else frozenset()
        if playbook.exit is not None and exit_rule(playbook.id) in fired:
            _exit_on_goal(session, rules, playbook, enrollment, facts, now, report)
            continue
        _run_due_steps(session, rules, journey, playbook, enrollment, facts, fired, now, report)


def _claim_event(session: Session, event_id: str | None, now: datetime) -> None:
    """Mark the event evaluated, or lose the race to the evaluator that already did."""
    result = cast(
        "CursorResult[Any]",
        session.execute(
            update(Event)
            .where(col(Event.id) == event_id, col(Event.evaluated_at).is_(None))
            .values(evaluated_at=now)
            .execution_options(synchronize_session=False)
        ),
    )
    if result.rowcount != 1:
        raise LostRace(event_id)


def _try_enter(
    session: Session,
    rules: RuleSet,
    journey: CustomerJourney,
    playbook: Playbook,
    evaluation: Evaluation,
    now: datetime,
    report: BatchReport,
) -> None:
    if playbook.id in journey.active:
        return  # already on this journey (a repeat complaint is handled by its case)
    last, entries = journey.last_entered.get(playbook.id, (None, 0))
    if last is not None and (playbook.reentry is None or now < last + playbook.reentry):
        return  # re-entry not allowed yet; `lifecycle explain` shows the cooldown
    if journey.sweep is not None and exit_rule(playbook.id) in journey.sweep.fired:
        return  # the goal is already reached: entering would only exit again
    subject = evaluation.subject
    enrollment = Enrollment(
        customer_id=journey.customer_id,
        playbook=playbook.id,
        status=EnrollmentStatus.ACTIVE,
        active_key=f"{journey.customer_id}|{playbook.id}",
        entry_number=entries + 1,
        next_step=0,
        next_due_at=now + playbook.steps[0].wait,
        rules_version=rules.version,
        trigger_event_id=subject.event_id,
        entered_at=now,
    )
    session.add(enrollment)
    session.flush()  # the unique active_key and entry number settle a race here
    journey.active[playbook.id] = enrollment
    journey.last_entered[playbook.id] = (now, entries + 1)
    _decide(
        session,
        enrollment,
        None,
        "enrolled",
        _entry_reason(playbook, subject),
        now,
        rules,
        subject.facts,
    )
    report.enrolled[playbook.id] += 1
    if subject.event_id is not None and journey.sweep is not None:
        # The event's properties matter to this journey's first steps (the complaint
        # reason in the apology, the case): run due steps with the event's facts.
        fired = evaluation.fired | journey.sweep.fired
        _run_due_steps(
            session, rules, journey, playbook, enrollment, subject.facts, fired, now, report
        )


def _entry_reason(playbook: Playbook, subject: Subject) -> str:
    if subject.event_id:
        return f"{subject.event_type} event {subject.event_id}; {playbook.enter.source}"
    return playbook.enter.source


def _exit_on_goal(
    session: Session,
    rules: RuleSet,
    playbook: Playbook,
    enrollment: Enrollment,
    facts: dict[str, Any],
    now: datetime,
    report: BatchReport,
) -> None:
    assert playbook.exit is not None
    cancelled = cast(
        "CursorResult[Any]",
        session.execute(
            update(Message)
            .where(
                col(Message.enrollment_id) == enrollment.id,
                col(Message.status) == MessageStatus.QUEUED,
            )
            .values(
                status=MessageStatus.CANCELLED,
                last_error="journey exited on its goal",
                updated_at=now,
            )
        ),
    ).rowcount
    reason = f"goal reached: {playbook.exit.source}"
    if cancelled:
        reason += f"; {cancelled} queued message(s) cancelled"
    _end(session, enrollment, EnrollmentStatus.EXITED, reason, now, rules, facts)
    report.exited[playbook.id] += 1


def _end(
    session: Session,
    enrollment: Enrollment,
    status: EnrollmentStatus,
    reason: str,
    now: datetime,
    rules: RuleSet,
    facts: dict[str, Any],
) -> None:
    _guarded_update(
        session,
        enrollment,
        status=status,
        active_key=None,
        ended_at=now,
        end_reason=reason,
        next_due_at=None,
    )
    outcome = {EnrollmentStatus.EXITED: "exited", EnrollmentStatus.COMPLETED: "completed"}.get(
        status, "cancelled"
    )
    _decide(session, enrollment, None, outcome, reason, now, rules, facts)


def _guarded_update(session: Session, enrollment: Enrollment, **values: Any) -> None:
    """Move an enrollment only if nobody moved it since we read it.

    The statement runs on the connection (no ORM bookkeeping) and the in-memory object is
    updated as already persisted, so the next flush does not write the same row again.
    """
    result = session.connection().execute(
        update(Enrollment)
        .where(
            col(Enrollment.id) == enrollment.id,
            col(Enrollment.status) == EnrollmentStatus.ACTIVE,
            col(Enrollment.next_step) == enrollment.next_step,
        )
        .values(**values)
    )
    if result.rowcount != 1:
        raise LostRace(enrollment.id)
    for name, value in values.items():
        set_committed_value(enrollment, name, value)


def _run_due_steps(
    session: Session,
    rules: RuleSet,
    journey: CustomerJourney,
    playbook: Playbook,
    enrollment: Enrollment,
    facts: dict[str, Any],
    fired: frozenset[str],
    now: datetime,
    report: BatchReport,
) -> None:
    while (
        enrollment.status == EnrollmentStatus.ACTIVE
        and enrollment.next_due_at is not None
        and enrollment.next_due_at <= now
    ):
        step = playbook.steps[enrollment.next_step]
        if not _run_step(
            session, rules, journey, playbook, enrollment, step, facts, fired, now, report
        ):
            return  # held back: the step stays due and is tried again on a later tick


def _run_step(
    session: Session,
    rules: RuleSet,
    journey: CustomerJourney,
    playbook: Playbook,
    enrollment: Enrollment,
    step: Step,
    facts: dict[str, Any],
    fired: frozenset[str],
    now: datetime,
    report: BatchReport,
) -> bool:
    """Run one due step. Returns False when it is held back (it stays the next step)."""
    if step.when is not None and step_rule(playbook.id, step.id) not in fired:
        why = conditions.explain(step.when, facts).summary
        _decide(
            session, enrollment, step.id, "skipped", f"condition false: {why}", now, rules, facts
        )
        report.skipped[(playbook.id, "condition false")] += 1
        _advance(session, rules, playbook, enrollment, facts, now, report)
        return True
    if step.escalate is not None:
        _escalate(session, rules, playbook, enrollment, step, facts, now, report)
    if step.send is not None:
        held = _send(session, rules, journey, playbook, enrollment, step, facts, now, report)
        if held:
            return False
    _advance(session, rules, playbook, enrollment, facts, now, report)
    return True


def _escalate(
    session: Session,
    rules: RuleSet,
    playbook: Playbook,
    enrollment: Enrollment,
    step: Step,
    facts: dict[str, Any],
    now: datetime,
    report: BatchReport,
) -> None:
    assert step.escalate is not None
    reason = facts.get("event.reason") or f"{playbook.id} step {step.id}"
    case, opened = escalations.open_or_join(
        session,
        customer_id=enrollment.customer_id,
        reason=str(reason),
        trigger_event_id=enrollment.trigger_event_id,
        priority=step.escalate.priority,
        queue=step.escalate.queue,
        sla_due_at=now + step.escalate.sla,
        now=now,
    )
    outcome = "escalated"
    note = f"case {case.id} {'opened' if opened else 'joined (repeat complaint)'}; SLA {case.sla_due_at:%Y-%m-%d %H:%M} UTC"
    _decide(session, enrollment, step.id, outcome, note, now, rules, facts)
    report.escalated[playbook.id] += 1
    if opened:
        from engine.escalations.notifications import (
            notify_new_case,  # staff notification through the outbox
        )

        notify_new_case(session, rules, case, now)


def _send(
    session: Session,
    rules: RuleSet,
    journey: CustomerJourney,
    playbook: Playbook,
    enrollment: Enrollment,
    step: Step,
    facts: dict[str, Any],
    now: datetime,
    report: BatchReport,
) -> bool:
    """Queue the step's message through the policies. Returns True when held back."""
    assert step.send is not None
    channel = step.send.channel
    proposal = Proposal(channel=channel, marketing=playbook.marketing, priority=playbook.priority)
    refused = consent(proposal, facts)
    if isinstance(refused, Skip):
        _decide(session, enrollment, step.id, "skipped", refused.reason, now, rules, facts)
        report.skipped[(playbook.id, refused.reason)] += 1
        return False
    paused = complaint_pause(proposal, facts, now)
    if paused is not None:
        _hold(session, rules, enrollment, step, paused, None, now, facts, report, playbook)
        return True
    capped = frequency_caps(proposal, now, rules.policies.frequency_caps, journey.recent)
    if capped is not None:
        if playbook.when_capped == "drop":
            reason = f"dropped by {capped.reason}"
            _decide(session, enrollment, step.id, "skipped", reason, now, rules, facts)
            report.skipped[(playbook.id, "frequency cap")] += 1
            return False
        _hold(session, rules, enrollment, step, capped, capped.until, now, facts, report, playbook)
        return True
    send_at = now
    quiet = quiet_hours(
        now, rules.quiet_hours(playbook, channel), str(facts.get("timezone") or "UTC")
    )
    if quiet is not None:
        send_at = quiet.until
        _decide(
            session, enrollment, step.id, "deferred", quiet.reason, now, rules, facts, until=send_at
        )
        report.deferred[(playbook.id, "quiet hours")] += 1
    message_id = _queue(session, playbook, enrollment, step, facts, send_at, now)
    if playbook.marketing:
        journey.recent.append((send_at, channel))
    _decide(
        session,
        enrollment,
        step.id,
        "queued",
        f"{channel} {step.send.template}",
        now,
        rules,
        facts,
        message_id=message_id,
        until=send_at,
    )
    report.queued[(playbook.id, channel)] += 1
    return False


def _hold(
    session: Session,
    rules: RuleSet,
    enrollment: Enrollment,
    step: Step,
    held: Defer,
    until: datetime | None,
    now: datetime,
    facts: dict[str, Any],
    report: BatchReport,
    playbook: Playbook,
) -> None:
    """Keep the step due; write a decision only when the reason for holding changes."""
    key = "complaint pause" if until is None else "frequency cap"
    if enrollment.hold_reason != held.reason:
        values: dict[str, Any] = {"hold_reason": held.reason}
        if until is not None:
            values["next_due_at"] = until
        _guarded_update(session, enrollment, **values)
        _decide(
            session, enrollment, step.id, "deferred", held.reason, now, rules, facts, until=until
        )
        report.deferred[(playbook.id, key)] += 1
    elif until is not None and enrollment.next_due_at != until:
        _guarded_update(session, enrollment, next_due_at=until)


def _queue(
    session: Session,
    playbook: Playbook,
    enrollment: Enrollment,
    step: Step,
    facts: dict[str, Any],
    send_at: datetime,
    now: datetime,
) -> str:
    """Buffer the step's outbox row; it is written with the customer's other rows."""
    assert step.send is not None and enrollment.id is not None
    event = {
        key.removeprefix("event."): value
        for key, value in facts.items()
        if key.startswith("event.") and value is not None
    }
    message_id = str(uuid.uuid4())
    _buffer(session, MESSAGES).append(
        {
            "id": message_id,
            "dedupe_key": f"enrollment:{enrollment.id}:{step.id}",
            "customer_id": enrollment.customer_id,
            "enrollment_id": enrollment.id,
            "escalation_id": None,
            "playbook": playbook.id,
            "step_id": step.id,
            "kind": playbook.kind,
            "channel": step.send.channel,
            "template": step.send.template,
            # The address is resolved from the customer at send time, when consent is
            # checked again.
            "to_address": "",
            "context": {"event": event},
            "priority": playbook.priority,
            "status": MessageStatus.QUEUED.value,
            "due_at": send_at,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
        }
    )
    return message_id


# Outbox and decision rows are buffered per customer and written with one executemany
# each when the customer is done (inside its savepoint): building ORM objects row by row
# was most of the cost of a first sweep.
MESSAGES = "lifecycle.messages"
DECISIONS = "lifecycle.decisions"


def _buffer(session: Session, name: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = session.info.setdefault(name, [])
    return rows


def _write_buffers(session: Session) -> None:
    """Write the customer's buffered rows; a duplicate dedupe_key raises IntegrityError."""
    messages = session.info.pop(MESSAGES, [])
    decisions = session.info.pop(DECISIONS, [])
    if messages:
        session.execute(insert(Message), messages)
    if decisions:
        session.execute(insert(Decision), decisions)


def _drop_buffers(session: Session) -> None:
    session.info.pop(MESSAGES, None)
    session.info.pop(DECISIONS, None)


def _advance(
    session: Session,
    rules: RuleSet,
    playbook: Playbook,
    enrollment: Enrollment,
    facts: dict[str, Any],
    now: datetime,
    report: BatchReport,
) -> None:
    following = enrollment.next_step + 1
    if following >= len(playbook.steps):
        _end(session, enrollment, EnrollmentStatus.COMPLETED, "every step done", now, rules, facts)
        report.completed[playbook.id] += 1
        return
    _guarded_update(
        session,
        enrollment,
        next_step=following,
        next_due_at=now + playbook.steps[following].wait,
        hold_reason=None,
    )


def _decide(
    session: Session,
    enrollment: Enrollment,
    step_id: str | None,
    outcome: str,
    reason: str,
    now: datetime,
    rules: RuleSet,
    facts: dict[str, Any],
    *,
    until: datetime | None = None,
    message_id: str | None = None,
) -> None:
    _buffer(session, DECISIONS).append(
        {
            "at": now,
            "customer_id": enrollment.customer_id,
            "playbook": enrollment.playbook,
            "step_id": step_id,
            "outcome": outcome,
            "reason": reason[:500],
            "until": until,
            "enrollment_id": enrollment.id,
            "message_id": message_id,
            "rules_version": rules.version,
            "facts": {k: v for k, v in facts.items() if v is not None},
        }
    )


def due_customer_ids(session: Session, now: datetime, since: datetime | None) -> list[str]:
    """Customers an incremental tick must look at: changed since the watermark, with
    pending events, or with a journey step due."""
    from engine.data.models import Customer

    ids: set[str] = set()
    if since is not None:
        ids.update(
            session.scalars(select(col(Customer.id)).where(col(Customer.changed_at) > since))
        )
    ids.update(
        session.scalars(
            select(col(Event.customer_id)).where(col(Event.evaluated_at).is_(None)).distinct()
        )
    )
    ids.update(
        session.scalars(
            select(col(Enrollment.customer_id))
            .where(
                col(Enrollment.status) == EnrollmentStatus.ACTIVE,
                col(Enrollment.next_due_at) <= now,
            )
            .distinct()
        )
    )
    return sorted(ids)

"""Why a customer did or did not get each playbook: the conditions, journeys and decisions.

The answer to "why did she get this, and why did he not", shared by ``lifecycle explain``
and the console's customer page.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypedDict

from sqlalchemy import select
from sqlmodel import Session, col

from engine.data.facts import subjects_for
from engine.data.models import Customer, Event
from engine.errors import NotFound
from engine.journeys.effects import Journey
from engine.journeys.plan import may_enter, resolve_step
from engine.journeys.store import COOLDOWN_STATUSES, load_journeys
from engine.language import conditions
from engine.playbooks.model import Playbook, RuleSet


class Check(TypedDict):
    """One part of a playbook (enter, exit, a step guard) as `explain` reports it."""

    part: str
    condition: str
    holds: bool
    why: str


class PlaybookExplanation(TypedDict):
    """One playbook in the `explain` report."""

    playbook: str
    state: str  # on the journey | would enter | re-entry not allowed | does not match
    matches: bool  # the enter condition holds (with its event, for an event trigger)
    event: str | None
    journey: str | None
    checks: list[Check]


class CustomerExplanation(TypedDict):
    """Every playbook checked against one customer, and every decision about them."""

    customer: str
    at: str
    playbooks: list[PlaybookExplanation]
    timeline: list[dict[str, Any]]


def explain_customer(
    session: Session, rules: RuleSet, customer_id: str, moment: datetime
) -> CustomerExplanation:
    """Raises ``NotFound`` for an unknown customer."""
    if session.get(Customer, customer_id) is None:
        raise NotFound("customer", customer_id)
    pending = _pending_events(session, customer_id)
    journeys = _journeys(session, customer_id)
    snapshot = load_journeys(session, [customer_id])[customer_id]
    report: list[PlaybookExplanation] = []
    base = subjects_for(session, [customer_id], rules.catalog, moment, stages=rules.stages)[0]
    for pid, playbook in sorted(rules.playbooks.items()):
        facts = base.facts
        event_note = None
        if playbook.enter_on:
            event = pending.get(playbook.enter_on)
            if event is None:
                event_note = f"waits for a new {playbook.enter_on!r} event; none is pending"
            else:
                facts = subjects_for(
                    session,
                    [customer_id],
                    rules.catalog,
                    moment,
                    [event],
                    include_sweep=False,
                    stages=rules.stages,
                )[0].facts
                event_note = f"pending {playbook.enter_on!r} event {event.id} of {event.occurred_at:%Y-%m-%d %H:%M}"
        parts = {"enter": playbook.enter}
        if playbook.goal is not None:
            parts["goal"] = playbook.goal
        if playbook.exit is not None:
            parts["exit"] = playbook.exit
        for step in playbook.steps:
            if step.when is not None:
                parts[f"step {step.id}"] = step.when
            if step.branch is not None:
                for condition, goto in step.branch.cases:
                    parts[f"branch {step.id} -> {goto or 'end'}"] = condition
        checks: list[Check] = []
        for label, condition in parts.items():
            explanation = conditions.explain(condition, facts)
            checks.append(
                {
                    "part": label,
                    "condition": condition.source,
                    "holds": explanation.matched,
                    "why": explanation.summary,
                }
            )
        matches = checks[0]["holds"]
        active = snapshot.active.get(pid)
        if active is not None:
            state = "on the journey"
        elif matches and may_enter(playbook, snapshot.entries.get(pid), moment):
            state = "would enter"
        elif matches:
            state = "re-entry not allowed"
        else:
            state = "does not match"
        report.append(
            {
                "playbook": pid,
                "state": state,
                "matches": matches,
                "event": event_note,
                "journey": _journey_note(playbook, active, journeys.get(pid, []), moment),
                "checks": checks,
            }
        )
    timeline = _timeline(session, customer_id)
    return {
        "customer": customer_id,
        "at": moment.isoformat(),
        "playbooks": report,
        "timeline": timeline,
    }


def _timeline(session: Session, customer_id: str) -> list[dict[str, Any]]:
    """Every decision about the customer, oldest first: the answer to "why"."""
    from engine.data.models import Decision

    statement = (
        select(Decision)
        .where(col(Decision.customer_id) == customer_id)
        .order_by(col(Decision.at), col(Decision.id))
    )
    return [
        {
            "at": d.at.isoformat(),
            "playbook": d.playbook,
            "step": d.step_id,
            "outcome": d.outcome,
            "reason": d.reason,
            "until": d.until.isoformat() if d.until else None,
            "message_id": d.message_id,
            "rules_version": d.rules_version,
        }
        for d in session.scalars(statement)
    ]


def _pending_events(session: Session, customer_id: str) -> dict[str, Event]:
    """The newest not-yet-evaluated event of each type: what could still trigger an entry."""
    statement = (
        select(Event)
        .where(col(Event.customer_id) == customer_id, col(Event.evaluated_at).is_(None))
        .order_by(col(Event.occurred_at))
    )
    return {event.type: event for event in session.scalars(statement)}


def _journeys(session: Session, customer_id: str) -> dict[str, list[Any]]:
    from engine.data.models import Enrollment

    statement = (
        select(Enrollment)
        .where(col(Enrollment.customer_id) == customer_id)
        .order_by(col(Enrollment.entered_at))
    )
    found: dict[str, list[Any]] = {}
    for enrollment in session.scalars(statement):
        found.setdefault(enrollment.playbook, []).append(enrollment)
    return found


def _journey_note(
    playbook: Playbook, active: Journey | None, enrollments: list[Any], now: datetime
) -> str | None:
    """Where the customer stands on this journey, and whether re-entry is allowed."""
    if active is not None:
        since = f"on this journey since {active.entered_at:%Y-%m-%d %H:%M}"
        due = f"{active.due_at:%Y-%m-%d %H:%M}" if active.due_at else "now"
        held = f"; held: {active.hold_reason}" if active.hold_reason else ""
        if active.arm:
            since += f" (arm {active.arm})"
        step = resolve_step(playbook, active.step_id)
        if step is None:
            return f"{since}; every step done, completes when its last message is due ({due})"
        if playbook.step(step) is None:
            return f"{since}; its next step {step!r} is no longer in the playbook: ends next tick"
        current = playbook.step(step)
        if current is not None and current.wait_for is not None and active.waiting_since:
            event = current.wait_for.event
            return f"{since}; at {step}, waiting for {event} until {due}"
        return f"{since}; next step {step} due {due}{held}"
    if not enrollments:
        return None
    last = enrollments[-1]
    ended = f"last journey {last.status} {last.ended_at:%Y-%m-%d %H:%M} ({last.end_reason})"
    counted = [e for e in enrollments if e.queued_count > 0 or e.status in COOLDOWN_STATUSES]
    if not counted:
        return f"{ended}; it sent nothing, so re-entry is allowed now"
    if playbook.reentry is None:
        return f"{ended}; re-entry: never"
    allowed = counted[-1].entered_at + playbook.reentry
    when = "now" if allowed <= now else f"from {allowed:%Y-%m-%d %H:%M}"
    return f"{ended}; re-entry allowed {when}"

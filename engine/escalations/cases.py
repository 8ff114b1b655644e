"""Escalation cases: opened by the complaint playbook, worked by support leads.

A case moves open → acknowledged → resolved, and a resolved case can be reopened. Every
change is a history row. A repeat complaint while a case is not resolved joins that case
instead of opening another.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlmodel import Session, col

from engine.data.models import Escalation, EscalationNote, EscalationStatus
from engine.errors import IllegalTransition, InvalidChoice, NotFound

OPEN_STATES = (EscalationStatus.OPEN, EscalationStatus.ACKNOWLEDGED, EscalationStatus.REOPENED)
PRIORITY_ORDER = {"urgent": 0, "high": 1, "normal": 2, "low": 3}


def queue(session: Session, status: str | None = None) -> list[Escalation]:
    """Cases by urgency: overdue first (the soonest deadline is the most overdue), then
    by deadline, then by priority. ``status`` None means every case not resolved."""
    statement = select(Escalation)
    if status is None:
        statement = statement.where(col(Escalation.status).in_(OPEN_STATES))
    else:
        try:
            wanted = EscalationStatus(status)
        except ValueError as exc:
            raise InvalidChoice("status", status, [s.value for s in EscalationStatus]) from exc
        statement = statement.where(col(Escalation.status) == wanted)
    cases = list(session.scalars(statement))
    cases.sort(key=lambda c: (c.sla_due_at, PRIORITY_ORDER.get(c.priority, 9), c.id or 0))
    return cases


def open_case_for(session: Session, customer_id: str) -> Escalation | None:
    statement = (
        select(Escalation)
        .where(col(Escalation.customer_id) == customer_id)
        .where(col(Escalation.status).in_(OPEN_STATES))
        .order_by(col(Escalation.opened_at))
        .limit(1)
    )
    return session.scalars(statement).first()


def open_or_join(
    session: Session,
    *,
    customer_id: str,
    reason: str,
    trigger_event_id: str | None,
    priority: str,
    queue: str,
    sla_due_at: datetime,
    now: datetime,
    actor: str = "complaint_escalation",
) -> tuple[Escalation, bool]:
    """The customer's case: a new one, or the unresolved one this complaint joins.

    Returns (case, opened) where ``opened`` is False when the complaint joined a case.
    """
    existing = open_case_for(session, customer_id)
    if existing is not None:
        add_note(session, existing, now, actor, "joined", f"repeat complaint: {reason}")
        if PRIORITY_ORDER.get(priority, 9) < PRIORITY_ORDER.get(existing.priority, 9):
            existing.priority = priority
        existing.updated_at = now
        return existing, False
    case = Escalation(
        customer_id=customer_id,
        reason=reason,
        trigger_event_id=trigger_event_id,
        priority=priority,
        queue=queue,
        sla_due_at=sla_due_at,
        opened_at=now,
        updated_at=now,
    )
    session.add(case)
    session.flush()
    add_note(session, case, now, actor, "opened", reason)
    _touch_customer(session, customer_id, now)
    return case, True


def add_note(
    session: Session, case: Escalation, now: datetime, actor: str, action: str, note: str
) -> None:
    assert case.id is not None
    session.add(
        EscalationNote(escalation_id=case.id, at=now, actor=actor, action=action, note=note)
    )


def get_case(session: Session, case_id: int) -> Escalation:
    case = session.get(Escalation, case_id)
    if case is None:
        raise NotFound("escalation case", case_id)
    return case


def acknowledge(session: Session, case_id: int, actor: str, now: datetime) -> Escalation:
    case = get_case(session, case_id)
    if case.status not in (EscalationStatus.OPEN, EscalationStatus.REOPENED):
        raise IllegalTransition("case", case_id, case.status, "acknowledge")
    case.status = EscalationStatus.ACKNOWLEDGED
    case.acknowledged_at = now
    case.owner = case.owner or actor
    case.updated_at = now
    add_note(session, case, now, actor, "acknowledged", "")
    return case


def assign(session: Session, case_id: int, owner: str, actor: str, now: datetime) -> Escalation:
    case = get_case(session, case_id)
    if case.status == EscalationStatus.RESOLVED:
        raise IllegalTransition("case", case_id, case.status, "assign")
    case.owner = owner
    case.updated_at = now
    add_note(session, case, now, actor, "assigned", f"to {owner}")
    return case


def resolve(session: Session, case_id: int, note: str, actor: str, now: datetime) -> Escalation:
    case = get_case(session, case_id)
    if case.status == EscalationStatus.RESOLVED:
        raise IllegalTransition("case", case_id, case.status, "resolve")
    if not note.strip():
        raise IllegalTransition("case", case_id, case.status, "resolve without a note")
    case.status = EscalationStatus.RESOLVED
    case.resolved_at = now
    case.updated_at = now
    add_note(session, case, now, actor, "resolved", note)
    _touch_customer(session, case.customer_id, now)
    return case


def reopen(session: Session, case_id: int, note: str, actor: str, now: datetime) -> Escalation:
    case = get_case(session, case_id)
    if case.status != EscalationStatus.RESOLVED:
        raise IllegalTransition("case", case_id, case.status, "reopen")
    case.status = EscalationStatus.REOPENED
    case.resolved_at = None
    case.updated_at = now
    add_note(session, case, now, actor, "reopened", note)
    _touch_customer(session, case.customer_id, now)
    return case


def _touch_customer(session: Session, customer_id: str, now: datetime) -> None:
    """The customer's facts changed (open_complaints): the next incremental tick looks again."""
    from engine.data.models import Customer

    customer = session.get(Customer, customer_id)
    if customer is not None:
        customer.changed_at = now


def history(session: Session, case_id: int) -> list[EscalationNote]:
    statement = (
        select(EscalationNote)
        .where(col(EscalationNote.escalation_id) == case_id)
        .order_by(col(EscalationNote.at), col(EscalationNote.id))
    )
    return list(session.scalars(statement))

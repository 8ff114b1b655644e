"""Staff notifications about escalation cases, queued in the outbox like any message.

A new case notifies the on-duty lead of tier 1 (decided by the journey planner, with the
case's other effects); an SLA breach notifies the on-duty lead one tier above the highest
tier notified so far, exactly once per breach: the outbox's unique ``dedupe_key``
(``case:<id>:breached:<tier>:<channel>``) makes a repeat impossible.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from engine.data.models import Escalation, EscalationStatus, Message, MessageStatus
from engine.escalations.cases import add_note
from engine.playbooks.model import Lead, RuleSet

NOTIFY_STATES = (EscalationStatus.OPEN, EscalationStatus.REOPENED)


def _queue_for_lead(
    session: Session, case: Escalation, lead: Lead, what: str, tier: int, now: datetime
) -> list[Message]:
    queued = []
    targets = [("email", lead.email)] + ([("sms", lead.phone)] if lead.phone else [])
    for channel, address in targets:
        message = Message(
            id=str(uuid.uuid4()),
            dedupe_key=f"case:{case.id}:{what}:{tier}:{channel}",
            customer_id=case.customer_id,
            escalation_id=case.id,
            playbook="complaint_escalation",
            step_id=what,
            kind="staff",
            channel=channel,
            template=f"case_{what}",
            to_address=address,
            context={
                "case": {
                    "id": case.id,
                    "reason": case.reason,
                    "priority": case.priority,
                    "queue": case.queue,
                    "sla_due_at": case.sla_due_at.strftime("%Y-%m-%d %H:%M UTC"),
                    "customer_id": case.customer_id,
                },
                "lead": {"name": lead.name, "tier": lead.tier},
            },
            priority=0,
            status=MessageStatus.QUEUED,
            due_at=now,
            created_at=now,
            updated_at=now,
        )
        nested = session.begin_nested()
        try:
            session.add(message)
            session.flush()
            nested.commit()
            queued.append(message)
        except IntegrityError:
            nested.rollback()  # already notified for this case, tier and channel
    return queued


def check_sla(session: Session, rules: RuleSet, now: datetime) -> list[Message]:
    """Notify one tier up for every unacknowledged case past its SLA, exactly once."""
    statement = select(Escalation).where(
        col(Escalation.status).in_(NOTIFY_STATES),
        col(Escalation.sla_due_at) <= now,
        col(Escalation.breach_notified_at).is_(None),
    )
    queued: list[Message] = []
    for case in session.scalars(statement):
        case.breach_notified_at = now
        case.updated_at = now
        lead = rules.roster.on_duty(case.notified_tier + 1)
        if lead is None or lead.tier <= case.notified_tier:
            add_note(
                session, case, now, "sla-check", "breached", "SLA passed; nobody above to notify"
            )
            continue
        queued.extend(_queue_for_lead(session, case, lead, "breached", lead.tier, now))
        case.notified_tier = lead.tier
        add_note(
            session,
            case,
            now,
            "sla-check",
            "breached",
            f"SLA passed; notified {lead.name} (tier {lead.tier})",
        )
    return queued

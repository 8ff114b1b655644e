"""GDPR: everything held about a person (export), and their personal data removed (erase).

Shared by ``lifecycle customers export|erase`` and the API's
``GET /v1/customers/{id}/export`` and ``POST /v1/customers/{id}/erase``.

**Export** is every row that is about the customer, as JSON: the customer row (attributes
and consent stamps included), their events, journeys (enrollments), messages (address,
template, the context it was rendered from, status and times), decisions (with the facts
each saw), complaint cases with their history, the suppressions of their addresses, and
earlier erasures. Console sessions and sign-in attempts are the staff's, not the
customer's, and are not part of it.

**Erase** removes or anonymises the personal data in one transaction, set-based (one
statement per table), and keeps what the business must keep:

- the customer row stays, with its id, sign-up time and counts (orders, spend, last
  activity, NPS): email, phone, first name, attributes go; timezone and locale return to
  their defaults; consent is withdrawn; ``erased_at`` is set;
- events keep their type and time (the counts and roll-ups), not their properties;
- messages keep their status, channel, template and times, not the address nor the
  context they were rendered from; queued ones are cancelled;
- decisions keep their outcome, not the facts they saw, and the addresses quoted in their
  reasons are replaced; case reasons and history notes are replaced;
- every address of the person stays suppressed, as a keyed digest (engine.data.erasure),
  so a later import of the same address is suppressed again; a plain suppression that
  another customer's address still needs is left as it is;
- an ``erasures`` row records who asked, when, and how many rows of each kind changed,
  and a decision ``erased`` says so in the customer's timeline;
- from then on ingestion refuses data about the id (``CustomerErased``), so a sync does
  not bring the person back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlmodel import Session, SQLModel, col

from engine.data.erasure import ErasedAddresses
from engine.data.models import (
    Customer,
    Decision,
    Enrollment,
    Erasure,
    Escalation,
    EscalationNote,
    Event,
    Message,
    MessageStatus,
    Suppression,
)
from engine.errors import NotFound

ERASED = "[erased]"
ERASED_REASON = "erased on request (GDPR)"


def export_customer(session: Session, customer_id: str, now: datetime) -> dict[str, Any]:
    """Everything held about the customer, as JSON-ready data; raises NotFound."""
    customer = session.get(Customer, customer_id)
    if customer is None:
        raise NotFound("customer", customer_id)
    cases = _rows(session, Escalation, col(Escalation.customer_id) == customer_id)
    case_ids = [case["id"] for case in cases]
    history = (
        _rows(session, EscalationNote, col(EscalationNote.escalation_id).in_(case_ids))
        if case_ids
        else []
    )
    for case in cases:
        case["history"] = [note for note in history if note["escalation_id"] == case["id"]]
    messages = _rows(session, Message, col(Message.customer_id) == customer_id)
    addresses = _addresses(customer) | {
        (m["channel"], m["to_address"]) for m in messages if m["kind"] != "staff"
    }
    return {
        "exported_at": now.isoformat(),
        "customer": customer.model_dump(mode="json", warnings=False),
        "events": _rows(session, Event, col(Event.customer_id) == customer_id),
        "enrollments": _rows(session, Enrollment, col(Enrollment.customer_id) == customer_id),
        "messages": messages,
        "decisions": _rows(session, Decision, col(Decision.customer_id) == customer_id),
        "cases": cases,
        "suppressions": _suppressions(session, addresses),
        "erasures": _rows(session, Erasure, col(Erasure.customer_id) == customer_id),
    }


def erase_customer(
    session: Session, customer_id: str, actor: str, erased: ErasedAddresses, now: datetime
) -> Erasure:
    """Remove or anonymise the customer's personal data (see the module docstring);
    returns the audit row. Raises NotFound. Erasing again is harmless: one more audit row."""
    customer = session.get(Customer, customer_id, with_for_update=True)
    if customer is None:
        raise NotFound("customer", customer_id)
    addresses = _addresses(customer) | _message_addresses(session, customer_id)
    counts = {
        "suppressions": _keep_suppressed(session, customer_id, addresses, erased, now),
        "cancelled": _cancel_queued(session, customer_id, now),
        "messages": _erase_messages(session, customer_id, now),
        "events": _count(
            session,
            update(Event).where(col(Event.customer_id) == customer_id).values(properties={}),
        ),
        "decisions": _erase_decisions(session, customer_id, addresses),
        "cases": _count(
            session,
            update(Escalation)
            .where(col(Escalation.customer_id) == customer_id)
            .values(reason=ERASED, updated_at=now),
        ),
        "case_notes": _count(
            session,
            update(EscalationNote)
            .where(
                col(EscalationNote.escalation_id).in_(
                    select(col(Escalation.id)).where(col(Escalation.customer_id) == customer_id)
                ),
                col(EscalationNote.note) != "",
            )
            .values(note=ERASED),
        ),
    }
    _erase_row(customer, now)
    audit = Erasure(customer_id=customer_id, erased_at=now, erased_by=actor[:100], counts=counts)
    session.add(audit)
    session.add(
        Decision(
            at=now,
            customer_id=customer_id,
            playbook="",
            outcome="erased",
            reason=f"personal data erased on the request of {actor}"[:500],
        )
    )
    session.flush()
    return audit


def _rows(session: Session, model: type[SQLModel], *where: Any) -> list[dict[str, Any]]:
    statement = select(model).where(*where).order_by(*model.__table__.primary_key.columns)  # type: ignore[attr-defined]
    return [row.model_dump(mode="json", warnings=False) for row in session.scalars(statement)]


def _addresses(customer: Customer) -> set[tuple[str, str]]:
    found = set()
    if customer.email:
        found.add(("email", customer.email))
    if customer.phone:
        found.add(("sms", customer.phone))
    return found


def _message_addresses(session: Session, customer_id: str) -> set[tuple[str, str]]:
    """Addresses the customer was written to (an old number, an earlier email)."""
    statement = (
        select(col(Message.channel), col(Message.to_address))
        .where(
            col(Message.customer_id) == customer_id,
            col(Message.kind) != "staff",
            col(Message.to_address).not_in((ERASED, "")),
        )
        .distinct()
    )
    return {(channel, address) for channel, address in session.execute(statement)}


def _suppressions(session: Session, addresses: set[tuple[str, str]]) -> list[dict[str, Any]]:
    if not addresses:
        return []
    wanted = [
        (col(Suppression.channel) == channel) & (col(Suppression.address) == address)
        for channel, address in sorted(addresses)
    ]
    return _rows(session, Suppression, or_(*wanted))


def _keep_suppressed(
    session: Session,
    customer_id: str,
    addresses: set[tuple[str, str]],
    erased: ErasedAddresses,
    now: datetime,
) -> int:
    """Each address stays suppressed, as its digest: a plain suppression becomes the
    digest unless another customer still has the address; a digest is added for an
    address that was not suppressed. Returns how many suppressions now stand for them."""
    kept = 0
    for channel, address in sorted(addresses):
        digest = erased.digest(channel, address)
        plain = session.scalars(
            select(Suppression).where(
                col(Suppression.channel) == channel, col(Suppression.address) == address
            )
        ).first()
        hashed = session.scalars(
            select(Suppression).where(
                col(Suppression.channel) == channel, col(Suppression.address) == digest
            )
        ).first()
        shared = _held_by_others(session, customer_id, channel, address)
        if hashed is None and plain is not None and not shared:
            plain.address = digest  # the suppression stays, without the address
        elif hashed is None:
            reason = plain.reason if plain is not None else ERASED_REASON
            session.add(
                Suppression(
                    channel=channel, address=digest, reason=reason, source="erasure", created_at=now
                )
            )
        elif plain is not None and not shared:
            session.delete(plain)  # erased before, and the address came back since
        kept += 1
    return kept


def _held_by_others(session: Session, customer_id: str, channel: str, address: str) -> bool:
    column = col(Customer.email) if channel == "email" else col(Customer.phone)
    statement = select(func.count()).where(column == address, col(Customer.id) != customer_id)
    return bool(session.scalar(statement))


def _cancel_queued(session: Session, customer_id: str, now: datetime) -> int:
    statement = (
        update(Message)
        .where(
            col(Message.customer_id) == customer_id,
            col(Message.status) == MessageStatus.QUEUED,
            col(Message.kind) != "staff",
        )
        .values(
            status=MessageStatus.CANCELLED,
            last_error="cancelled: the customer's personal data was erased",
            updated_at=now,
        )
    )
    return _count(session, statement)


def _erase_messages(session: Session, customer_id: str, now: datetime) -> int:
    """The customer's messages lose their address and context; staff notifications about
    the customer keep the lead's address but lose the context (it quotes the customer)."""
    mine = col(Message.customer_id) == customer_id
    _count(
        session,
        update(Message).where(mine, col(Message.kind) == "staff").values(context={}),
    )
    return _count(
        session,
        update(Message)
        .where(mine, col(Message.kind) != "staff")
        .values(to_address=ERASED, context={}, updated_at=now),
    )


def _erase_decisions(session: Session, customer_id: str, addresses: set[tuple[str, str]]) -> int:
    reason: Any = col(Decision.reason)
    for _, address in sorted(addresses):
        reason = func.replace(reason, address, ERASED)
    statement = (
        update(Decision)
        .where(col(Decision.customer_id) == customer_id)
        .values(facts={}, reason=reason)
    )
    return _count(session, statement)


def _erase_row(customer: Customer, now: datetime) -> None:
    defaults = Customer.model_fields
    customer.email = customer.phone = customer.first_name = None
    customer.attributes = {}
    customer.timezone = defaults["timezone"].default
    customer.locale = defaults["locale"].default
    if customer.email_opt_in:
        customer.email_opt_in, customer.email_opt_out_at = False, now
    if customer.sms_opt_in:
        customer.sms_opt_in, customer.sms_opt_out_at = False, now
    customer.erased_at = customer.changed_at = customer.updated_at = now


def _count(session: Session, statement: Any) -> int:
    return int(session.execute(statement).rowcount or 0)  # type: ignore[attr-defined]

"""The facts builder: typed facts for a batch of customers, in three SQL queries a batch.

One query reads the customer rows (with their event roll-ups), one counts open complaint
cases, one finds suppressed addresses; no query is ever made per customer. Facts are plain
typed Python values (see engine.language.catalog); the durable_rules encoding happens later.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Row
from sqlmodel import Session, col

from engine.clock import epoch_days, whole_days_between
from engine.data.models import Customer, Escalation, EscalationStatus, Event, Suppression
from engine.language.catalog import EVENT_PROPERTY_PREFIX, FactCatalog, FactType
from engine.language.conditions import MAX_INT

CUSTOMER_COLUMNS = (
    col(Customer.id),
    col(Customer.email),
    col(Customer.phone),
    col(Customer.first_name),
    col(Customer.timezone),
    col(Customer.locale),
    col(Customer.email_opt_in),
    col(Customer.sms_opt_in),
    col(Customer.attributes),
    col(Customer.signed_up_at),
    col(Customer.orders_count),
    col(Customer.total_spend_cents),
    col(Customer.last_order_at),
    col(Customer.last_activity_at),
    col(Customer.nps_score),
)


@dataclass(frozen=True)
class Subject:
    """One thing to evaluate: a customer's facts, and the event that triggered it if any."""

    customer_id: str
    facts: dict[str, Any]
    event_id: str | None = None
    event_type: str | None = None

    @property
    def key(self) -> str:
        return f"{self.customer_id}|{self.event_id}" if self.event_id else self.customer_id


def customer_rows(session: Session, ids: Sequence[str]) -> list[Row[Any]]:
    if not ids:
        return []
    statement = select(*CUSTOMER_COLUMNS).where(col(Customer.id).in_(ids))
    return list(session.execute(statement))


def iter_customer_id_batches(session: Session, batch_size: int) -> Iterator[list[str]]:
    """Every customer id, in batches, by keyset pagination (constant memory, no OFFSET)."""
    last = ""
    while True:
        statement = (
            select(col(Customer.id))
            .where(col(Customer.id) > last)
            .order_by(col(Customer.id))
            .limit(batch_size)
        )
        ids = list(session.scalars(statement))
        if not ids:
            return
        yield ids
        last = ids[-1]


def open_complaint_counts(session: Session, ids: Sequence[str]) -> dict[str, int]:
    if not ids:
        return {}
    statement = (
        select(col(Escalation.customer_id), func.count())
        .where(col(Escalation.customer_id).in_(ids))
        .where(col(Escalation.status) != EscalationStatus.RESOLVED)
        .group_by(col(Escalation.customer_id))
    )
    return {customer_id: count for customer_id, count in session.execute(statement)}


def suppressed_addresses(session: Session, rows: Sequence[Row[Any]]) -> set[tuple[str, str]]:
    emails = [row.email for row in rows if row.email]
    phones = [row.phone for row in rows if row.phone]
    found: set[tuple[str, str]] = set()
    for channel, addresses in (("email", emails), ("sms", phones)):
        if addresses:
            statement = select(col(Suppression.channel), col(Suppression.address)).where(
                col(Suppression.channel) == channel,
                col(Suppression.address).in_(addresses),
            )
            found.update((c, a) for c, a in session.execute(statement))
    return found


def _whole(value: Any) -> int | None:
    """A whole number the rules engine compares exactly, else unknown: one customer with
    an absurd total must not stop the evaluation of everyone else."""
    if isinstance(value, int) and not isinstance(value, bool) and -MAX_INT <= value <= MAX_INT:
        return value
    return None


def attribute_value(value: Any, kind: FactType) -> Any:
    """Coerce a stored attribute to its catalog type; anything else is unknown (None)."""
    if value is None:
        return None
    if kind is FactType.BOOL:
        return value if isinstance(value, bool) else None
    if kind in (FactType.INT, FactType.MONEY):
        return _whole(value)
    if kind is FactType.DATE:
        try:
            return epoch_days(date.fromisoformat(str(value)))
        except ValueError:
            return None
    return value if isinstance(value, str) else None


def build_facts(
    row: Row[Any] | Customer,
    catalog: FactCatalog,
    now: datetime,
    *,
    open_complaints: int = 0,
    suppressed: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset(),
    event: Event | None = None,
) -> dict[str, Any]:
    """Every catalog fact for one customer at ``now`` (and for ``event`` when given)."""
    has_email = bool(row.email) and ("email", row.email) not in suppressed
    has_phone = bool(row.phone) and ("sms", row.phone) not in suppressed
    facts: dict[str, Any] = {
        "days_since_signup": whole_days_between(row.signed_up_at, now),
        "days_since_last_activity": whole_days_between(
            row.last_activity_at or row.signed_up_at, now
        ),
        "orders_count": _whole(row.orders_count),
        "total_spend_cents": _whole(row.total_spend_cents),
        "last_order_days_ago": (
            whole_days_between(row.last_order_at, now) if row.last_order_at is not None else None
        ),
        "nps_score": row.nps_score,
        "open_complaints": open_complaints,
        "email_opt_in": bool(row.email_opt_in),
        "sms_opt_in": bool(row.sms_opt_in),
        "has_email": has_email,
        "has_phone": has_phone,
        "locale": row.locale,
        "timezone": row.timezone,
        "event": None,
        "event_days_ago": None,
    }
    attributes = row.attributes or {}
    for spec in catalog.attributes():
        facts[spec.name] = attribute_value(attributes.get(spec.name), spec.type)
    event_specs = catalog.event_properties()
    for spec in event_specs:
        facts[spec.name] = None
    if event is not None:
        facts["event"] = event.type
        facts["event_days_ago"] = whole_days_between(event.occurred_at, now)
        for spec in event_specs:
            prop = spec.name.removeprefix(EVENT_PROPERTY_PREFIX)
            facts[spec.name] = attribute_value(event.properties.get(prop), spec.type)
    return facts


def subjects_for(
    session: Session,
    ids: Sequence[str],
    catalog: FactCatalog,
    now: datetime,
    events: Sequence[Event] = (),
    *,
    include_sweep: bool = True,
) -> list[Subject]:
    """Subjects for a batch: one per customer (a sweep) plus one per pending event."""
    rows = customer_rows(session, ids)
    complaints = open_complaint_counts(session, ids)
    suppressed = suppressed_addresses(session, rows)
    by_id = {row.id: row for row in rows}
    subjects: list[Subject] = []
    row: Row[Any] | None
    if include_sweep:
        for row in rows:
            facts = build_facts(
                row, catalog, now, open_complaints=complaints.get(row.id, 0), suppressed=suppressed
            )
            subjects.append(Subject(row.id, facts))
    for event in events:
        row = by_id.get(event.customer_id)
        if row is None:
            continue
        facts = build_facts(
            row,
            catalog,
            now,
            open_complaints=complaints.get(row.id, 0),
            suppressed=suppressed,
            event=event,
        )
        subjects.append(Subject(row.id, facts, event.id, event.type))
    return subjects


def pending_events(
    session: Session, ids: Sequence[str] | None = None, limit: int | None = None
) -> list[Event]:
    """Events not yet evaluated, oldest first (optionally only for some customers)."""
    statement = select(Event).where(col(Event.evaluated_at).is_(None))
    if ids is not None:
        statement = statement.where(col(Event.customer_id).in_(ids))
    statement = statement.order_by(col(Event.occurred_at), col(Event.id))
    if limit is not None:
        statement = statement.limit(limit)
    return list(session.scalars(statement))

"""The facts builder: typed facts for a batch of customers, in three SQL queries a batch.

One query reads the customer rows (with their event roll-ups and topic choices), one
counts open complaint cases, one finds suppressed addresses; no query is ever made per
customer. Facts are plain typed Python values (see engine.language.catalog); the
durable_rules encoding happens later.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, NamedTuple

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.engine import Row
from sqlmodel import Session, col

from engine.clock import epoch_days, whole_days_between
from engine.data.models import Customer, Escalation, EscalationStatus, Event, Suppression
from engine.data.topics import topic_facts
from engine.evaluation.model import Subject
from engine.language.catalog import EVENT_PROPERTY_PREFIX, FactCatalog, FactType, Topic
from engine.language.conditions import MAX_INT
from engine.stages.model import StageChange, StageModel

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
    col(Customer.topics),  # the preference centre (engine.data.topics)
    col(Customer.stage),  # the stage recorded at the last evaluation (engine.stages)
    col(Customer.stage_since),
    col(Customer.previous_stage),
)


def customer_rows(session: Session, ids: Sequence[str]) -> list[Row[Any]]:
    if not ids:
        return []
    statement = select(*CUSTOMER_COLUMNS).where(col(Customer.id).in_(ids))
    return list(session.execute(statement))


CUSTOMER_FIELDS = (
    "id",
    "email",
    "phone",
    "first_name",
    "timezone",
    "locale",
    "email_opt_in",
    "sms_opt_in",
    "attributes",
    "signed_up_at",
    "orders_count",
    "total_spend_cents",
    "last_order_at",
    "last_activity_at",
    "nps_score",
    "topics",
    "stage",
    "stage_since",
    "previous_stage",
)
# The row, and what the facts need of other tables, in one query: each subquery is one
# index lookup (suppressions by address, escalations by customer).
_SELECT_CUSTOMERS = (
    "SELECT "
    + ", ".join(f"c.{name}" for name in CUSTOMER_FIELDS)
    + ", EXISTS (SELECT 1 FROM suppressions s WHERE s.channel = 'email' AND s.address = c.email)"
    + ", EXISTS (SELECT 1 FROM suppressions s WHERE s.channel = 'sms' AND s.address = c.phone)"
    + ", (SELECT count(*) FROM escalations e WHERE e.customer_id = c.id"
    + "   AND e.status != 'resolved')"
    + " FROM customers c WHERE "
)


class CustomerRow(NamedTuple):
    """A customer's columns as the facts need them (the same values as the ORM's)."""

    id: str
    email: str | None
    phone: str | None
    first_name: str | None
    timezone: str
    locale: str
    email_opt_in: bool
    sms_opt_in: bool
    attributes: dict[str, Any]
    signed_up_at: datetime
    orders_count: int
    total_spend_cents: int
    last_order_at: datetime | None
    last_activity_at: datetime | None
    nps_score: int | None
    topics: dict[str, Any]
    stage: str | None = None
    stage_since: datetime | None = None
    previous_stage: str | None = None
    email_suppressed: bool = False
    phone_suppressed: bool = False
    open_complaints: int = 0


assert CustomerRow._fields[: len(CUSTOMER_FIELDS)] == CUSTOMER_FIELDS
assert tuple(c.key for c in CUSTOMER_COLUMNS) == CUSTOMER_FIELDS  # type: ignore[union-attr]


def _instant(value: Any) -> datetime | None:
    # SQLite hands back UTCDateTime's text ("2026-03-02 09:00:00.000000", UTC); PostgreSQL
    # an aware datetime already, kept as it is (no conversion: a million a sweep).
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _json(value: Any) -> Any:
    # SQLite hands back JSON columns as text through text(); PostgreSQL as values.
    return json.loads(value) if isinstance(value, str) else value


def _decoded(v: Sequence[Any]) -> CustomerRow:
    """A driver row (CUSTOMER_FIELDS, then the suppression flags and the open cases) as
    the typed columns would give it; written out field by field, since a sweep does it
    a million times."""
    return CustomerRow(
        v[0],
        v[1],
        v[2],
        v[3],
        v[4],
        v[5],
        bool(v[6]),
        bool(v[7]),
        _json(v[8]),
        _instant(v[9]),  # type: ignore[arg-type]  # never NULL
        v[10],
        v[11],
        _instant(v[12]),
        _instant(v[13]),
        v[14],
        _json(v[15]),
        v[16],
        _instant(v[17]),
        v[18],
        bool(v[19]),
        bool(v[20]),
        v[21],
    )


def read_customers(
    session: Session,
    *,
    ids: Sequence[str] | None = None,
    after: str | None = None,
    upto: str | None = None,
) -> list[CustomerRow]:
    """Customer rows for the facts, by ids or by an id range (``after`` exclusive, ``upto``
    inclusive), in id order, decoded without SQLAlchemy's per-value processing."""
    params: dict[str, Any] = {}
    if ids is not None:
        if not ids:
            return []
        clause = "c.id IN :ids"
        params["ids"] = list(ids)
        statement = text(_SELECT_CUSTOMERS + clause + " ORDER BY c.id").bindparams(
            bindparam("ids", expanding=True)
        )
    else:
        parts = []
        if after is not None:
            parts.append("c.id > :after")
            params["after"] = after
        if upto is not None:
            parts.append("c.id <= :upto")
            params["upto"] = upto
        where = " AND ".join(parts) or "1 = 1"
        statement = text(_SELECT_CUSTOMERS + where + " ORDER BY c.id")
    return [_decoded(values) for values in session.execute(statement, params)]


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


def suppressed_addresses(session: Session, rows: Sequence[Any]) -> set[tuple[str, str]]:
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
    row: Any,
    catalog: FactCatalog,
    now: datetime,
    *,
    open_complaints: int = 0,
    suppressed: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset(),
    event: Event | None = None,
    stages: StageModel | None = None,
) -> dict[str, Any]:
    """Every catalog fact for one customer at ``now`` (and for ``event`` when given), with
    the stage facts of ``stages`` (unknown without a stage model).

    ``row`` is anything with the customer's columns as attributes (a ``CustomerRow``, a
    row of ``customer_rows``, a ``Customer``)."""
    shape = _FactShape.of(catalog, stages)
    return shape.facts(row, now, open_complaints, suppressed, event)[0]


@dataclass(frozen=True)
class _FactShape:
    """The catalog's attributes and event properties, looked up once per batch."""

    attributes: tuple[tuple[str, FactType], ...]
    properties: tuple[tuple[str, str, FactType], ...]  # (fact name, property, type)
    topics: tuple[Topic, ...]
    stages: StageModel | None = None

    @classmethod
    def of(cls, catalog: FactCatalog, stages: StageModel | None = None) -> _FactShape:
        return cls(
            tuple((s.name, s.type) for s in catalog.attributes()),
            tuple(
                (s.name, s.name.removeprefix(EVENT_PROPERTY_PREFIX), s.type)
                for s in catalog.event_properties()
            ),
            tuple(catalog.topics.values()),
            stages,
        )

    def row_facts(
        self, row: CustomerRow, now: datetime, event: Event | None
    ) -> tuple[dict[str, Any], StageChange | None]:
        suppressed: set[tuple[str, str]] = set()
        if row.email_suppressed and row.email:
            suppressed.add(("email", row.email))
        if row.phone_suppressed and row.phone:
            suppressed.add(("sms", row.phone))
        return self.facts(row, now, row.open_complaints, suppressed, event)

    def facts(
        self,
        row: Any,
        now: datetime,
        open_complaints: int,
        suppressed: set[tuple[str, str]] | frozenset[tuple[str, str]],
        event: Event | None,
    ) -> tuple[dict[str, Any], StageChange | None]:
        """The facts, and the stage change this evaluation makes (None: no change, or no
        stage model)."""
        email, phone = row.email, row.phone
        signed_up = row.signed_up_at
        last_order = row.last_order_at
        facts: dict[str, Any] = {
            "days_since_signup": whole_days_between(signed_up, now),
            "days_since_last_activity": whole_days_between(row.last_activity_at or signed_up, now),
            "orders_count": _whole(row.orders_count),
            "total_spend_cents": _whole(row.total_spend_cents),
            "last_order_days_ago": (
                whole_days_between(last_order, now) if last_order is not None else None
            ),
            "nps_score": row.nps_score,
            "open_complaints": open_complaints,
            "email_opt_in": bool(row.email_opt_in),
            "sms_opt_in": bool(row.sms_opt_in),
            "has_email": bool(email) and ("email", email) not in suppressed,
            "has_phone": bool(phone) and ("sms", phone) not in suppressed,
            "locale": row.locale,
            "timezone": row.timezone,
            "event": None,
            "event_days_ago": None,
        }
        attributes = row.attributes or {}
        for name, kind in self.attributes:
            facts[name] = attribute_value(attributes.get(name), kind)
        if self.topics:
            facts.update(topic_facts(row.topics, self.topics))
        change = self._stage(row, facts, now)
        if event is None:
            for name, _, _ in self.properties:
                facts[name] = None
            return facts, change
        facts["event"] = event.type
        facts["event_days_ago"] = whole_days_between(event.occurred_at, now)
        properties = event.properties
        for name, prop, kind in self.properties:
            facts[name] = attribute_value(properties.get(prop), kind)
        return facts, change

    def _stage(self, row: Any, facts: dict[str, Any], now: datetime) -> StageChange | None:
        """The stage facts, decided from the other facts (never the event's: a stage is
        the customer's, whatever triggered the evaluation)."""
        if self.stages is None:
            facts.update(stage=None, days_in_stage=None, previous_stage=None)
            return None
        return self.stages.apply(
            facts,
            getattr(row, "stage", None),
            _instant(getattr(row, "stage_since", None)),
            getattr(row, "previous_stage", None),
            now,
        )


def subjects_for(
    session: Session,
    ids: Sequence[str],
    catalog: FactCatalog,
    now: datetime,
    events: Sequence[Event] = (),
    *,
    include_sweep: bool = True,
    stages: StageModel | None = None,
) -> list[Subject]:
    """Subjects for a batch: one per customer (a sweep) plus one per pending event."""
    rows = read_customers(session, ids=ids)
    return _subjects(session, rows, catalog, now, events, include_sweep, stages)


def subjects_in_range(
    session: Session,
    catalog: FactCatalog,
    now: datetime,
    *,
    after: str | None,
    upto: str | None,
    with_events: bool = True,
    stages: StageModel | None = None,
) -> list[Subject]:
    """Subjects for every customer with an id in (``after``, ``upto``], and for their
    pending events (``with_events``): a shard of a sweep."""
    rows = read_customers(session, after=after, upto=upto)
    events = pending_events_in_range(session, after, upto) if with_events else []
    return _subjects(session, rows, catalog, now, events, True, stages)


def _subjects(
    session: Session,
    rows: Sequence[CustomerRow],
    catalog: FactCatalog,
    now: datetime,
    events: Sequence[Event],
    include_sweep: bool,
    stages: StageModel | None = None,
) -> list[Subject]:
    shape = _FactShape.of(catalog, stages)
    subjects: list[Subject] = []
    if include_sweep:
        for row in rows:
            facts, change = shape.row_facts(row, now, None)
            subjects.append(Subject(row.id, facts, stage_change=change))
    by_id = {row.id: row for row in rows}
    for event in events:
        found = by_id.get(event.customer_id)
        if found is None:
            continue
        facts, _ = shape.row_facts(found, now, event)  # the sweep's subject records it
        subjects.append(Subject(found.id, facts, event.id, event.type, event.occurred_at))
    return subjects


def pending_events_in_range(session: Session, after: str | None, upto: str | None) -> list[Event]:
    """Events not yet evaluated of customers with ids in (``after``, ``upto``], oldest first."""
    statement = select(Event).where(col(Event.evaluated_at).is_(None))
    if after is not None:
        statement = statement.where(col(Event.customer_id) > after)
    if upto is not None:
        statement = statement.where(col(Event.customer_id) <= upto)
    return list(session.scalars(statement.order_by(col(Event.occurred_at), col(Event.id))))


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

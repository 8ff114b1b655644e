"""Synthetic customers with believable histories, for demos, previews and benchmarks.

Every shipped playbook finds customers when the seeded database is evaluated at ``now``:

    new         signed up in the last two days; the ``signed_up`` event is still pending
                (not yet evaluated), so the next evaluation starts welcome_series
    active      ordered or visited in the last month
    lapsed      has ordered, but nothing for 30 to 200 days (re_engagement)
    loyal       five orders or more (loyalty_reward)
    promoter    ordered, and answered the NPS survey with 9 or 10 (referral_ask)
    browser     visits, never ordered
    complainer  an active buyer with a complaint in the last day, still pending
                (complaint_escalation)

Kinds follow a fixed cycle of 50 whose first seven entries are one of each kind, so even a
handful of customers covers every playbook; the first cycle is also opted in to email and
(where there is a phone) SMS. Everything else is drawn from a random generator seeded by
``(seed, customer number)``: the same seed, number and ``now`` always give the same
customer, whatever the batch size.

Ids are ``seed-00000001`` for customers and ``seed-00000001-3`` for the third event of
that customer. Seeding a database that already holds seeded customers continues after the
highest number found, so a second run adds new customers and never collides.

Roll-ups are folded with ``engine.data.ingest.apply_rollups`` in the order the events happened,
exactly as ingesting them one by one would, and rows go in through SQLAlchemy Core
``insert`` with one executemany per batch and table, one transaction per batch, so memory
stays flat from a hundred customers to millions.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    Dialect,
    Engine,
    Table,
    column,
    func,
    insert,
    select,
)
from sqlalchemy import table as table_clause
from sqlmodel import col
from sqlmodel.sql.sqltypes import UTCDateTime

from engine.clock import as_utc
from engine.data.ingest import Rollups, apply_rollups
from engine.data.models import Customer, Event

ID_PREFIX = "seed-"
ID_DIGITS = 8
_SEEDED_ID = re.compile(rf"^{ID_PREFIX}(\d{{{ID_DIGITS}}})$")

Progress = Callable[[int, int], None]

# (weight, kind) per cycle of 50; see the module docstring.
KINDS: tuple[tuple[str, int], ...] = (
    ("new", 4),
    ("active", 15),
    ("lapsed", 12),
    ("loyal", 5),
    ("promoter", 4),
    ("browser", 9),
    ("complainer", 1),
)


def _cycle() -> tuple[str, ...]:
    # Spread each kind evenly over the cycle; the first entry of every kind comes first.
    slots = [
        (k / count, order, kind) for order, (kind, count) in enumerate(KINDS) for k in range(count)
    ]
    return tuple(kind for _, _, kind in sorted(slots))


CYCLE = _cycle()
SEGMENTS = {
    "new": "new",
    "active": "regular",
    "lapsed": "lapsed",
    "loyal": "loyal",
    "promoter": "loyal",
    "browser": "bargain_hunter",
    "complainer": "regular",
}
# IANA zone, weight, locale, phone style.
ZONES: tuple[tuple[str, int, str, str], ...] = (
    ("Europe/London", 30, "en-GB", "uk"),
    ("America/New_York", 18, "en-US", "us"),
    ("America/Los_Angeles", 12, "en-US", "us"),
    ("Europe/Berlin", 10, "de-DE", "uk"),
    ("Europe/Paris", 6, "fr-FR", "uk"),
    ("Asia/Tokyo", 7, "ja-JP", "us"),
    ("Australia/Sydney", 7, "en-AU", "uk"),
    ("America/Sao_Paulo", 4, "pt-BR", "us"),
    ("UTC", 6, "en", "uk"),
)
_ZONE_CHOICES = [zone for zone in ZONES for _ in range(zone[1])]
FIRST_NAMES = (
    "Olivia", "Amelia", "Isla", "Ava", "Mia", "Sofia", "Grace", "Aisha", "Priya", "Yuki",
    "Hana", "Lena", "Emma", "Chloe", "Lucia", "Zara", "Maya", "Nora", "Ines", "Mei",
    "Oliver", "George", "Noah", "Arthur", "Leo", "Harry", "Jack", "Mohammed", "Arjun", "Kenji",
    "Haruto", "Lukas", "Felix", "Mateo", "Lucas", "Ethan", "Liam", "Omar", "Tom", "Wei",
)  # fmt: skip
COMPLAINTS = (
    ("My parcel arrived broken", 2),
    ("I was charged twice", 3),
    ("The delivery is two weeks late", 2),
    ("Wrong size sent", 1),
    ("Nobody answers the phone", 2),
    ("The refund never arrived", 3),
    ("The app logs me out all the time", 1),
)
PLANS = ("free",) * 11 + ("plus",) * 6 + ("pro",) * 3
PENDING_SIGNUP_WINDOW = timedelta(days=2)
PENDING_COMPLAINT_WINDOW = timedelta(days=1)


@dataclass
class SeedReport:
    """What one seeding run added."""

    customers: int = 0
    events: int = 0
    pending_events: int = 0
    pending_by_type: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    first_id: str | None = None
    last_id: str | None = None

    def summary(self) -> str:
        if not self.customers:
            return "seeded nothing"
        pending = ", ".join(f"{n:,} {kind}" for kind, n in sorted(self.pending_by_type.items()))
        return (
            f"seeded {self.customers:,} customers ({self.first_id} … {self.last_id}) with "
            f"{self.events:,} events, {self.pending_events:,} of them pending ({pending})"
        )


@dataclass
class SeededCustomer:
    """One generated customer: its row and its events, as dicts for Core ``insert``."""

    kind: str
    row: dict[str, Any]
    events: list[dict[str, Any]]


def customer_id(number: int) -> str:
    return f"{ID_PREFIX}{number:0{ID_DIGITS}d}"


def seed(
    engine: Engine,
    customers: int,
    now: datetime,
    *,
    seed: int = 7,
    batch_size: int = 5000,
    progress: Progress | None = None,
) -> SeedReport:
    """Add ``customers`` synthetic customers and their events; see the module docstring."""
    if customers < 0:
        raise ValueError(f"cannot seed {customers} customers")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    now = as_utc(now)
    start = highest_seeded_number(engine) + 1
    if start + customers > 10**ID_DIGITS:
        raise ValueError(
            f"cannot seed {customers:,} more customers: seeded ids stop at "
            f"{customer_id(10**ID_DIGITS - 1)} and {customer_id(start - 1)} is taken"
        )
    report = SeedReport()
    insert_customers = _BulkInsert(engine, Customer.__table__)  # type: ignore[attr-defined]
    insert_events = _BulkInsert(engine, Event.__table__)  # type: ignore[attr-defined]
    done = 0
    for numbers in _batches(start, customers, batch_size):
        people = [generate_customer(n, now, seed=seed) for n in numbers]
        events = [event for person in people for event in person.events]
        with engine.begin() as connection:
            insert_customers(connection, [person.row for person in people])
            if events:
                insert_events(connection, events)
        for person in people:
            report.kinds[person.kind] = report.kinds.get(person.kind, 0) + 1
        for event in events:
            if event["evaluated_at"] is None:
                report.pending_events += 1
                kind = event["type"]
                report.pending_by_type[kind] = report.pending_by_type.get(kind, 0) + 1
        report.customers += len(people)
        report.events += len(events)
        report.first_id = report.first_id or people[0].row["id"]
        report.last_id = people[-1].row["id"]
        done += len(people)
        if progress is not None:
            progress(done, customers)
    return report


class _BulkInsert:
    """One Core ``insert`` executemany per batch.

    On SQLite, SQLAlchemy's per-value bind processing (aware datetime to UTC, then to text;
    JSON to text) costs more than the insert itself, so the values are encoded here, in C
    (``isoformat``, ``json.dumps``), and inserted through an untyped table clause. That is
    done only after checking, on a sample, that the result is exactly the text SQLAlchemy
    would store; otherwise, and on every other database, the typed table is used.
    """

    def __init__(self, engine: Engine, table: Table) -> None:
        self.dates = [c.name for c in table.columns if isinstance(c.type, UTCDateTime)]
        self.documents = [c.name for c in table.columns if isinstance(c.type, JSON)]
        self.encode = engine.dialect.name == "sqlite" and _encodes_like_sqlalchemy(
            engine.dialect, table.c[self.dates[0]], table.c[self.documents[0]]
        )
        target = table_clause(table.name, *(column(c.name) for c in table.columns))
        self.statement = insert(target if self.encode else table)

    def __call__(self, connection: Connection, rows: list[dict[str, Any]]) -> None:
        if self.encode:
            rows = [self._encoded(row) for row in rows]
        connection.execute(self.statement, rows)

    def _encoded(self, row: dict[str, Any]) -> dict[str, Any]:
        row = dict(row)
        for name in self.dates:
            if row[name] is not None:
                row[name] = _sqlite_datetime(row[name])
        for name in self.documents:
            row[name] = json.dumps(row[name])
        return row


def _sqlite_datetime(moment: datetime) -> str:
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return moment.isoformat(" ", "microseconds")[:26]  # without the "+00:00"


def _encodes_like_sqlalchemy(dialect: Dialect, date: Column[Any], document: Column[Any]) -> bool:
    moments = (
        datetime(2001, 2, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=2))),
        datetime(2026, 3, 2, 12, 0, tzinfo=UTC),
    )
    value = {"text": "é", "n": 1, "list": [True, None]}
    process_date = date.type.dialect_impl(dialect).bind_processor(dialect)
    process_document = document.type.dialect_impl(dialect).bind_processor(dialect)
    if process_date is None or process_document is None:
        return False
    same_dates = all(process_date(m) == _sqlite_datetime(m) for m in moments)
    return same_dates and process_document(value) == json.dumps(value)


def _batches(start: int, count: int, size: int) -> Iterator[range]:
    for first in range(start, start + count, size):
        yield range(first, min(first + size, start + count))


def highest_seeded_number(engine: Engine) -> int:
    """The highest ``seed-NNNNNNNN`` customer number stored, 0 when there is none."""
    statement = (
        select(col(Customer.id))
        .where(col(Customer.id).like(f"{ID_PREFIX}%"))
        .where(func.length(col(Customer.id)) == len(ID_PREFIX) + ID_DIGITS)
        .order_by(col(Customer.id).desc())
    )
    with engine.connect() as connection:
        # Ids of this length sort like their numbers; skip any look-alike such as seed-abcdefgh.
        for (found,) in connection.execute(statement):
            match = _SEEDED_ID.match(found)
            if match:
                return int(match.group(1))
    return 0


# ---------------------------------------------------------------- one customer


def _int(rng: random.Random, low: int, high: int) -> int:
    # rng.randint is several times slower, and this runs a few dozen times per customer.
    return low + int(rng.random() * (high - low + 1))


def _days(rng: random.Random, low: float, high: float) -> timedelta:
    return timedelta(seconds=int((low + rng.random() * (high - low)) * 86_400))


def _seconds_ago(rng: random.Random, now: datetime, window: timedelta, margin: int) -> datetime:
    return now - timedelta(seconds=_int(rng, margin, int(window.total_seconds()) - margin))


def _between(rng: random.Random, earlier: datetime, later: datetime) -> datetime:
    span = int((later - earlier).total_seconds())
    return earlier + timedelta(seconds=_int(rng, 0, max(span, 0)))


def _phone(rng: random.Random, style: str) -> str:
    # Numbers reserved for fiction: Ofcom's 07700 900xxx, and North America's 555-01xx.
    if style == "uk":
        return f"+447700900{_int(rng, 0, 999):03d}"
    return f"+1{rng.choice((202, 212, 310, 415, 617, 646))}55501{_int(rng, 0, 99):02d}"


def _timeline(kind: str, rng: random.Random, now: datetime) -> tuple[datetime, datetime]:
    """When the customer signed up, and when they were last active (before any complaint)."""
    if kind == "new":
        signed_up = _seconds_ago(rng, now, PENDING_SIGNUP_WINDOW, 1800)
        return signed_up, signed_up
    ago = {
        "active": (0.1, 29.0),
        "complainer": (1.0, 29.0),
        "lapsed": (30.5, 199.5),
        "loyal": (0.1, 45.0),
        "promoter": (0.1, 25.0),
        "browser": (0.1, 120.0),
    }[kind]
    last = now - _days(rng, *ago)
    tenure = (120.0, 1000.0) if kind == "loyal" else (10.0, 800.0)
    return last - _days(rng, *tenure), last


def _counts(kind: str, rng: random.Random) -> tuple[int, int]:
    """How many orders and site visits."""
    if kind == "new":
        return (1 if rng.random() < 0.1 else 0), _int(rng, 0, 2)
    if kind == "browser":
        return 0, _int(rng, 1, 3)
    if kind == "loyal":
        return _int(rng, 5, 7), _int(rng, 0, 2)
    if kind == "promoter":
        return _int(rng, 1, 4), _int(rng, 0, 2)
    return _int(rng, 1, 3), _int(rng, 0, 2)  # active, lapsed, complainer


def generate_customer(number: int, now: datetime, *, seed: int = 7) -> SeededCustomer:
    """Customer ``number`` of seed ``seed`` at ``now``: always the same for the same three."""
    rng = random.Random((seed << 40) + number)  # one stream per (seed, number)
    kind = CYCLE[(number - 1) % len(CYCLE)]
    showcase = number <= len(CYCLE)
    cid = customer_id(number)
    zone, _, locale, phone_style = rng.choice(_ZONE_CHOICES)
    first_name = rng.choice(FIRST_NAMES)
    has_email = showcase or rng.random() < 0.96
    email = f"{first_name.lower()}.{number}@example.com" if has_email else None
    phone = _phone(rng, phone_style) if showcase or rng.random() < 0.6 else None
    signed_up, last = _timeline(kind, rng, now)

    # (occurred_at, type, properties), folded and stored in the order they happened.
    history: list[tuple[datetime, str, dict[str, Any]]] = [(signed_up, "signed_up", {})]
    orders, visits = _counts(kind, rng)
    kinds_at_last = ["order_placed"] * orders + ["site_visit"] * visits
    if kind != "new" and kinds_at_last:
        # The most recent activity is an order when there is one (a visit for browsers).
        last_type = "order_placed" if orders else "site_visit"
        kinds_at_last.remove(last_type)
        history.append((last, last_type, _properties(last_type, rng)))
    window_end = now if kind == "new" else last
    for event_type in kinds_at_last:
        at = _between(rng, signed_up, window_end)
        history.append((at, event_type, _properties(event_type, rng)))
    if kind == "promoter":
        at = _between(rng, signed_up, last)
        history.append((at, "nps_submitted", {"score": rng.choice((9, 10))}))
    elif orders and rng.random() < 0.15:
        score = rng.choice((0, 2, 4, 5, 6, 6, 7, 7, 8, 8, 8, 9, 10))
        history.append((_between(rng, signed_up, last), "nps_submitted", {"score": score}))
    if kind == "complainer":
        reason, severity = rng.choice(COMPLAINTS)
        at = _seconds_ago(rng, now, PENDING_COMPLAINT_WINDOW, 300)
        history.append((at, "complaint", {"reason": reason, "severity": severity}))
    history.sort(key=lambda item: item[0])

    rollups = Rollups()
    events: list[dict[str, Any]] = []
    for k, (occurred, event_type, properties) in enumerate(history, start=1):
        apply_rollups(rollups, event_type, properties, occurred)
        received = min(occurred + timedelta(seconds=_int(rng, 0, 5)), now)
        pending = (event_type == "signed_up" and now - occurred < PENDING_SIGNUP_WINDOW) or (
            event_type == "complaint" and now - occurred < PENDING_COMPLAINT_WINDOW
        )
        evaluated = None if pending else min(received + timedelta(seconds=_int(rng, 1, 600)), now)
        events.append(
            {
                "id": f"{cid}-{k}",
                "customer_id": cid,
                "type": event_type,
                "properties": properties,
                "occurred_at": occurred,
                "received_at": received,
                "evaluated_at": evaluated,
            }
        )

    email_opt_in = email is not None and (showcase or rng.random() < 0.73)
    email_opt_out_at = None
    if email is not None and not email_opt_in and rng.random() < 0.3:
        email_opt_out_at = _between(rng, signed_up, now)
    sms_opt_in = phone is not None and (showcase or rng.random() < 0.58)
    attributes: dict[str, Any] = {
        "plan": "pro" if kind == "loyal" and rng.random() < 0.5 else rng.choice(PLANS),
        "marketing_segment": SEGMENTS[kind],
        "vip": rng.random() < (0.25 if kind == "loyal" else 0.01),
    }
    if rng.random() < 0.4:
        born = now.date().replace(month=1, day=1) - timedelta(days=_int(rng, 18 * 365, 75 * 365))
        attributes["birthday"] = born.isoformat()
    row = {
        "id": cid,
        "email": email,
        "phone": phone,
        "first_name": first_name,
        "timezone": zone,
        "locale": locale,
        "email_opt_in": email_opt_in,
        "email_opt_in_at": signed_up if email_opt_in else None,
        "email_opt_out_at": email_opt_out_at,
        "sms_opt_in": sms_opt_in,
        "sms_opt_in_at": _between(rng, signed_up, last) if sms_opt_in else None,
        "sms_opt_out_at": None,
        "attributes": attributes,
        "signed_up_at": signed_up,
        "orders_count": rollups.orders_count,
        "total_spend_cents": rollups.total_spend_cents,
        "last_order_at": rollups.last_order_at,
        "last_activity_at": rollups.last_activity_at,
        "nps_score": rollups.nps_score,
        # Never evaluated yet: the next incremental tick must look at every seeded customer.
        "changed_at": now,
        "created_at": signed_up,
        "updated_at": now,
    }
    return SeededCustomer(kind, row, events)


def _properties(event_type: str, rng: random.Random) -> dict[str, Any]:
    if event_type == "order_placed":
        return {"amount_cents": _int(rng, 10, 200) * 100 - 1}  # $9.99 to $199.99
    return {}

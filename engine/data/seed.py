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

import multiprocessing
import random
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    Engine,
    Table,
    func,
    select,
)
from sqlmodel import col

from engine.clock import as_utc
from engine.data.bulk import BulkInsert
from engine.data.db import make_engine
from engine.data.ingest import Rollups, apply_rollups
from engine.data.models import Customer, Event
from engine.wording import plural

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

    def add(self, batch: _Batch) -> None:
        for kind, count in batch.kinds.items():
            self.kinds[kind] = self.kinds.get(kind, 0) + count
        for kind, count in batch.pending_by_type.items():
            self.pending_by_type[kind] = self.pending_by_type.get(kind, 0) + count
            self.pending_events += count
        self.customers += batch.customers
        self.events += batch.events
        # Batches may finish in any order when several processes store them.
        self.first_id = min(self.first_id or batch.first_id, batch.first_id)
        self.last_id = max(self.last_id or batch.last_id, batch.last_id)

    def summary(self) -> str:
        if not self.customers:
            return "seeded nothing"
        pending = ", ".join(f"{n:,} {kind}" for kind, n in sorted(self.pending_by_type.items()))
        return (
            f"seeded {plural(self.customers, 'customer')} ({self.first_id} … {self.last_id}) "
            f"with {plural(self.events, 'event')}, {self.pending_events:,} of them pending"
            + (f" ({pending})" if pending else "")
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
    workers: int = 0,
    progress: Progress | None = None,
) -> SeedReport:
    """Add ``customers`` synthetic customers and their events; see the module docstring.

    ``workers`` processes generate and store the batches (0: this process does it all).
    """
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
    jobs = [(batch.start, len(batch)) for batch in _batches(start, customers, batch_size)]
    for batch in _seeded(engine, jobs, now, seed, workers):
        report.add(batch)
        if progress is not None:
            progress(report.customers, customers)
    return report


CUSTOMERS: Table = Customer.__table__  # type: ignore[attr-defined]
EVENTS: Table = Event.__table__  # type: ignore[attr-defined]
CUSTOMER_COLUMNS = tuple(c.name for c in CUSTOMERS.columns)
EVENT_COLUMNS = tuple(c.name for c in EVENTS.columns)


@dataclass(frozen=True)
class _Batch:
    """What one stored batch of generated customers adds to the report."""

    customers: int
    events: int
    kinds: dict[str, int]
    pending_by_type: dict[str, int]
    first_id: str
    last_id: str


def seed_batch(engine: Engine, first: int, count: int, now: datetime, seed: int) -> _Batch:
    """Generate customers ``first`` to ``first + count - 1`` and store them in one
    transaction, with one bulk insert per table."""
    customer_row = itemgetter(*CUSTOMER_COLUMNS)
    event_row = itemgetter(*EVENT_COLUMNS)
    kinds: dict[str, int] = {}
    pending: dict[str, int] = {}
    customers: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    for number in range(first, first + count):
        person = generate_customer(number, now, seed=seed)
        kinds[person.kind] = kinds.get(person.kind, 0) + 1
        customers.append(customer_row(person.row))
        for event in person.events:
            events.append(event_row(event))
            if event["evaluated_at"] is None:
                pending[event["type"]] = pending.get(event["type"], 0) + 1
    dialect = engine.dialect.name
    insert_customers = BulkInsert(CUSTOMERS, CUSTOMER_COLUMNS, dialect)
    insert_events = BulkInsert(EVENTS, EVENT_COLUMNS, dialect)
    encoded_customers = insert_customers.encode(customers)
    encoded_events = insert_events.encode(events)
    with engine.begin() as connection:
        if dialect == "sqlite":
            # The event indexes are written in timestamp order, not key order, and the
            # default 2 MB page cache thrashes on them.
            connection.exec_driver_sql("PRAGMA cache_size=-131072")  # 128 MB
        insert_customers.write(connection, encoded_customers)
        insert_events.write(connection, encoded_events)
    return _Batch(
        count, len(events), kinds, pending, customer_id(first), customer_id(first + count - 1)
    )


def _seeded(
    engine: Engine, jobs: list[tuple[int, int]], now: datetime, seed: int, workers: int
) -> Iterator[_Batch]:
    """Store every batch, here or in ``workers`` processes (each with its own connection:
    generating a history costs more than storing it, and SQLite takes one writer at a
    time, so the writes of one process overlap the generation of the other)."""
    if workers <= 0 or len(jobs) < 2:
        for first, count in jobs:
            yield seed_batch(engine, first, count, now, seed)
        return
    url = engine.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(url,)
    ) as pool:
        futures = [pool.submit(_worker_batch, first, count, now, seed) for first, count in jobs]
        for future in as_completed(futures):
            yield future.result()


_worker_engine: Engine | None = None


def _init_worker(url: str) -> None:
    global _worker_engine
    _worker_engine = make_engine(url)


def _worker_batch(first: int, count: int, now: datetime, seed: int) -> _Batch:
    assert _worker_engine is not None
    return seed_batch(_worker_engine, first, count, now, seed)


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
        "topics": {},  # no topic choices: every topic takes its default
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
        "erased_at": None,
        "stage": None,  # decided by the first evaluation (rules/stages.yaml)
        "stage_since": None,
        "previous_stage": None,
    }
    return SeededCustomer(kind, row, events)


def _properties(event_type: str, rng: random.Random) -> dict[str, Any]:
    if event_type == "order_placed":
        return {"amount_cents": _int(rng, 10, 200) * 100 - 1}  # $9.99 to $199.99
    return {}

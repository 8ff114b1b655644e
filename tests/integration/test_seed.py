"""The seeder: counts, determinism, roll-ups, and matches for every shipped playbook."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlmodel import Session, col

from engine.data.facts import pending_events, subjects_for
from engine.data.ingest import (
    CustomerIn,
    EventIn,
    Rollups,
    apply_rollups,
    check_attributes,
    check_event_properties,
    record_event,
    upsert_customer,
)
from engine.data.models import Customer, Event
from engine.data.seed import (
    CYCLE,
    KINDS,
    customer_id,
    generate_customer,
    highest_seeded_number,
    seed,
)
from engine.errors import SourceProblem
from engine.language.catalog import FactCatalog
from engine.playbooks.loader import load_catalog

ROLLUPS = ("orders_count", "total_spend_cents", "last_order_at", "last_activity_at", "nps_score")


@pytest.fixture(scope="module")
def catalog(rules_dir: Path) -> FactCatalog:
    problems: list[SourceProblem] = []
    catalog, _ = load_catalog(rules_dir, problems)
    assert not problems, problems
    return catalog


def rows(engine: Engine, table: Any) -> list[dict[str, Any]]:
    """Every row of ``table`` as a dict, in id order (Python's, whatever the collation)."""
    with engine.connect() as connection:
        result = connection.execute(select(table))
        return sorted((dict(row._mapping) for row in result), key=lambda row: row["id"])


def test_seed_stores_what_it_reports(db: Engine, now: datetime) -> None:
    calls: list[tuple[int, int]] = []
    report = seed(db, 120, now, batch_size=50, progress=lambda *a: calls.append(a))

    with Session(db) as session:
        customers = session.scalar(select(func.count()).select_from(Customer))
        events = session.scalar(select(func.count()).select_from(Event))
        pending = Counter(e.type for e in pending_events(session))
    assert (report.customers, customers, events) == (120, 120, report.events)
    assert 3.5 <= report.events / report.customers <= 5.5
    assert report.pending_events == sum(pending.values())
    assert dict(pending) == report.pending_by_type
    assert pending["signed_up"] >= 5 and pending["complaint"] >= 2
    assert set(pending) == {"signed_up", "complaint"}
    assert calls == [(50, 120), (100, 120), (120, 120)]
    assert report.kinds == Counter(CYCLE * 2 + CYCLE[:20])  # the kinds go round a cycle of 50
    assert report.summary() == (
        f"seeded 120 customers (seed-00000001 … seed-00000120) with {report.events:,} events, "
        f"{report.pending_events} of them pending ({pending['complaint']} complaint, "
        f"{pending['signed_up']} signed_up)"
    )


def test_seed_is_deterministic_whatever_the_batch_size(db: Engine, now: datetime) -> None:
    seed(db, 60, now, seed=11, batch_size=7)

    expected = [generate_customer(n, now, seed=11) for n in range(1, 61)]
    assert rows(db, Customer.__table__) == [p.row for p in expected]  # type: ignore[attr-defined]
    stored_events = rows(db, Event.__table__)  # type: ignore[attr-defined]
    assert stored_events == sorted((e for p in expected for e in p.events), key=lambda e: e["id"])
    assert generate_customer(5, now, seed=11) == generate_customer(5, now, seed=11)
    assert generate_customer(5, now, seed=11).row != generate_customer(5, now, seed=12).row


def test_seeding_again_continues_after_the_highest_seeded_number(db: Engine, now: datetime) -> None:
    first = seed(db, 10, now)
    second = seed(db, 5, now + timedelta(days=1))

    assert (first.last_id, second.first_id, second.last_id) == (
        "seed-00000010",
        "seed-00000011",
        "seed-00000015",
    )
    assert highest_seeded_number(db) == 15
    assert seed(db, 0, now).summary() == "seeded nothing"
    with pytest.raises(ValueError, match="cannot seed -1 customers"):
        seed(db, -1, now)
    with Session(db) as session:
        upsert_customer(session, CustomerIn(id="seed-99999999"), now)
        upsert_customer(session, CustomerIn(id="seed-abcdefgh"), now)  # not a seeded id
        session.commit()
    assert highest_seeded_number(db) == 99_999_999
    with pytest.raises(ValueError) as refused:
        seed(db, 1, now)
    assert str(refused.value) == (
        "cannot seed 1 more customers: seeded ids stop at seed-99999999 and seed-99999999 is taken"
    )


def test_rollups_equal_the_fold_of_the_stored_events(db: Engine, now: datetime) -> None:
    seed(db, 100, now)

    with Session(db) as session:
        history: dict[str, list[Event]] = {}
        for event in session.scalars(select(Event).order_by(col(Event.occurred_at), col(Event.id))):
            history.setdefault(event.customer_id, []).append(event)
        for person in session.scalars(select(Customer)):
            folded = Rollups()
            for event in history[person.id]:
                apply_rollups(folded, event.type, event.properties, event.occurred_at)
            assert {name: getattr(person, name) for name in ROLLUPS} == vars(folded), person.id


def test_rollups_equal_what_ingesting_the_events_one_by_one_gives(
    db: Engine, now: datetime
) -> None:
    seed(db, 50, now)

    with Session(db) as session:
        seeded = list(session.scalars(select(Customer).order_by(col(Customer.id))))
        in_order = select(Event).order_by(col(Event.occurred_at), col(Event.id))
        events = list(session.scalars(in_order))
        for person in seeded:
            blank = CustomerIn(id=f"copy-{person.id}", signed_up_at=person.signed_up_at)
            upsert_customer(session, blank, now)
        session.flush()
        for event in events:
            data = EventIn(
                id=f"copy-{event.id}",
                customer_id=f"copy-{event.customer_id}",
                type=event.type,
                occurred_at=event.occurred_at,
                properties=event.properties,
            )
            assert record_event(session, data, now) is not None
        session.commit()
        for person in seeded:
            copy = session.get(Customer, f"copy-{person.id}")
            assert copy is not None
            assert [getattr(copy, n) for n in ROLLUPS] == [getattr(person, n) for n in ROLLUPS]


def test_seeded_rows_pass_the_same_validation_as_the_api(
    catalog: FactCatalog, now: datetime
) -> None:
    people = [generate_customer(n, now) for n in range(1, 1001)]

    for person in people:
        row = person.row
        fields = ("id", "email", "phone", "first_name", "timezone", "locale")
        data = CustomerIn(
            **{name: row[name] for name in fields},
            email_opt_in=row["email_opt_in"],
            sms_opt_in=row["sms_opt_in"],
            signed_up_at=row["signed_up_at"],
            attributes=row["attributes"],
        )
        assert (data.email, data.phone) == (row["email"], row["phone"])  # already normalised
        assert check_attributes(data.attributes, catalog) == []
        assert row["signed_up_at"] <= row["last_activity_at"] <= now
        for event in person.events:
            assert check_event_properties(EventIn(**_event_in(event)), catalog) == []
            assert event["occurred_at"] <= event["received_at"] <= now
            assert event["evaluated_at"] is None or event["received_at"] <= event["evaluated_at"]
    rows = [p.row for p in people]
    assert 0.62 <= sum(r["email_opt_in"] for r in rows) / len(rows) <= 0.78
    assert 0.28 <= sum(r["sms_opt_in"] for r in rows) / len(rows) <= 0.42
    assert all(r["phone"] for r in rows if r["sms_opt_in"])
    assert len({r["timezone"] for r in rows}) >= 7
    assert len({r["locale"] for r in rows}) >= 6
    assert all(r["email"].endswith("@example.com") for r in rows if r["email"])
    assert {r["attributes"]["plan"] for r in rows} == {"free", "plus", "pro"}


def _event_in(event: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "customer_id", "type", "occurred_at", "properties")
    return {key: event[key] for key in keys}


def test_every_shipped_playbook_has_matches(
    db: Engine, catalog: FactCatalog, now: datetime
) -> None:
    """Each playbook's enter condition, written out in Python (rules/*.yaml, enter.when)."""
    report = seed(db, 200, now)

    with Session(db) as session:
        ids = [customer_id(n) for n in range(1, report.customers + 1)]
        subjects = subjects_for(session, ids, catalog, now, pending_events(session))
    sweep = [s.facts for s in subjects if s.event_id is None]
    triggered: dict[str, list[dict[str, Any]]] = {}
    for subject in subjects:
        if subject.event_type is not None:
            triggered.setdefault(subject.event_type, []).append(subject.facts)

    def count(rows: list[dict[str, Any]], condition: Any) -> int:
        return sum(1 for facts in rows if condition(facts))

    welcome = count(triggered["signed_up"], lambda f: f["email_opt_in"])
    re_engagement = count(
        sweep,
        lambda f: (
            f["days_since_last_activity"] >= 30
            and f["orders_count"] >= 1
            and f["email_opt_in"]
            and f["open_complaints"] == 0
        ),
    )
    loyalty = count(
        sweep,
        lambda f: (
            (f["orders_count"] >= 5 or f["total_spend_cents"] >= 50_000)
            and f["email_opt_in"]
            and f["open_complaints"] == 0
        ),
    )
    referral = count(
        sweep,
        lambda f: (
            f["nps_score"] is not None
            and f["nps_score"] >= 9
            and f["orders_count"] >= 1
            and f["open_complaints"] == 0
            and f["email_opt_in"]
        ),
    )
    complaints = count(triggered["complaint"], lambda f: f["has_email"])
    assert min(welcome, re_engagement, loyalty, referral, complaints) >= 3, (
        welcome,
        re_engagement,
        loyalty,
        referral,
        complaints,
    )
    # Later steps have someone to reach too: SMS for lapsed customers, a first-order offer.
    assert count(sweep, lambda f: f["days_since_last_activity"] >= 30 and f["sms_opt_in"]) >= 3
    assert count(triggered["signed_up"], lambda f: f["orders_count"] == 0) >= 3
    # A complaint is fresh, and the customer's other facts come with it.
    assert all(f["event_days_ago"] == 0 for f in triggered["complaint"])
    assert all(f["event.severity"] in (1, 2, 3) for f in triggered["complaint"])
    assert all(f["days_since_signup"] <= 2 for f in triggered["signed_up"])


def test_a_handful_of_customers_already_covers_every_kind(now: datetime) -> None:
    kinds = [generate_customer(n, now).kind for n in range(1, 8)]
    assert sorted(kinds) == sorted(kind for kind, _ in KINDS)
    first_cycle = [generate_customer(n, now).row for n in range(1, len(CYCLE) + 1)]
    assert all(row["email_opt_in"] and row["sms_opt_in"] for row in first_cycle)


def test_seeded_times_compare_in_sql_as_in_python(db: Engine, now: datetime) -> None:
    """On SQLite the seeder writes datetimes as text itself; SQL must still compare them."""
    seed(db, 100, now)
    people = [generate_customer(n, now) for n in range(1, 101)]
    day_ago, month_ago = now - timedelta(days=1), now - timedelta(days=30)

    with Session(db) as session:
        recent = session.scalar(
            select(func.count()).select_from(Event).where(col(Event.occurred_at) >= day_ago)
        )
        quiet = session.scalar(
            select(func.count())
            .select_from(Customer)
            .where(col(Customer.last_activity_at) < month_ago)
        )
    assert recent == sum(e["occurred_at"] >= day_ago for p in people for e in p.events) > 0
    assert quiet == sum(p.row["last_activity_at"] < month_ago for p in people) > 0


def test_seeding_in_worker_processes_stores_the_same_customers(db: Engine, now: datetime) -> None:
    """Batches stored by two processes, in whatever order they finish, give the same rows
    (and the same report) as one process storing them in order."""
    report = seed(db, 30, now, batch_size=7, workers=2)
    assert (report.customers, report.first_id, report.last_id) == (
        30,
        "seed-00000001",
        "seed-00000030",
    )
    expected = [generate_customer(n, now) for n in range(1, 31)]
    assert report.events == sum(len(p.events) for p in expected)
    with Session(db) as session:
        stored = {c.id: c for c in session.scalars(select(Customer))}
        events = session.scalar(select(func.count()).select_from(Event))
    assert sorted(stored) == [p.row["id"] for p in expected]
    assert events == report.events
    assert all(stored[p.row["id"]].orders_count == p.row["orders_count"] for p in expected)

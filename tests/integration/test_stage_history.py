"""Stages through the real sweep, on SQLite and PostgreSQL: each evaluation records a
customer's stage when it changes (the customer row and one history row), the stage
facts reach the playbooks the same evaluation, and a stale stage loses the race."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text
from sqlmodel import col

from engine.bootstrap import App
from engine.data.facts import subjects_for
from engine.data.ingest import CustomerIn, EventIn, record_event, upsert_customer
from engine.data.models import Customer, Enrollment, StageTransition
from engine.data.uow import reading, unit_of_work
from engine.journeys.effects import CustomerPlan, Plan, RecordStage
from engine.journeys.store import write
from engine.runners.ticks import evaluation_tick
from tests.support.apps import fixture_app
from tests.support.paths import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "stages"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
def app(db: Engine, db_url: str, tmp_path: Path) -> Iterator[App]:
    yield fixture_app(db, db_url, tmp_path / "outbox", FIXTURES / "rules", FIXTURES / "templates")


def add_customer(app: App, customer_id: str, signed_up: datetime) -> None:
    with unit_of_work(app.db) as session:
        data = CustomerIn(
            id=customer_id,
            email=f"{customer_id}@example.com",
            email_opt_in=True,
            signed_up_at=signed_up,
        )
        upsert_customer(session, data, signed_up)


def add_order(app: App, customer_id: str, at: datetime, n: int) -> None:
    with unit_of_work(app.db) as session:
        data = EventIn(
            id=f"{customer_id}-order-{n}",
            customer_id=customer_id,
            type="order_placed",
            occurred_at=at,
            properties={"amount_cents": 2_500},
        )
        record_event(session, data, at)


def stages(app: App) -> dict[str, tuple[str | None, datetime | None, str | None]]:
    with reading(app.db) as session:
        rows = session.execute(
            select(
                col(Customer.id),
                col(Customer.stage),
                col(Customer.stage_since),
                col(Customer.previous_stage),
            )
        )
        return {r[0]: (r[1], r[2], r[3]) for r in rows}


def history(app: App) -> list[tuple[str, str | None, str, datetime, str]]:
    with reading(app.db) as session:
        rows = session.scalars(
            select(StageTransition).order_by(
                col(StageTransition.at), col(StageTransition.customer_id), col(StageTransition.id)
            )
        )
        return [(t.customer_id, t.from_stage, t.to_stage, t.at, t.rules_version) for t in rows]


def test_the_sweep_records_each_stage_change_once_and_playbooks_see_it(app: App) -> None:
    add_customer(app, "ann", START - timedelta(days=10))  # a prospect
    add_customer(app, "bob", START - timedelta(days=100))
    add_order(app, "bob", START - timedelta(days=59), 1)  # active; at risk in a day
    evaluation_tick(app, START, full=True)
    version = app.rules.version
    assert stages(app) == {"ann": ("prospect", START, None), "bob": ("active", START, None)}
    assert history(app) == [
        ("ann", None, "prospect", START, version),
        ("bob", None, "active", START, version),
    ]

    # The next day nothing changed for ann (no new row); bob has been quiet for 60 days.
    later = START + timedelta(days=1)
    evaluation_tick(app, later, full=True)
    assert stages(app)["ann"] == ("prospect", START, None)
    assert stages(app)["bob"] == ("at_risk", later, "active")
    assert history(app)[2:] == [("bob", "active", "at_risk", later, version)]
    # win_back (stage == "at_risk" and days_in_stage == 0) entered in the same evaluation.
    with reading(app.db) as session:
        entered = session.scalars(
            select(col(Enrollment.customer_id)).where(col(Enrollment.playbook) == "win_back")
        ).all()
    assert entered == ["bob"]

    # A day on, the stage stands: no transition, and days_in_stage is 1.
    evaluation_tick(app, later + timedelta(days=1), full=True)
    assert len(history(app)) == 3
    with reading(app.db) as session:
        (subject,) = subjects_for(
            session, ["bob"], app.rules.catalog, later + timedelta(days=1), stages=app.rules.stages
        )
    assert subject.stage_change is None
    facts = subject.facts
    assert (facts["stage"], facts["days_in_stage"], facts["previous_stage"]) == (
        "at_risk",
        1,
        "active",
    )


def test_an_order_moves_a_customer_on_at_the_next_incremental_tick(app: App) -> None:
    add_customer(app, "cat", START - timedelta(days=3))
    evaluation_tick(app, START, full=True)
    assert stages(app)["cat"][0] == "prospect"
    add_order(app, "cat", START + timedelta(hours=1), 1)
    evaluation_tick(app, START + timedelta(hours=2))  # incremental: cat changed
    assert stages(app)["cat"] == ("active", START + timedelta(hours=2), "prospect")
    assert [t[1:3] for t in history(app)] == [(None, "prospect"), ("prospect", "active")]


def test_a_stage_recorded_meanwhile_by_another_evaluator_loses_the_race(app: App) -> None:
    add_customer(app, "dan", START - timedelta(days=3))
    add_customer(app, "eve", START - timedelta(days=3))
    evaluation_tick(app, START, full=True)  # both prospects
    stale = [
        RecordStage("dan", None, "active", START, "v2"),  # read before the first sweep
        RecordStage("eve", "prospect", "active", START, "v2"),
    ]
    plan = Plan(tuple(CustomerPlan(r.customer_id, (r,)) for r in stale))
    with unit_of_work(app.db) as session:
        written = write(session, plan, app.rules, START)
    assert written.lost == ["dan"]
    assert stages(app)["dan"][0] == "prospect"
    assert stages(app)["eve"] == ("active", START, "prospect")
    assert [t[:3] for t in history(app) if t[4] == "v2"] == [("eve", "prospect", "active")]


def test_recording_stages_never_marks_customers_changed(app: App) -> None:
    # Marking them would make every incremental tick re-evaluate everyone whose stage
    # moved: the evaluation that moved it already saw the new stage.
    add_customer(app, "fay", START - timedelta(days=3))
    with reading(app.db) as session:
        before = session.execute(text("SELECT changed_at FROM customers")).scalar_one()
    evaluation_tick(app, START, full=True)
    with reading(app.db) as session:
        after = session.execute(text("SELECT changed_at FROM customers")).scalar_one()
    assert after == before

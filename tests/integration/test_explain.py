"""`explain` says what is true of a customer's journeys, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from engine.bootstrap import App
from engine.data.ingest import CustomerIn, EventIn, record_event, upsert_customer
from engine.data.uow import reading, unit_of_work
from engine.runners.ticks import evaluation_tick
from engine.usecases.explain import PlaybookExplanation, explain_customer
from tests.support.apps import fixture_app
from tests.support.paths import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "journeys"


@pytest.fixture
def app(db: Engine, db_url: str, tmp_path: Path) -> Iterator[App]:
    yield fixture_app(db, db_url, tmp_path / "outbox", FIXTURES / "rules", FIXTURES / "templates")


def customer(app: App, customer_id: str, at: datetime, **fields: Any) -> None:
    data = {"id": customer_id, "email": f"{customer_id}@example.com", "email_opt_in": True}
    with unit_of_work(app.db) as session:
        upsert_customer(session, CustomerIn(**{**data, **fields}, signed_up_at=at), at)


def orders(app: App, customer_id: str, at: datetime, count: int) -> None:
    with unit_of_work(app.db) as session:
        for n in range(count):
            record_event(
                session,
                EventIn(
                    id=f"{customer_id}-o{n}",
                    customer_id=customer_id,
                    type="order_placed",
                    occurred_at=at - timedelta(days=n + 1),
                    properties={"amount_cents": 1000},
                ),
                at,
            )


def explained(app: App, customer_id: str, now: datetime) -> dict[str, PlaybookExplanation]:
    with reading(app.db) as session:
        found = explain_customer(session, app.rules, customer_id, now)
    return {entry["playbook"]: entry for entry in found["playbooks"]}


def test_a_customer_on_a_journey_is_said_to_be_on_it(app: App) -> None:
    start = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    customer(app, "ann", start - timedelta(days=300))
    orders(app, "ann", start, 6)
    before = explained(app, "ann", start)["reward"]
    assert (before["state"], before["matches"]) == ("would enter", True)
    evaluation_tick(app, start, workers=0)
    # Still matching the enter condition, and on the journey: both are said.
    entry = explained(app, "ann", start)["reward"]
    assert (entry["state"], entry["matches"]) == ("on the journey", True)
    assert entry["journey"] == (
        "on this journey since 2026-03-02 12:00; next step reward_text due 2026-03-03 12:00"
    )


def test_a_journey_waiting_for_its_last_message_says_so(app: App) -> None:
    night = datetime(2026, 6, 9, 14, 0, tzinfo=UTC)  # 23:00 in Tokyo
    customer(
        app,
        "kim",
        night - timedelta(days=300),
        timezone="Asia/Tokyo",
        phone="+15555550123",
        sms_opt_in=True,
    )
    orders(app, "kim", night - timedelta(days=1), 6)
    evaluation_tick(app, night - timedelta(days=1), workers=0)
    evaluation_tick(app, night, workers=0)  # the SMS step is held to 08:00 Tokyo time
    entry = explained(app, "kim", night)["reward"]
    assert entry["state"] == "on the journey"
    assert entry["journey"] == (
        "on this journey since 2026-06-08 14:00; every step done, "
        "completes when its last message is due (2026-06-09 23:00)"
    )
    evaluation_tick(app, night + timedelta(hours=10), workers=0)
    after = explained(app, "kim", night + timedelta(hours=10))["reward"]
    assert after["state"] == "re-entry not allowed"
    assert after["journey"] is not None and after["journey"].startswith("last journey completed")
    assert after["journey"].endswith("re-entry: never")

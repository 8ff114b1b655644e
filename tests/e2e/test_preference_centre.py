"""The preference centre through the real HTTP app and real ticks, on SQLite and
PostgreSQL: topic choices in through the API and the importer, the consent policy at
planning and at send time, and the unsubscribe page that leaves one topic or everything
from the same signed link (RFC 8058 one-click leaves the message's topic)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlmodel import Session

from channels.memory import MemoryChannel
from engine.bootstrap import App, bootstrap
from engine.data.facts import subjects_for
from engine.data.importing import import_customers
from engine.data.models import Customer, Decision
from engine.delivery.dispatch import read_unsubscribe_token
from engine.runners.ticks import dispatch_tick, evaluation_tick
from engine.settings import Settings
from engine.web.app import create_app
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

API_KEY = "preference-centre-api-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
START = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)  # a Monday, 10:00 in London


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(db_url: str, tmp_path: Path, clock: Clock) -> Iterator[App]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=db_url,
        rules_dir=FIXTURE_RULES,
        templates_dir=FIXTURE_TEMPLATES,
        outbox_dir=tmp_path / "outbox",
        secret_key="preference-centre-secret-key",
        public_base_url="https://shop.example",
        api_key=API_KEY,
    )
    channels = {"email": MemoryChannel(), "sms": MemoryChannel()}
    application = bootstrap(settings, channels=channels, clock=clock, migrate=False)
    yield application
    application.db.dispose()


@pytest.fixture
def client(app: App) -> Iterator[TestClient]:
    with TestClient(create_app(app), base_url="https://shop.example") as test_client:
        yield test_client


def tick(app: App) -> None:
    evaluation_tick(app, app.clock(), workers=0)
    dispatch_tick(app, app.clock())


def customer(app: App, customer_id: str) -> Customer:
    with Session(app.db) as session:
        found = session.get(Customer, customer_id)
        assert found is not None
        return found


def decisions(app: App, customer_id: str) -> list[tuple[str | None, str, str]]:
    with Session(app.db) as session:
        rows = session.scalars(
            select(Decision).where(Decision.customer_id == customer_id).order_by(Decision.id)
        )
        return [(d.step_id, d.outcome, d.reason) for d in rows]


def emails_to(app: App, address: str) -> list[Any]:
    return [m for m in app.channels["email"].emails() if m.to == address]


def unsubscribe_path(email: Any) -> str:
    url = email.headers["List-Unsubscribe"].split(",")[1].strip(" <>")
    return url.removeprefix("https://shop.example")


def post_event(
    client: TestClient, event_id: str, customer_id: str, kind: str, **props: Any
) -> None:
    body = {
        "id": event_id,
        "customer_id": customer_id,
        "type": kind,
        "occurred_at": "2026-03-02T09:00:00Z",
        "properties": props,
    }
    response = client.post("/v1/events", json=body, headers=AUTH)
    assert response.status_code == 201, response.text


def test_topic_choices_come_in_through_the_api_checked_against_the_catalog(
    client: TestClient, app: App
) -> None:
    ann = {"id": "ann", "email": "ann@example.com", "email_opt_in": True}
    created = client.post(
        "/v1/customers", json={**ann, "topics": {"newsletter": True}}, headers=AUTH
    )
    assert created.status_code == 201
    assert customer(app, "ann").topics == {
        "newsletter": {"opted_in": True, "at": START.isoformat(), "via": "api"}
    }
    same = client.post("/v1/customers", json={**ann, "topics": {"newsletter": True}}, headers=AUTH)
    assert same.json()["status"] == "unchanged"  # the same choice again changes nothing
    wrong = client.post("/v1/customers", json={**ann, "topics": {"offer": False}}, headers=AUTH)
    assert wrong.status_code == 422
    assert wrong.json()["detail"] == [
        {
            "loc": ["body", "topics", "offer"],
            "msg": "not a topic declared in rules/catalog.yaml (did you mean 'offers'?); "
            "topics: newsletter, offers, product_news",
            "type": "catalog",
        }
    ]
    not_a_bool = client.post(
        "/v1/customers", json={**ann, "topics": {"offers": "no"}}, headers=AUTH
    )
    assert not_a_bool.status_code == 422
    assert not_a_bool.json()["detail"][0]["loc"] == ["body", "topics", "offers"]


def test_leaving_a_topic_stops_its_messages_and_not_the_others(
    client: TestClient, app: App, clock: Clock
) -> None:
    for who in ("ann", "bob"):
        body = {"id": who, "email": f"{who}@example.com", "email_opt_in": True}
        assert client.post("/v1/customers", json=body, headers=AUTH).status_code == 201
    post_event(client, "ann-signup", "ann", "signed_up")
    for n in range(5):  # five orders: bob's loyalty reward (topic offers)
        post_event(client, f"bob-order-{n}", "bob", "order_placed", amount_cents=2000)
    tick(app)
    (welcome,) = emails_to(app, "ann@example.com")  # the welcome series: product_news
    (reward,) = emails_to(app, "bob@example.com")  # the loyalty reward: offers
    ann_link = unsubscribe_path(welcome)
    token = ann_link.removeprefix("/u/")
    assert read_unsubscribe_token("preference-centre-secret-key", token).topic == "product_news"

    # The page offers the message's topic or everything, from the same link.
    page = client.get(ann_link)
    assert page.status_code == 200
    assert "Only product news: tips and news about our products" in page.text
    assert "All marketing emails" in page.text
    assert customer(app, "ann").topics == {}  # looking changes nothing

    left = client.post(ann_link, data={"scope": "topic"})
    assert left.status_code == 200
    assert "You are unsubscribed from product news" in left.text
    assert "Other marketing emails still come." in left.text
    ann = customer(app, "ann")
    assert ann.email_opt_in  # channel consent stays
    assert ann.topics["product_news"]["opted_in"] is False
    assert ann.topics["product_news"]["via"] == "email unsubscribe link"
    assert decisions(app, "ann")[-1] == (
        "welcome",
        "unsubscribed",
        "left the product_news topic (email unsubscribe link)",
    )

    # RFC 8058 one-click from bob's reward leaves its topic, offers, and nothing else.
    one_click = client.post(
        unsubscribe_path(reward),
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert one_click.status_code == 200 and "unsubscribed from offers" in one_click.text
    bob = customer(app, "bob")
    assert bob.email_opt_in and bob.topics["offers"]["opted_in"] is False

    # Two days on, the welcome series' tips (product_news) are skipped for ann, saying why.
    clock.now = START + timedelta(days=2, hours=1)
    app.channels["email"].clear()
    tick(app)
    assert emails_to(app, "ann@example.com") == []
    assert (
        "tips",
        "skipped",
        "not subscribed to the product_news topic (opted out, or never opted in)",
    ) in decisions(app, "ann")

    # "Everything" from the same link withdraws the email consent itself.
    everything = client.post(ann_link, data={"scope": "everything"})
    assert "no more marketing emails" in everything.text
    assert not customer(app, "ann").email_opt_in


def test_a_topic_left_after_queueing_cancels_the_message_at_send_time(
    client: TestClient, app: App
) -> None:
    body = {"id": "ann", "email": "ann@example.com", "email_opt_in": True}
    assert client.post("/v1/customers", json=body, headers=AUTH).status_code == 201
    post_event(client, "ann-signup", "ann", "signed_up")
    evaluation_tick(app, app.clock(), workers=0)  # the welcome is queued, not yet sent
    changed = {**body, "topics": {"product_news": False}}
    assert client.post("/v1/customers", json=changed, headers=AUTH).json()["status"] == "updated"
    dispatch_tick(app, app.clock())
    assert emails_to(app, "ann@example.com") == []
    assert decisions(app, "ann")[-1] == (
        "welcome",
        "cancelled",
        "at send time: not subscribed to the product_news topic (opted out, or never opted in)",
    )


def test_a_topic_that_is_opted_out_by_default_needs_an_opt_in(
    client: TestClient, app: App, tmp_path: Path
) -> None:
    """newsletter is declared opted_out by default: topic.newsletter is false until the
    customer chooses it (here through an import, CSV and JSON Lines)."""
    csv = tmp_path / "customers.csv"
    csv.write_text(
        "id,email,email_opt_in,topic.newsletter,topic.offers\n"
        "cat,cat@example.com,true,yes,\n"
        "dan,dan@example.com,true,,no\n"
        "eve,eve@example.com,true,maybe,\n"
    )
    report = import_customers(app.db, csv, app.rules.catalog, app.clock())
    assert (report.created, [str(e) for e in report.errors]) == (
        2,
        [
            f"{csv}: row 3: line 4: topics.newsletter: expected bool (true/false, yes/no or 1/0), got 'maybe'"
        ],
    )
    assert customer(app, "cat").topics["newsletter"] == {
        "opted_in": True,
        "at": START.isoformat(),
        "via": "import",
    }
    jsonl = tmp_path / "customers.jsonl"
    jsonl.write_text(
        json.dumps({"id": "dan", "topics": {"newsletter": True}})
        + "\n"
        + json.dumps({"id": "fay", "topics": {"newsleter": True}})
        + "\n"
    )
    report = import_customers(app.db, jsonl, app.rules.catalog, app.clock())
    assert [str(e) for e in report.errors] == [
        f"{jsonl}: row 2: topics.newsleter: not a topic declared in rules/catalog.yaml "
        "(did you mean 'newsletter'?); topics: newsletter, offers, product_news"
    ]
    dan = customer(app, "dan")
    assert dan.topics["newsletter"]["opted_in"] and not dan.topics["offers"]["opted_in"]
    with Session(app.db) as session:
        facts = {
            s.customer_id: s.facts
            for s in subjects_for(session, ["cat", "dan"], app.rules.catalog, app.clock())
        }
    assert (facts["cat"]["topic.newsletter"], facts["cat"]["topic.offers"]) == (True, True)
    assert (facts["dan"]["topic.newsletter"], facts["dan"]["topic.offers"]) == (True, False)

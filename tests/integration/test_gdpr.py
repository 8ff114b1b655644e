"""GDPR export and erasure through the real CLI and the HTTP API, on SQLite and PostgreSQL.

A customer with a real history (ingested through the API, journeys run by a tick: queued
and sent messages, decisions, a complaint case with its history, a suppressed address)
is exported whole, then erased: personal data gone, counts kept, every address still
suppressed (as a keyed digest that matches the address when it is imported again), and
the erasure audited.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlmodel import Session, col
from typer.testing import CliRunner

from engine.bootstrap import App
from engine.cli import app as cli_app
from engine.data.erasure import DIGEST_PREFIX, address_digest
from engine.data.facts import subjects_for
from engine.data.models import (
    Customer,
    Decision,
    Erasure,
    Escalation,
    EscalationNote,
    Event,
    Message,
    MessageStatus,
    Suppression,
)
from engine.escalations import cases
from engine.runners.ticks import evaluation_tick
from engine.web.app import create_app
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES
from tests.support.server import web_app

API_KEY = "test-api-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SECRET = "test-secret-key-not-the-default"
ID = "crm/0042"  # an id holding '/', as CRMs make them
EMAIL, PHONE = "ann.lee@example.com", "+447700900123"


@pytest.fixture
def app(db_url: str, tmp_path: Path, now: datetime) -> Iterator[App]:
    application = web_app(db_url, tmp_path, now, api_key=API_KEY, secret_key=SECRET)
    yield application
    application.db.dispose()


@pytest.fixture
def client(app: App) -> Iterator[TestClient]:
    with TestClient(create_app(app)) as test_client:
        yield test_client


@pytest.fixture
def cli_env(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", app.settings.database_url)
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(FIXTURE_RULES))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    monkeypatch.setenv("LIFECYCLE_SECRET_KEY", SECRET)
    monkeypatch.setenv("COLUMNS", "200")


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, list(args))
    return result.exit_code, result.output


def history(client: TestClient, app: App, now: datetime) -> None:
    """Ann: signed up, ordered, complained; a tick runs her journeys; her email bounced."""
    customer = {
        "id": ID,
        "email": EMAIL,
        "phone": PHONE,
        "first_name": "Ann",
        "email_opt_in": True,
        "sms_opt_in": True,
        "attributes": {"plan": "plus"},
    }
    assert client.post("/v1/customers", json=customer, headers=AUTH).status_code == 201
    for number, (kind, properties) in enumerate(
        [
            ("signed_up", {}),
            ("order_placed", {"amount_cents": 4999}),
            ("complaint", {"reason": "Ann Lee's parcel never came to 1 Main St", "severity": 2}),
        ]
    ):
        event = {
            "id": f"e{number}",
            "customer_id": ID,
            "type": kind,
            "occurred_at": (now - timedelta(hours=3 - number)).isoformat(),
            "properties": properties,
        }
        assert client.post("/v1/events", json=event, headers=AUTH).status_code == 201
    evaluation_tick(app, now, full=True, rules=app.rules)
    with Session(app.db) as session:
        [case] = session.scalars(select(Escalation))
        session.add(
            Suppression(
                channel="email",
                address=EMAIL,
                reason="bounce: mailbox full",
                source="sendgrid",
                created_at=now,
            )
        )
        session.commit()
        assert case.id is not None
    with Session(app.db) as session:
        cases.acknowledge(session, case.id, "Priya", now)
        session.commit()


def everything(app: App) -> str:
    """Every row of every table, as text: to look for personal data left anywhere."""
    models = (Customer, Event, Message, Decision, Escalation, EscalationNote, Suppression)
    with Session(app.db) as session:
        return json.dumps(
            [
                row.model_dump(mode="json", warnings=False)
                for m in models
                for row in session.scalars(select(m))
            ]
        )


def test_export_holds_everything_about_the_person(
    client: TestClient, app: App, now: datetime, cli_env: None
) -> None:
    history(client, app, now)
    code, output = cli("customers", "export", ID)
    assert code == 0, output
    data = json.loads(output)
    assert data["customer"]["email"] == EMAIL and data["customer"]["attributes"] == {"plan": "plus"}
    assert [e["type"] for e in data["events"]] == ["signed_up", "order_placed", "complaint"]
    assert "complaint_escalation" in {e["playbook"] for e in data["enrollments"]}
    assert data["messages"] and all(m["customer_id"] == ID for m in data["messages"])
    assert data["decisions"] and data["cases"][0]["history"][0]["action"] in ("opened", "ack")
    assert [s["address"] for s in data["suppressions"]] == [EMAIL]
    assert data["erasures"] == []
    # The API gives the same, for an id with '/' sent encoded or as it is.
    for path in ("/v1/customers/crm%2F0042/export", f"/v1/customers/{ID}/export"):
        response = client.get(path, headers=AUTH)
        assert response.status_code == 200
        assert {k: v for k, v in response.json().items() if k != "exported_at"} == {
            k: v for k, v in data.items() if k != "exported_at"
        }
    assert client.get("/v1/customers/nobody/export", headers=AUTH).status_code == 404
    assert client.get(f"/v1/customers/{ID}/export").status_code == 401


def test_erase_removes_personal_data_keeps_counts_and_suppression_and_is_audited(
    client: TestClient, app: App, now: datetime, cli_env: None
) -> None:
    history(client, app, now)
    with Session(app.db) as session:
        queued_before = session.scalars(
            select(Message).where(col(Message.status) == MessageStatus.QUEUED)
        ).all()
    assert queued_before, "the tick queued Ann's messages"
    code, output = cli("customers", "erase", ID)  # not a terminal: --yes is needed
    assert code == 1 and "add --yes" in output
    code, output = cli("customers", "erase", ID, "--yes")
    assert code == 0, output
    assert output.startswith(f"erased the personal data of {ID} (audit 1, by ")
    text = everything(app)
    for personal in (EMAIL, PHONE, "Ann", "1 Main St", '"plus"'):
        assert personal not in text, personal
    with Session(app.db) as session:
        ann = session.get(Customer, ID)
        assert ann is not None and ann.erased_at is not None
        assert (ann.email, ann.phone, ann.first_name, ann.attributes) == (None, None, None, {})
        assert not ann.email_opt_in and not ann.sms_opt_in
        assert (ann.orders_count, ann.total_spend_cents) == (1, 4999)  # counts kept
        assert [e.properties for e in session.scalars(select(Event))] == [{}, {}, {}]
        messages = session.scalars(select(Message).where(col(Message.kind) != "staff")).all()
        assert messages and {m.to_address for m in messages} == {"[erased]"}
        assert all(m.status != MessageStatus.QUEUED for m in messages)
        assert all(d.facts == {} for d in session.scalars(select(Decision)))
        [audit] = session.scalars(select(Erasure))
        assert (audit.customer_id, audit.erased_at) == (ID, ann.erased_at)
        assert audit.counts["events"] == 3 and audit.counts["suppressions"] == 2
        erased = session.scalars(select(Decision).where(col(Decision.outcome) == "erased")).one()
        assert erased.reason.startswith("personal data erased on the request of ")
        suppressed = {
            (s.channel, s.address, s.reason) for s in session.scalars(select(Suppression))
        }
    assert suppressed == {
        ("email", address_digest(SECRET, "email", EMAIL), "bounce: mailbox full"),
        ("sms", address_digest(SECRET, "sms", PHONE), "erased on request (GDPR)"),
    }
    assert all(address.startswith(DIGEST_PREFIX) for _, address, _ in suppressed)


def test_an_erased_address_imported_again_is_suppressed_again(
    client: TestClient, app: App, now: datetime, cli_env: None, tmp_path: Path
) -> None:
    """Through the importer, the API and a Segment identify: the digest matches."""
    history(client, app, now)
    response = client.post(f"/v1/customers/{ID}/erase", headers=AUTH)
    assert response.status_code == 200 and response.json()["counts"]["suppressions"] == 2
    file = tmp_path / "customers.csv"
    file.write_text(f"id,email,email_opt_in\nnew-1,{EMAIL.upper()},true\n")
    code, output = cli("import", "customers", str(file))
    assert code == 0, output
    assert client.post("/v1/customers", json={"id": "new-2", "phone": PHONE}, headers=AUTH)
    identify = {"userId": "new-3", "traits": {"phone": "+44 7700 900123"}}
    assert client.post("/v1/identify", json=identify, headers=AUTH).json()["status"] == "created"
    with Session(app.db) as session:
        facts = {
            s.customer_id: s.facts
            for s in subjects_for(session, ["new-1", "new-2", "new-3"], app.rules.catalog, now)
        }
        restored = session.scalars(
            select(Suppression).where(col(Suppression.source) == "erasure")
        ).all()
    assert facts["new-1"]["has_email"] is False  # suppressed: nothing is sent to it
    assert facts["new-2"]["has_phone"] is False and facts["new-3"]["has_phone"] is False
    assert {(s.channel, s.address) for s in restored} >= {("email", EMAIL), ("sms", PHONE)}
    assert all(
        s.reason.startswith("the address of an erased person")
        for s in restored
        if not s.address.startswith(DIGEST_PREFIX)
    )


def test_an_address_another_customer_shares_stays_suppressed_in_the_clear(
    client: TestClient, app: App, now: datetime
) -> None:
    for customer_id in ("a", "b"):
        body = {"id": customer_id, "phone": PHONE}
        assert client.post("/v1/customers", json=body, headers=AUTH).status_code == 201
    with Session(app.db) as session:
        session.add(
            Suppression(
                channel="sms", address=PHONE, reason="STOP", source="twilio", created_at=now
            )
        )
        session.commit()
    assert client.post("/v1/customers/a/erase", headers=AUTH).status_code == 200
    with Session(app.db) as session:
        addresses = {s.address for s in session.scalars(select(Suppression))}
        facts = subjects_for(session, ["b"], app.rules.catalog, now)[0].facts
    assert addresses == {PHONE, address_digest(SECRET, "sms", PHONE)}
    assert facts["has_phone"] is False  # b's family phone is still held back


def test_erasing_an_unknown_customer_is_a_clear_error(
    client: TestClient, app: App, cli_env: None
) -> None:
    code, output = cli("customers", "erase", "ghost", "--yes")
    assert code == 1 and "no customer with id 'ghost'" in output
    response = client.post("/v1/customers/ghost/erase", headers=AUTH)
    assert response.status_code == 404 and response.json()["detail"] == (
        "no customer with id 'ghost'"
    )


def rows_of(app: App, model: Any) -> int:
    with Session(app.db) as session:
        return len(session.scalars(select(model)).all())


def test_data_about_an_erased_customer_is_refused_everywhere(
    client: TestClient, app: App, now: datetime, cli_env: None, tmp_path: Path
) -> None:
    """The next sync from a CRM or a Segment source must not undo the erasure."""
    history(client, app, now)
    assert client.post(f"/v1/customers/{ID}/erase", headers=AUTH).status_code == 200
    refused = f"customer '{ID}' was erased (GDPR): nothing more about them is taken in"
    again = client.post("/v1/customers", json={"id": ID, "email": EMAIL}, headers=AUTH)
    assert again.status_code == 422 and again.json()["detail"][0]["msg"].startswith(refused)
    event = {"id": "e9", "customer_id": ID, "type": "site_visit", "occurred_at": now.isoformat()}
    response = client.post("/v1/events", json=event, headers=AUTH)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == [
        "body",
        "customer_id",
    ]
    batch = {
        "batch": [
            {"type": "identify", "userId": ID, "traits": {"email": EMAIL}},
            {"type": "track", "userId": ID, "event": "Site Visit", "messageId": "m9"},
        ]
    }
    results = client.post("/v1/batch", json=batch, headers=AUTH).json()["results"]
    assert [r["status"] for r in results] == ["rejected", "rejected"]
    assert all(r["errors"][0]["msg"].startswith(refused) for r in results)
    customers = tmp_path / "again.csv"
    customers.write_text(f"id,email\n{ID},{EMAIL}\n")
    code, output = cli("import", "customers", str(customers))
    assert code == 1 and f"row 1: line 2: id: {refused}" in output
    assert EMAIL not in everything(app)  # not even as a suppression

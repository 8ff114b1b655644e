"""Emails and phone numbers through every way in: the API, the importers and the CLI.

Checked and normalised by email-validator and phonenumbers (engine.data.contacts); a
national number is read in LIFECYCLE_DEFAULT_PHONE_REGION, an impossible one refused
naming the field; a moment without a UTC offset is refused the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session
from typer.testing import CliRunner

from engine.bootstrap import App
from engine.cli import app as cli_app
from engine.data.importing import import_customers, import_events
from engine.data.models import Customer
from engine.web.app import create_app
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES
from tests.support.server import web_app

API_KEY = "test-api-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def app(db_url: str, tmp_path: Path, now: datetime) -> Iterator[App]:
    application = web_app(db_url, tmp_path, now, api_key=API_KEY, default_phone_region="GB")
    yield application
    application.db.dispose()


@pytest.fixture
def client(app: App) -> Iterator[TestClient]:
    with TestClient(create_app(app)) as test_client:
        yield test_client


def stored(app: App, customer_id: str) -> Customer:
    with Session(app.db) as session:
        found = session.get(Customer, customer_id)
        assert found is not None
        return found


def problems(response: object) -> dict[tuple[str, ...], str]:
    body = response.json()  # type: ignore[attr-defined]
    return {tuple(str(p) for p in e["loc"]): e["msg"] for e in body["detail"]}


def test_the_api_normalises_a_national_number_in_the_default_region_and_the_email(
    client: TestClient, app: App
) -> None:
    body = {"id": "c1", "email": "Ann.Lee@Example.COM", "phone": "07700 900123"}
    assert client.post("/v1/customers", json=body, headers=AUTH).status_code == 201
    ann = stored(app, "c1")
    assert (ann.email, ann.phone) == ("ann.lee@example.com", "+447700900123")
    # The same number written another way is the same number: nothing changes.
    again = {"id": "c1", "phone": "+44 (0)7700-900123"}
    response = client.post("/v1/customers", json=again, headers=AUTH)
    assert response.status_code == 200 and response.json()["status"] == "unchanged"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("phone", "+44 7700 9001234567", "it is too long for its country"),
        ("phone", "+999 123 456", "its country code is not one in use"),
        ("phone", "call me", "'call me' is not a phone number (it is not a number)"),
        ("phone", "900123", "'900123' is a local number: write it with its area code"),
        ("email", "ann@example", "The part after the @-sign is not valid."),
        ("email", "ann..lee@example.com", "cannot have two periods in a row"),
    ],
)
def test_the_api_refuses_an_impossible_number_or_address_naming_the_field(
    client: TestClient, app: App, field: str, value: str, message: str
) -> None:
    response = client.post("/v1/customers", json={"id": "c1", field: value}, headers=AUTH)
    assert response.status_code == 422
    assert message in problems(response)[("body", field)]
    with Session(app.db) as session:
        assert session.get(Customer, "c1") is None


def test_without_a_default_region_a_national_number_says_how_to_write_it(
    db_url: str, tmp_path: Path, now: datetime
) -> None:
    application = web_app(db_url, tmp_path, now, api_key=API_KEY)
    try:
        with TestClient(create_app(application)) as client:
            response = client.post(
                "/v1/customers", json={"id": "c1", "phone": "07700 900123"}, headers=AUTH
            )
    finally:
        application.db.dispose()
    assert response.status_code == 422
    assert problems(response)[("body", "phone")] == (
        "Value error, '07700 900123' is not an international number (like +447700900123); "
        "write it with its country code, or set LIFECYCLE_DEFAULT_PHONE_REGION (e.g. GB) to "
        "read national numbers"
    )


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/customers", {"id": "c1", "signed_up_at": "2026-03-01T10:00:00"}, "signed_up_at"),
        ("/v1/customers", {"id": "c1", "signed_up_at": "2026-03-01"}, "signed_up_at"),
        (
            "/v1/events",
            {
                "id": "e1",
                "customer_id": "c1",
                "type": "site_visit",
                "occurred_at": "2026-03-01T10:00",
            },
            "occurred_at",
        ),
    ],
)
def test_the_api_refuses_a_moment_without_an_offset(
    client: TestClient, path: str, body: dict[str, str], field: str
) -> None:
    """Before, 2026-03-01T10:00:00 was silently taken as UTC."""
    client.post("/v1/customers", json={"id": "c1"}, headers=AUTH)
    response = client.post(path, json=body, headers=AUTH)
    assert response.status_code == 422
    assert "has no UTC offset; write it with one, like" in problems(response)[("body", field)]


def test_the_importers_read_national_numbers_and_refuse_naive_moments(
    app: App, tmp_path: Path, now: datetime
) -> None:
    customers = tmp_path / "customers.csv"
    customers.write_text(
        "id,email,phone,signed_up_at\n"
        "c1,Ann@Example.com,07700 900123,2026-01-05T09:00:00+00:00\n"
        "c2,bob@example.com,+44 7700 9001234567,2026-01-05T09:00:00Z\n"
        "c3,cy@example.com,,2026-01-05T09:00:00\n"
    )
    report = import_customers(
        app.db, customers, app.rules.catalog, now, phone_region=app.phone_region
    )
    assert [str(e) for e in report.errors] == [
        f"{customers}: row 2: line 3: phone: '+44 7700 9001234567' is not a possible phone "
        "number: it is too long for its country",
        f"{customers}: row 3: line 4: signed_up_at: 2026-01-05T09:00:00 has no UTC offset; "
        "write it with one, like 2026-01-05T09:00:00Z for UTC or 2026-01-05T09:00:00+01:00",
    ]
    assert stored(app, "c1").phone == "+447700900123"
    events = tmp_path / "events.jsonl"
    events.write_text(
        json.dumps(
            {"id": "e1", "customer_id": "c1", "type": "site_visit", "occurred_at": "2026-02-01"}
        )
        + "\n"
    )
    report = import_events(app.db, events, app.rules.catalog, now)
    [error] = [str(e) for e in report.errors]
    assert error.startswith(f"{events}: row 1: occurred_at: 2026-02-01T00:00:00 has no UTC offset")


def test_lifecycle_import_reads_the_default_phone_region_setting(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", db_url)
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(FIXTURE_RULES))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    monkeypatch.setenv("COLUMNS", "200")
    customers = tmp_path / "customers.csv"
    customers.write_text("id,phone\nc1,(202) 555-0143\n")
    runner = CliRunner()
    monkeypatch.setenv("LIFECYCLE_DEFAULT_PHONE_REGION", "us")
    result = runner.invoke(cli_app, ["import", "customers", str(customers)])
    assert result.exit_code == 0, result.output
    application = web_app(db_url, tmp_path, datetime.now())
    try:
        assert stored(application, "c1").phone == "+12025550143"
    finally:
        application.db.dispose()
    monkeypatch.setenv("LIFECYCLE_DEFAULT_PHONE_REGION", "Narnia")
    result = runner.invoke(cli_app, ["import", "customers", str(customers)])
    assert result.exit_code == 1
    assert "LIFECYCLE_DEFAULT_PHONE_REGION: Value error, 'Narnia' is not a region code" in (
        result.output
    )

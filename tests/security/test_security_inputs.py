"""Every input is bounded and every refusal names its field (issue 10, points 6, 8, 9, 10,
11 and 14): through the real HTTP app (and a real uvicorn for the access log), the real
CLI and real import files, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlmodel import Session
from typer.testing import CliRunner

from engine.bootstrap import App
from engine.cli import app as cli_app
from engine.data.importing import import_customers, import_events
from engine.data.models import Customer, Event, WebhookReceipt
from engine.delivery.dispatch import unsubscribe_token
from engine.runners.housekeeping import housekeeping_tick
from engine.web.app import create_app
from engine.web.logs import ACCESS_LOGGER
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES
from tests.support.server import web_app

API_KEY = "test-api-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SECRET = "test-secret-key-not-the-default"


@pytest.fixture
def app(db_url: str, tmp_path: Path, now: datetime) -> Iterator[App]:
    application = web_app(db_url, tmp_path, now, api_key=API_KEY)
    yield application
    application.db.dispose()


@pytest.fixture
def client(app: App) -> Iterator[TestClient]:
    with TestClient(create_app(app)) as test_client:
        test_client.post("/v1/customers", json={"id": "ann"}, headers=AUTH)
        yield test_client


def problems(response: httpx.Response) -> dict[tuple[str, ...], str]:
    assert response.status_code == 422, response.text
    return {tuple(str(p) for p in e["loc"]): e["msg"] for e in response.json()["detail"]}


def count(app: App, model: Any) -> int:
    with Session(app.db) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def event(**fields: Any) -> dict[str, Any]:
    return {
        "id": "e1",
        "customer_id": "ann",
        "type": "site_visit",
        "occurred_at": "2026-03-01T10:00:00Z",
        **fields,
    }


# ── point 6: moments UTC cannot hold ────────────────────────────────────────────────


@pytest.mark.parametrize(
    "moment", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:00:00-05:00"], ids=["year-1", "9999"]
)
def test_an_out_of_range_moment_is_a_422_naming_the_field(
    client: TestClient, app: App, moment: str
) -> None:
    assert problems(client.post("/v1/events", json=event(occurred_at=moment), headers=AUTH)) == {
        ("body", "occurred_at"): f"Value error, {moment} is out of range: in UTC it must fall "
        "between 0001-01-01 and 9999-12-31"
    }
    customer = client.post("/v1/customers", json={"id": "bo", "signed_up_at": moment}, headers=AUTH)
    assert ("body", "signed_up_at") in problems(customer)
    assert count(app, Event) == 0 and count(app, Customer) == 1


def test_an_out_of_range_moment_in_an_import_is_one_row_error(
    app: App, tmp_path: Path, now: datetime
) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "id,customer_id,type,occurred_at\n"
        "d-1,ann,site_visit,2026-03-01T10:00:00Z\n"
        "d-2,ann,site_visit,0001-01-01T00:00:00+05:00\n"
        "d-3,ann,site_visit,2026-03-01T11:00:00Z\n"
    )
    import_customers(app.db, _customers_file(tmp_path), app.rules.catalog, now)
    report = import_events(app.db, path, app.rules.catalog, now)
    assert [str(e) for e in report.errors] == [
        f"{path}: row 2: line 3: occurred_at: 0001-01-01T00:00:00+05:00 is out of range: "
        "in UTC it must fall between 0001-01-01 and 9999-12-31"
    ]
    assert report.created == 2


def _customers_file(tmp_path: Path) -> Path:
    path = tmp_path / "customers.jsonl"
    path.write_text('{"id": "ann"}\n')
    return path


# ── point 9: control characters ─────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("id", "acme\r\n42", "a carriage return at character 5"),
        ("first_name", "Ann\x1b[31mRED", "ESC (an ANSI escape) at character 4"),
        ("email", "ann@example.com\nBcc: x@evil.example", "a line feed at character 16"),
        ("phone", "+447700900123\r", "a carriage return at character 14"),
        ("first_name", "Ann\u2028Bo", "U+2028 at character 4"),
    ],
)
def test_control_characters_in_identity_fields_are_refused_naming_the_field(
    client: TestClient, app: App, field: str, value: str, reason: str
) -> None:
    body = {"id": "bo", field: value}
    assert problems(client.post("/v1/customers", json=body, headers=AUTH)) == {
        ("body", field): f"Value error, must not contain control characters: {reason}"
    }
    assert count(app, Customer) == 1


def test_control_characters_in_event_ids_and_nul_anywhere_in_properties_are_refused(
    client: TestClient, app: App
) -> None:
    bad_id = client.post("/v1/events", json=event(id="e\x1b1"), headers=AUTH)
    assert problems(bad_id) == {
        ("body", "id"): "Value error, must not contain control characters: "
        "ESC (an ANSI escape) at character 2"
    }
    nested = client.post(
        "/v1/events",
        json=event(type="complaint", properties={"reason": "late", "extra": {"a": ["x\x00"]}}),
        headers=AUTH,
    )
    assert problems(nested) == {
        ("body", "properties"): "Value error, extra.a[0] must not contain the NUL character "
        "(\\u0000)"
    }
    key = client.post(
        "/v1/customers", json={"id": "bo", "attributes": {"pl\x00an": "x"}}, headers=AUTH
    )
    assert problems(key) == {
        ("body", "attributes"): "Value error, the key 'pl\\x00an' must not contain the NUL "
        "character (\\u0000)"
    }
    assert count(app, Event) == 0


def test_control_characters_in_an_import_are_row_errors_and_the_rest_is_kept(
    app: App, tmp_path: Path, now: datetime
) -> None:
    path = tmp_path / "customers.jsonl"
    rows = [
        {"id": "ok-1"},
        {"id": "bad\n2"},
        {"id": "ok-3", "first_name": "Ann\x1b[2J"},
        {"id": "ok-4"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = import_customers(app.db, path, app.rules.catalog, now)
    assert [str(e) for e in report.errors] == [
        f"{path}: row 2: id: must not contain control characters: a line feed at character 4",
        f"{path}: row 3: first_name: must not contain control characters: "
        "ESC (an ANSI escape) at character 4",
    ]
    assert report.created == 2


# ── point 12: ids whose console page a browser cannot reach ─────────────────────────


@pytest.mark.parametrize("customer_id", [".", "..", " .. "])
def test_a_customer_id_a_browser_reads_as_a_path_step_is_refused(
    client: TestClient, app: App, tmp_path: Path, now: datetime, customer_id: str
) -> None:
    """`/console/customers/..` is `/console/` to a browser (and so is `%2E%2E`): such a
    customer's page could never be opened, so the id is refused at input."""
    reason = (
        "'..' cannot be a customer id: browsers read it as a step up in the console's "
        "links, so the customer's page could not be opened"
    ).replace("'..'", repr(customer_id.strip()))
    response = client.post("/v1/customers", json={"id": customer_id}, headers=AUTH)
    assert problems(response) == {("body", "id"): f"Value error, {reason}"}
    path = tmp_path / "customers.jsonl"
    path.write_text(json.dumps({"id": customer_id}) + "\n" + json.dumps({"id": "ok"}) + "\n")
    report = import_customers(app.db, path, app.rules.catalog, now)
    assert [str(e) for e in report.errors] == [f"{path}: row 1: id: {reason}"]
    assert report.created == 1 and count(app, Customer) == 2  # ann and ok
    # Nor can an event create one (LIFECYCLE_CREATE_UNKNOWN_CUSTOMERS): refused the same way.
    creating = web_app(
        str(app.db.url.render_as_string(hide_password=False)),
        tmp_path,
        now,
        api_key=API_KEY,
        create_unknown_customers=True,
    )
    with TestClient(create_app(creating)) as other:
        refused = other.post("/v1/events", json=event(customer_id=customer_id), headers=AUTH)
    creating.db.dispose()
    assert problems(refused) == {("body", "customer_id"): f"Value error, {reason}"}
    assert count(app, Customer) == 2 and count(app, Event) == 0


# ── point 8: bodies and properties are capped ───────────────────────────────────────


def test_a_body_over_the_cap_is_413_and_nothing_is_written(client: TestClient, app: App) -> None:
    huge = json.dumps(event(properties={"note": "x" * 2_000_000}))
    response = client.post(
        "/v1/events", content=huge, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json() == {"detail": "the request body is larger than 1,000,000 bytes"}
    assert count(app, Event) == 0


def test_a_streamed_body_is_cut_at_the_cap_without_a_content_length(
    client: TestClient, app: App
) -> None:
    sent = []

    def chunks() -> Iterator[bytes]:
        for _ in range(400):  # 400 x 64 KiB = 25 MiB, far past the cap
            sent.append(1)
            yield b" " * 65536

    response = client.post(
        "/v1/events", content=chunks(), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["detail"] == "the request body is larger than 1,000,000 bytes"
    assert count(app, Event) == 0


def test_property_values_and_totals_are_capped_declared_or_not(
    db_url: str, tmp_path: Path, now: datetime
) -> None:
    roomy = web_app(db_url, tmp_path, now, api_key=API_KEY, max_body_bytes=40_000_000)
    with TestClient(create_app(roomy)) as client:
        client.post("/v1/customers", json={"id": "ann"}, headers=AUTH)
        big = client.post(
            "/v1/events", json=event(properties={"note": "x" * 30_000_000}), headers=AUTH
        )
        assert problems(big) == {
            ("body", "properties", "note"): "30,000,002 bytes; at most 10,000 bytes a value"
        }
        many = {f"k{n}": "y" * 9_000 for n in range(8)}
        assert problems(client.post("/v1/events", json=event(properties=many), headers=AUTH)) == {
            ("body", "properties"): "72,065 bytes in all; at most 64,000 bytes"
        }
        keys = {f"k{n}": n for n in range(101)}
        assert problems(client.post("/v1/events", json=event(properties=keys), headers=AUTH)) == {
            ("body", "properties"): "101 keys; at most 100"
        }
        attrs = client.post(
            "/v1/customers", json={"id": "bo", "attributes": {"plan": "p" * 20_000}}, headers=AUTH
        )
        assert problems(attrs) == {
            ("body", "attributes", "plan"): "20,002 bytes; at most 10,000 bytes a value"
        }
        assert count(roomy, Event) == 0
    roomy.db.dispose()


def test_the_importer_caps_rows_and_properties_the_same_way(
    app: App, tmp_path: Path, now: datetime
) -> None:
    import_customers(app.db, _customers_file(tmp_path), app.rules.catalog, now)
    path = tmp_path / "events.jsonl"
    lines = [
        json.dumps(event(id="r-1")),
        json.dumps(event(id="r-2", properties={"note": "x" * 20_000})),
        json.dumps(event(id="r-3", properties={"note": "x" * 2_000_000})),
        json.dumps(event(id="r-4")),
    ]
    path.write_text("\n".join(lines) + "\n")
    report = import_events(app.db, path, app.rules.catalog, now, limits=app.input_limits)
    assert [str(e) for e in report.errors] == [
        f"{path}: row 2: properties.note: 20,002 bytes; at most 10,000 bytes a value",
        f"{path}: row 3: the line is longer than 1,000,000 characters",
    ]
    assert report.created == 2


# ── point 11: an unterminated quote ─────────────────────────────────────────────────


def test_an_unterminated_quote_is_reported_at_its_line_and_later_rows_kept_cli(
    app: App, db_url: str, tmp_path: Path, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    import_customers(app.db, _customers_file(tmp_path), app.rules.catalog, now)
    path = tmp_path / "events.csv"
    path.write_text(
        "id,customer_id,type,occurred_at,prop.reason\n"
        "q-1,ann,complaint,2026-03-01T10:00:00Z,late\n"
        'q-2,ann,complaint,2026-03-01T10:00:00Z,"broken\n'
        "q-3,ann,complaint,2026-03-01T10:00:00Z,late\n"
        "q-4,ann,complaint,2026-03-01T10:00:00Z,late\n"
    )
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", db_url)
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(FIXTURE_RULES))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    monkeypatch.setenv("COLUMNS", "300")
    result = CliRunner().invoke(cli_app, ["import", "events", str(path), "--now", now.isoformat()])
    assert result.exit_code == 1
    assert (
        f"{path}: row 2: line 3: a quote opened in this row is never closed (it would take in "
        "every line to the end of the file)"
    ) in result.output
    assert f"{path}: 4 rows: 3 events stored, 0 duplicates, 1 bad row" in result.output
    with Session(app.db) as session:
        ids = sorted(session.scalars(select(Event.id)))
    assert ids == ["q-1", "q-3", "q-4"]


def test_a_stray_quote_closed_rows_later_is_reported_and_the_swallowed_rows_read_again(
    app: App, tmp_path: Path, now: datetime
) -> None:
    import_customers(app.db, _customers_file(tmp_path), app.rules.catalog, now)
    path = tmp_path / "events.csv"
    path.write_text(
        "id,customer_id,type,occurred_at,prop.reason\n"
        'q-1,ann,complaint,2026-03-01T10:00:00Z,"broken\n'  # opened by mistake...
        "q-2,ann,complaint,2026-03-01T10:00:00Z,late\n"
        'q-3,ann,complaint,2026-03-01T10:00:00Z,"fine"\n'  # ...closed by this quote
        'q-4,ann,complaint,2026-03-01T10:00:00Z,"two\nlines"\n'  # a real line break
    )
    report = import_events(app.db, path, app.rules.catalog, now)
    assert [str(e) for e in report.errors] == [
        f"{path}: row 1: line 2: a quote opened in this row takes in line 3, which looks like "
        "a row of its own: is a quote left open?"
    ]
    with Session(app.db) as session:
        stored = {e.id: e.properties for e in session.scalars(select(Event))}
    assert stored == {
        "q-2": {"reason": "late"},
        "q-3": {"reason": "fine"},
        "q-4": {"reason": "two\nlines"},
    }


@pytest.mark.parametrize("newline", ["\n", ""], ids=["newline", "no-newline"])
def test_a_quote_left_open_in_the_last_row_is_reported_too(
    app: App, tmp_path: Path, now: datetime, newline: str
) -> None:
    """With no line after it to swallow, the open quote still took the line break (and
    anything up to the end of the file) into its cell: the row is refused all the same."""
    import_customers(app.db, _customers_file(tmp_path), app.rules.catalog, now)
    path = tmp_path / "events.csv"
    path.write_text(
        "id,customer_id,type,occurred_at,prop.reason\n"
        "q-1,ann,complaint,2026-03-01T10:00:00Z,late\n"
        f'q-2,ann,complaint,2026-03-01T10:00:00Z,"broken{newline}'
    )
    report = import_events(app.db, path, app.rules.catalog, now)
    assert [str(e) for e in report.errors] == [
        f"{path}: row 2: line 3: a quote opened in this row is never closed (it would take in "
        "every line to the end of the file)"
    ]
    with Session(app.db) as session:
        assert sorted(session.scalars(select(Event.id))) == ["q-1"]


# ── point 10: access logs ───────────────────────────────────────────────────────────


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_access_logs_carry_no_search_terms_or_unsubscribe_tokens(app: App) -> None:
    import uvicorn

    from tests.support.server import _Server, free_port

    records = _Records()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    token = unsubscribe_token(SECRET, "ann", "email", "m-1")
    port = free_port()
    config = uvicorn.Config(
        create_app(app), host="127.0.0.1", port=port, lifespan="off", log_config=None
    )
    server = _Server(config)
    import threading
    import time

    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        base = f"http://127.0.0.1:{port}"
        httpx.get(f"{base}/console/customers?q=ann%40example.com")
        httpx.get(f"{base}/console/customers?q=%2B447700900123")
        assert httpx.get(f"{base}/u/{token}").status_code == 200
        httpx.get(f"{base}/healthz?probe=1")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        logger.removeHandler(records)
    text = "\n".join(records.lines)
    assert '"GET /console/customers HTTP/1.1" 303' in text
    assert '"GET /u/<token> HTTP/1.1" 200' in text
    assert '"GET /healthz HTTP/1.1" 200' in text
    for secret in ("ann%40example.com", "ann@example.com", "447700900123", token, "probe"):
        assert secret not in text


# ── point 14: webhook receipts are pruned ───────────────────────────────────────────


def test_old_webhook_receipts_are_pruned_and_recent_ones_kept(app: App, now: datetime) -> None:
    with Session(app.db) as session:
        for days in (0, 6, 8, 30):
            session.add(
                WebhookReceipt(
                    provider="sendgrid",
                    event_key=f"k-{days}",
                    received_at=now - timedelta(days=days),
                )
            )
        session.commit()
    report = housekeeping_tick(app, now)
    assert report.receipts == 2
    with Session(app.db) as session:
        kept = sorted(session.scalars(select(WebhookReceipt.event_key)))
    assert kept == ["k-0", "k-6"]


def test_lifecycle_tick_prunes_receipts(
    app: App, db_url: str, monkeypatch: pytest.MonkeyPatch, now: datetime
) -> None:
    with Session(app.db) as session:
        session.add(
            WebhookReceipt(provider="twilio", event_key="old", received_at=now - timedelta(days=9))
        )
        session.commit()
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", db_url)
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(FIXTURE_RULES))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    monkeypatch.setenv("LIFECYCLE_OUTBOX_DIR", str(Path(app.settings.outbox_dir)))
    monkeypatch.setenv("COLUMNS", "300")
    result = CliRunner().invoke(cli_app, ["tick", "--now", now.isoformat()])
    assert result.exit_code == 0, result.output
    assert "pruned 1 webhook receipt in" in result.output
    assert count(app, WebhookReceipt) == 0


def test_deeply_nested_properties_are_a_422_not_a_recursion_error(
    client: TestClient, app: App, tmp_path: Path, now: datetime
) -> None:
    """Once a 500: 500 nested lists passed the JSON parser and overflowed the NaN check."""
    deep = "[" * 500 + "]" * 500
    body = json.dumps(event())[:-1] + ', "properties": {"deep": ' + deep + "}}"
    response = client.post(
        "/v1/events", content=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    (message,) = problems(response).values()
    assert message.endswith("is nested too deeply (at most 16 levels)")
    assert message.startswith("Value error, deep[0][0]")
    path = tmp_path / "events.jsonl"
    path.write_text(body + "\n" + json.dumps(event(id="e2")) + "\n")
    report = import_events(app.db, path, app.rules.catalog, now)
    assert len(report.errors) == 1 and "nested too deeply (at most 16 levels)" in str(
        report.errors[0]
    )
    assert report.created == 1

"""Robustness, on SQLite and PostgreSQL: bad input at the doors, a database that is gone
for a tick, a broken rule change while running, a provider that is down for a tick.

The doors (the ingest API and the importer) refuse what they cannot store or what would
stop evaluation later, naming the field, writing nothing of it and keeping the good rows.
A tick that cannot reach the database fails loudly (and the scheduler logs it at ERROR);
the next tick that can catches up with nothing lost. A broken rules reload keeps the last
good rules. A provider outage puts every message back in the queue, and each is sent
exactly once when the provider is back.

Cases the neighbouring files already cover are not repeated here: bad customer rows and
bad event rows in the fixture files (tests/integration/test_importing.py), the API's field
and catalog checks (test_api.py), a template failing for one message (test_dispatch.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, SQLModel

from channels.memory import MemoryChannel
from engine.bootstrap import App, bootstrap
from engine.data.db import make_engine
from engine.data.importing import ImportFileError, import_customers, import_events
from engine.data.ingest import CustomerIn, EventIn, record_event, upsert_customer
from engine.data.models import Customer, Enrollment, Escalation, Event, Message, MessageStatus
from engine.errors import RulesInvalid, SourceProblem
from engine.language.catalog import FactCatalog
from engine.playbooks.loader import load_catalog
from engine.runners.ticks import dispatch_tick, evaluation_tick
from engine.settings import Settings
from engine.web.app import create_app
from scheduler import LifecycleScheduler
from tests.support.fake_provider import FakeProvider
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES
from tests.support.server import free_port, web_app

ROOT = Path(__file__).resolve().parents[2]
RULES = FIXTURE_RULES
TEMPLATES = FIXTURE_TEMPLATES
# A Monday in March: London is on UTC and every sending window is open.
T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
API_KEY = "robustness-api-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


# ---------------------------------------------------------------- helpers


def settings_for(db_url: str, tmp_path: Path, **values: Any) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=db_url,
        rules_dir=values.pop("rules_dir", RULES),
        templates_dir=TEMPLATES,
        outbox_dir=tmp_path / "outbox",
        public_base_url="https://lifecycle.example",
        secret_key="robustness-secret",
        **values,
    )


def memory_app(db: Engine, db_url: str, tmp_path: Path, **values: Any) -> App:
    channel = MemoryChannel()
    return bootstrap(
        settings_for(db_url, tmp_path, **values),
        db=db,
        channels={"email": channel, "sms": channel},
        clock=lambda: T0,
        migrate=False,
    )


def add_customer(db: Engine, customer_id: str, at: datetime, **fields: Any) -> None:
    data = {
        "id": customer_id,
        "email": f"{customer_id}@example.com",
        "email_opt_in": True,
        "first_name": customer_id.capitalize(),
        "timezone": "Europe/London",
        "signed_up_at": at,
        **fields,
    }
    with Session(db) as session:
        upsert_customer(session, CustomerIn(**data), at)
        session.commit()


def add_event(db: Engine, customer_id: str, kind: str, at: datetime, **properties: Any) -> None:
    with Session(db) as session:
        record_event(
            session,
            EventIn(
                id=f"{customer_id}-{kind}-{at:%Y%m%d%H%M%S}",
                customer_id=customer_id,
                type=kind,
                occurred_at=at,
                properties=properties,
            ),
            at,
        )
        session.commit()


def count(db: Engine, model: Any) -> int:
    with Session(db) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def messages(db: Engine) -> list[Message]:
    with Session(db) as session:
        return list(session.scalars(select(Message).order_by(Message.customer_id, Message.id)))


def empty(db: Engine) -> None:
    """Delete every row, children first: between a control run and the real one."""
    with db.begin() as connection:
        for table in reversed(SQLModel.metadata.sorted_tables):
            connection.execute(table.delete())


@pytest.fixture(scope="module")
def catalog() -> FactCatalog:
    problems: list[SourceProblem] = []
    found, _ = load_catalog(RULES, problems)
    assert not problems, problems
    return found


# ---------------------------------------------------------------- the ingest API


@pytest.fixture
def api_app(db_url: str, tmp_path: Path) -> Iterator[App]:
    application = web_app(db_url, tmp_path, T0, api_key=API_KEY)
    yield application
    application.db.dispose()


@pytest.fixture
def client(api_app: App) -> Iterator[TestClient]:
    with TestClient(create_app(api_app)) as test_client:
        yield test_client


def problems_of(response: httpx.Response) -> dict[tuple[str, ...], str]:
    assert response.status_code == 422, response.text
    return {tuple(str(p) for p in e["loc"]): e["msg"] for e in response.json()["detail"]}


ORDER = {
    "id": "o-1",
    "customer_id": "ann",
    "type": "order_placed",
    "occurred_at": "2026-03-01T10:00:00Z",
    "properties": {"amount_cents": 4999},
}
BIG = 2_000_000_000
NOT_AN_OBJECT = "Input should be a valid dictionary or object to extract fields from"


def test_a_body_that_is_not_a_json_object_is_422_and_writes_nothing(
    client: TestClient, api_app: App
) -> None:
    for path in ("/v1/events", "/v1/customers"):
        for body in (b"[1, 2]", b'"order_placed"', b"42", b"null", b"true"):
            response = client.post(
                path, content=body, headers={**AUTH, "Content-Type": "application/json"}
            )
            assert problems_of(response) == {("body",): NOT_AN_OBJECT}, (path, body)
    assert count(api_app.db, Customer) == 0 and count(api_app.db, Event) == 0


def test_an_event_missing_fields_or_with_wrong_types_is_422_naming_each_field(
    client: TestClient, api_app: App
) -> None:
    assert client.post("/v1/customers", json={"id": "ann"}, headers=AUTH).status_code == 201

    missing = client.post("/v1/events", json={"id": "o-1"}, headers=AUTH)
    assert problems_of(missing) == {
        ("body", "customer_id"): "Field required",
        ("body", "type"): "Field required",
        ("body", "occurred_at"): "Field required",
    }
    wrong = client.post(
        "/v1/events",
        json={**ORDER, "id": 7, "occurred_at": True, "properties": ["amount_cents", 4999]},
        headers=AUTH,
    )
    assert problems_of(wrong) == {
        ("body", "id"): "Input should be a valid string",
        ("body", "occurred_at"): "Input should be a valid datetime",
        ("body", "properties"): "Input should be a valid dictionary",
    }
    truncated = client.post(
        "/v1/events",
        content=b'{"id": "o-1", "customer_id": ',
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert truncated.status_code == 422 and truncated.json()["detail"][0]["type"] == "json_invalid"
    assert count(api_app.db, Event) == 0
    ann = _customer(api_app.db, "ann")
    assert (ann.orders_count, ann.total_spend_cents, ann.last_activity_at) == (0, 0, None)


def test_values_the_database_or_the_rules_engine_cannot_hold_are_422_not_500(
    client: TestClient, api_app: App
) -> None:
    """Each of these once answered 500 on one back end or was stored and then stopped every
    evaluation tick (a number beyond +-2**53 cannot be a fact)."""
    assert client.post("/v1/customers", json={"id": "ann"}, headers=AUTH).status_code == 201
    cases: list[tuple[dict[str, Any], tuple[str, ...], str]] = [
        (
            {**ORDER, "properties": {"amount_cents": 2**62}},
            ("body", "properties", "amount_cents"),
            "numbers must be within +-2**53",
        ),
        (
            {**ORDER, "properties": {"amount_cents": 10**30}},
            ("body", "properties", "amount_cents"),
            "numbers must be within +-2**53",
        ),
        (
            {**ORDER, "type": "complaint", "properties": {"reason": "x" * 70_000, "severity": 2}},
            ("body", "properties", "reason"),
            "70,002 bytes; at most 10,000 bytes a value",
        ),
        (
            {**ORDER, "id": "o-\x00-1"},
            ("body", "id"),
            "Value error, must not contain control characters: NUL at character 3",
        ),
    ]
    for body, where, message in cases:
        assert problems_of(client.post("/v1/events", json=body, headers=AUTH)) == {where: message}
    nan = client.post(
        "/v1/events",
        content=(
            b'{"id": "v-1", "customer_id": "ann", "type": "site_visit", '
            b'"occurred_at": "2026-03-01T10:00:00Z", "properties": {"scroll": [1, NaN]}}'
        ),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert problems_of(nan) == {
        ("body", "properties", "scroll"): "NaN and Infinity are not JSON values"
    }
    customer = client.post("/v1/customers", json={"id": "bo\x00"}, headers=AUTH)
    assert problems_of(customer) == {
        ("body", "id"): "Value error, must not contain control characters: NUL at character 3"
    }
    assert count(api_app.db, Event) == 0 and count(api_app.db, Customer) == 1
    ann = _customer(api_app.db, "ann")
    assert (ann.orders_count, ann.total_spend_cents) == (0, 0)


def test_extreme_values_that_are_accepted_do_not_stop_the_next_tick(
    client: TestClient, api_app: App
) -> None:
    """Events from the far future and the far past, a $20M order: stored, and the tick still
    enrolls and sends for everyone, the odd customer included. (The customer's roll-up
    columns are 32-bit on PostgreSQL, so $20M is about the largest total that fits.)"""
    for customer in ("ann", "odd"):
        body = {"id": customer, "email": f"{customer}@example.com", "email_opt_in": True}
        assert client.post("/v1/customers", json=body, headers=AUTH).status_code == 201
    accepted = [
        {**ORDER, "id": "odd-1", "customer_id": "odd", "properties": {"amount_cents": BIG}},
        {**ORDER, "id": "odd-2", "customer_id": "odd", "type": "site_visit", "properties": {}}
        | {"occurred_at": "9999-12-31T23:59:59Z"},
        {**ORDER, "id": "odd-3", "customer_id": "odd", "type": "nps_submitted"}
        | {"occurred_at": "0001-01-01T00:00:00Z", "properties": {"score": 10}},
        {**ORDER, "id": "ann-1", "customer_id": "ann", "type": "signed_up", "properties": {}},
    ]
    for body in accepted:
        response = client.post("/v1/events", json=body, headers=AUTH)
        assert response.status_code == 201, response.text

    report = evaluation_tick(api_app, T0, workers=0)
    dispatch_tick(api_app, T0)

    assert report.customers == 2
    sent = {(m.customer_id, m.playbook, m.step_id) for m in messages(api_app.db)}
    assert ("ann", "welcome_series", "welcome") in sent
    assert ("odd", "loyalty_reward", "reward") in sent  # $20M is over $500
    odd = _customer(api_app.db, "odd")
    assert odd.total_spend_cents == BIG
    assert odd.last_activity_at == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def _customer(db: Engine, customer_id: str) -> Customer:
    with Session(db) as session:
        found = session.get(Customer, customer_id)
        assert found is not None, customer_id
        return found


# ---------------------------------------------------------------- the importer


def errors(report: Any) -> list[str]:
    return [str(error) for error in report.errors]


def event_ids(db: Engine) -> list[str]:
    with Session(db) as session:
        return sorted(session.scalars(select(Event.id)))


EVENTS_HEADER = "id,customer_id,type,occurred_at,prop.amount_cents,prop.reason"


@pytest.fixture
def customers_db(db: Engine, catalog: FactCatalog, tmp_path: Path) -> Engine:
    path = tmp_path / "customers.csv"
    path.write_text("id,email,email_opt_in\nann,ann@example.com,yes\nbo,bo@example.com,yes\n")
    assert import_customers(db, path, catalog, T0).created == 2
    return db


def test_a_csv_with_a_bom_and_crlf_line_endings_imports_like_any_other(
    customers_db: Engine, catalog: FactCatalog, tmp_path: Path
) -> None:
    path = tmp_path / "events.csv"
    rows = [
        EVENTS_HEADER,
        "c-1,ann,order_placed,2026-03-01T10:00:00Z,1500,",
        'c-2,bo,complaint,2026-03-01T11:00:00Z,,"Late, and\r\nthe box was crushed"',
        "c-3,bo,order_placed,2026-03-01T12:00:00Z,12.50,",
        "c-4,bo,order_placed,2026-03-01T13:00:00Z,2500,",
    ]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")

    report = import_events(customers_db, path, catalog, T0)

    # The quoted cell spans lines 3 and 4, so c-3 is on line 5.
    assert errors(report) == [
        f"{path}: row 3: line 5: properties.amount_cents: expected money in whole cents "
        "(4999 for $49.99), got '12.50'"
    ]
    assert (report.rows, report.created) == (4, 3)
    assert event_ids(customers_db) == ["c-1", "c-2", "c-4"]
    with Session(customers_db) as session:
        complaint = session.get(Event, "c-2")
        assert complaint is not None
        assert complaint.properties == {"reason": "Late, and\r\nthe box was crushed"}
    assert _customer(customers_db, "bo").total_spend_cents == 2500


def test_jsonl_with_a_bom_and_crlf_line_endings_imports_like_any_other(
    customers_db: Engine, catalog: FactCatalog, tmp_path: Path
) -> None:
    path = tmp_path / "events.jsonl"
    lines = [
        '{"id": "j-1", "customer_id": "ann", "type": "site_visit", "occurred_at": "2026-03-01T10:00:00Z"}',
        "",
        '{"id": "j-2", "customer_id": "bo", "type": "site_visit", "occurred_at": "2026-03-01T11:00:00Z"}',
    ]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")

    report = import_events(customers_db, path, catalog, T0)

    assert (report.rows, report.created, errors(report)) == (2, 2, [])
    assert event_ids(customers_db) == ["j-1", "j-2"]


def test_rows_with_the_wrong_column_count_or_a_broken_quote_are_refused_and_the_rest_kept(
    customers_db: Engine, catalog: FactCatalog, tmp_path: Path
) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "id,customer_id,type,occurred_at\n"
        "w-1,ann,site_visit,2026-03-01T10:00:00Z\n"
        "w-2,ann,site_visit,2026-03-01T10:00:00Z,one too many\n"
        "w-3,ann\n"
        "w-4,bo,site_visit,2026-03-01T10:00:00Z\n"
        'w-5,"bo,site_visit,2026-03-01T10:00:00Z\n'  # the quote is never closed...
        "w-6,bo,site_visit,2026-03-01T10:00:00Z\n"  # ...but this line is still a row
    )

    report = import_events(customers_db, path, catalog, T0)

    assert errors(report) == [
        f"{path}: row 2: line 3: expected 4 columns as in the header, found 5",
        f"{path}: row 3: line 4: expected 4 columns as in the header, found 2",
        f"{path}: row 5: line 6: a quote opened in this row is never closed "
        "(it would take in every line to the end of the file)",
    ]
    assert event_ids(customers_db) == ["w-1", "w-4", "w-6"]


def test_a_cell_over_the_csv_field_limit_is_one_bad_row(
    customers_db: Engine, catalog: FactCatalog, tmp_path: Path
) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "id,customer_id,type,occurred_at,prop.reason\n"
        f"h-1,ann,complaint,2026-03-01T10:00:00Z,{'x' * 200_000}\n"
        "h-2,bo,complaint,2026-03-01T10:00:00Z,Late\n"
    )

    report = import_events(customers_db, path, catalog, T0)

    assert errors(report) == [
        f"{path}: row 1: line 2: unreadable CSV: field larger than field limit (131072)"
    ]
    assert event_ids(customers_db) == ["h-2"]


def test_values_that_would_stop_evaluation_are_refused_row_by_row(
    customers_db: Engine, catalog: FactCatalog, tmp_path: Path
) -> None:
    """Once: an amount of 10**30 aborted the whole import on SQLite (OverflowError), 2**62
    was stored and stopped every evaluation tick, a deeply nested line aborted the import
    (RecursionError). Now each is one bad row."""
    csv_path = tmp_path / "events.csv"
    csv_path.write_text(
        f"{EVENTS_HEADER}\n"
        "n-1,ann,order_placed,2026-03-01T10:00:00Z,1000,\n"
        f"n-2,ann,order_placed,2026-03-01T10:00:00Z,{10**30},\n"
        f"n-3,ann,order_placed,2026-03-01T10:00:00Z,{2**62},\n"
        f"n-4,ann,complaint,2026-03-01T10:00:00Z,,{'x' * 70_000}\n"
        "n-\x005,ann,site_visit,2026-03-01T10:00:00Z,,\n"
        "n-6,ann,order_placed,2026-03-01T10:00:00Z,2000,\n"
    )
    jsonl_path = tmp_path / "events.jsonl"
    visit = '{"id": "%s", "customer_id": "bo", "type": "site_visit", "occurred_at": "2026-03-01T10:00:00Z"%s}'
    jsonl_path.write_text(
        "\n".join(
            [
                visit % ("m-1", ""),
                visit % ("m-2", ', "properties": {"deep": ' + "[" * 50_000 + "]" * 50_000 + "}"),
                visit % ("m-3", ""),
            ]
        )
        + "\n"
    )

    csv_report = import_events(customers_db, csv_path, catalog, T0)
    jsonl_report = import_events(customers_db, jsonl_path, catalog, T0)

    assert errors(csv_report) == [
        f"{csv_path}: row 2: line 3: properties.amount_cents: numbers must be within +-2**53",
        f"{csv_path}: row 3: line 4: properties.amount_cents: numbers must be within +-2**53",
        f"{csv_path}: row 4: line 5: properties.reason: 70,002 bytes; at most 10,000 bytes a value",
        f"{csv_path}: row 5: line 6: id: must not contain control characters: NUL at character 3",
    ]
    assert errors(jsonl_report) == [f"{jsonl_path}: row 2: malformed JSON: nested too deeply"]
    assert event_ids(customers_db) == ["m-1", "m-3", "n-1", "n-6"]
    ann = _customer(customers_db, "ann")
    assert (ann.orders_count, ann.total_spend_cents) == (2, 3000)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        pytest.param(
            "events.csv",
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00",
            "line 1 is not UTF-8 text (invalid start byte at byte 1); save the file as UTF-8",
            id="png-as-csv",
        ),
        pytest.param(
            "events.jsonl",
            b'{"id": "b-1", "customer_id": "ann", "type": "site_visit", '
            b'"occurred_at": "2026-03-01T10:00:00Z"}\n\x00\x01\xfe\xff\x00garbage\n',
            "line 2 is not UTF-8 text (invalid start byte at byte 3); save the file as UTF-8",
            id="binary-after-a-good-line",
        ),
    ],
)
def test_unusable_files_are_refused_before_any_row_is_written(
    customers_db: Engine,
    catalog: FactCatalog,
    tmp_path: Path,
    name: str,
    content: bytes,
    expected: str,
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImportFileError) as caught:
        import_events(customers_db, path, catalog, T0)
    assert str(caught.value) == f"{path}: {expected}"
    assert event_ids(customers_db) == []


@pytest.mark.parametrize(
    ("name", "content"),
    [("events.jsonl", ""), ("events.jsonl", "\n\r\n  \n"), ("events.csv", EVENTS_HEADER + "\n")],
    ids=["empty-jsonl", "blank-jsonl", "header-only-csv"],
)
def test_a_file_with_no_rows_imports_nothing_and_says_so(
    customers_db: Engine, catalog: FactCatalog, tmp_path: Path, name: str, content: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    report = import_events(customers_db, path, catalog, T0)
    assert report.summary() == f"{path}: 0 rows: 0 events stored, 0 duplicates, 0 bad rows"
    assert event_ids(customers_db) == []


# ---------------------------------------------------------------- the database goes away


def unreachable_engine(db: Engine, tmp_path: Path) -> tuple[Engine, str]:
    """An engine on the same back end that cannot connect, and what its error says."""
    if db.dialect.name == "sqlite":
        return (
            make_engine(f"sqlite:///{tmp_path}/no-such-directory/lifecycle.db"),
            "unable to open database file",
        )
    return (
        make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/test"),
        "Connection refused",
    )


def seed_pending_work(db: Engine) -> None:
    """Customers whose events arrived but were never evaluated: a sign-up, a complaint,
    a fifth order."""
    add_customer(db, "ann", T0 - timedelta(hours=1))
    add_event(db, "ann", "signed_up", T0 - timedelta(hours=1))
    add_customer(db, "bo", T0 - timedelta(days=60), phone="+447700900123", sms_opt_in=True)
    add_event(db, "bo", "complaint", T0 - timedelta(minutes=30), reason="Late", severity=2)
    add_customer(db, "cy", T0 - timedelta(days=200))
    for n in range(5):
        add_event(db, "cy", "order_placed", T0 - timedelta(days=10 - n), amount_cents=2000)


def outcome(app: App) -> dict[str, Any]:
    """What the ticks did, without the times (they differ by the length of the outage)."""
    rows = messages(app.db)
    channel: MemoryChannel = app.channels["email"]
    delivered = [d.message.message_id for d in channel.deliveries]
    with Session(app.db) as session:
        enrollments = sorted(
            (e.customer_id, e.playbook, e.status) for e in session.scalars(select(Enrollment))
        )
        cases = sorted((c.customer_id, c.status) for c in session.scalars(select(Escalation)))
        pending = session.scalar(
            select(func.count()).select_from(Event).where(Event.evaluated_at.is_(None))  # type: ignore[union-attr]
        )
    assert sorted(delivered) == sorted(m.id for m in rows if m.status == MessageStatus.SENT)
    return {
        "messages": sorted(
            (m.customer_id or "", m.kind, m.playbook or "", m.step_id or "", m.channel)
            + (m.to_address, m.status)
            for m in rows
        ),
        "deliveries": len(delivered),
        "enrollments": enrollments,
        "cases": cases,
        "pending events": pending,
    }


def test_a_tick_without_its_database_fails_loudly_and_the_next_one_catches_up(
    db: Engine, db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Control: the same work, with a database that never went away.
    seed_pending_work(db)
    control = memory_app(db, db_url, tmp_path)
    evaluation_tick(control, T0, workers=0)
    dispatch_tick(control, T0)
    expected = outcome(control)
    assert (expected["deliveries"], expected["pending events"]) == (5, 0)
    assert [m[:5] for m in expected["messages"]] == [
        ("ann", "marketing", "welcome_series", "welcome", "email"),
        ("bo", "staff", "complaint_escalation", "opened", "email"),  # the on-duty lead
        ("bo", "staff", "complaint_escalation", "opened", "sms"),
        ("bo", "transactional", "complaint_escalation", "apology", "email"),
        ("cy", "marketing", "loyalty_reward", "reward", "email"),
    ]
    assert {m[-1] for m in expected["messages"]} == {MessageStatus.SENT}
    assert expected["cases"] == [("bo", "open")]
    empty(db)

    seed_pending_work(db)
    app = memory_app(db, db_url, tmp_path)
    app.db, says = unreachable_engine(db, tmp_path)
    with pytest.raises(OperationalError) as evaluating:
        evaluation_tick(app, T0, workers=0)
    assert says in str(evaluating.value)
    with pytest.raises(OperationalError) as dispatching:
        dispatch_tick(app, T0)
    assert says in str(dispatching.value)

    # The scheduler runs the same ticks as APScheduler jobs; a failed one is logged at ERROR.
    caplog.set_level(logging.ERROR, logger="lifecycle.scheduler")
    failures = run_jobs_once(LifecycleScheduler(app), ["evaluate", "dispatch"])
    assert sorted(failures) == ["dispatch", "evaluate"]
    logged = {
        r.getMessage().split(":", 1)[0]: r
        for r in caplog.records
        if r.name == "lifecycle.scheduler" and r.levelno == logging.ERROR
    }
    assert set(logged) == {"job evaluate failed", "job dispatch failed"}
    for record in logged.values():
        assert says in record.getMessage()
        assert record.exc_info is not None and record.exc_info[0] is OperationalError

    app.db.dispose()
    app.db = make_engine(db_url)  # the database is back
    try:
        # The evaluation tick catches up; dispatch runs an hour later, when the scheduler's
        # next tick comes: the messages are still due (due time in the past), none is lost.
        evaluation_tick(app, T0 + timedelta(minutes=5), workers=0)
        dispatch_tick(app, T0 + timedelta(hours=1))
        assert outcome(app) == expected
        # And nothing goes twice.
        evaluation_tick(app, T0 + timedelta(hours=1, minutes=1), workers=0)
        dispatch_tick(app, T0 + timedelta(hours=1, minutes=1))
        assert outcome(app) == expected
    finally:
        app.db.dispose()


def run_jobs_once(lifecycle: LifecycleScheduler, job_ids: list[str]) -> list[str]:
    """Run each named job of ``lifecycle`` once through a real BackgroundScheduler; returns
    the ids of the jobs that failed."""
    done = threading.Event()
    finished: dict[str, bool] = {}
    lock = threading.Lock()

    def listener(event: JobExecutionEvent) -> None:
        with lock:
            finished[event.job_id] = event.exception is None
            if len(finished) == len(job_ids):
                done.set()

    scheduler = lifecycle.scheduler
    scheduler.remove_all_jobs()
    for job_id in job_ids:
        scheduler.add_job(getattr(lifecycle, job_id), id=job_id)  # no trigger: run now, once
    scheduler.add_listener(listener, EVENT_JOB_ERROR | EVENT_JOB_EXECUTED)
    lifecycle.start()
    try:
        assert done.wait(timeout=120), f"jobs did not run: {finished}"
    finally:
        lifecycle.stop()
    return sorted(job for job, ok in finished.items() if not ok)


# ---------------------------------------------------------------- a broken rule change


def test_a_broken_rule_change_keeps_the_last_good_rules(
    db: Engine, db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    for source in RULES.glob("*.yaml"):
        (rules_dir / source.name).write_text(source.read_text())
    app = memory_app(db, db_url, tmp_path, rules_dir=rules_dir)
    good = app.rules
    welcome = rules_dir / "welcome_series.yaml"
    original = welcome.read_text()
    welcome.write_text(original.replace("when: orders_count >= 1", "when: order_count >= 1"))
    expected = (
        f"{welcome}:12:9: unknown fact 'order_count' (did you mean 'orders_count'?)"
        if not welcome.is_relative_to(Path.cwd())
        else f"{welcome.relative_to(Path.cwd())}:12:9: unknown fact 'order_count' "
        "(did you mean 'orders_count'?)"
    )

    with pytest.raises(RulesInvalid) as caught:
        app.reload_rules()
    assert [str(p) for p in caught.value.problems] == [expected]
    assert app.rules is good

    caplog.set_level(logging.DEBUG, logger="lifecycle.scheduler")
    LifecycleScheduler(app).reload_rules()
    (record,) = [r for r in caplog.records if r.name == "lifecycle.scheduler"]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == (
        f"rule files have problems; keeping the last good rules (version {good.version}):\n"
        f"1 problem in the rules:\n{expected}"
    )
    assert app.rules is good and app.rules.version == good.version

    # The engine keeps working on the last good rules.
    add_customer(db, "ann", T0)
    add_event(db, "ann", "signed_up", T0)
    evaluation_tick(app, T0, workers=0)
    dispatch_tick(app, T0)
    assert [(m.playbook, m.step_id, m.status) for m in messages(db)] == [
        ("welcome_series", "welcome", "sent")
    ]

    # A good change is taken at the next reload, logged with its version, not as an error.
    caplog.clear()
    welcome.write_text(original.replace("priority: 20 ", "priority: 21 "))
    LifecycleScheduler(app).reload_rules()
    (record,) = [r for r in caplog.records if r.name == "lifecycle.scheduler"]
    assert (record.levelno, record.getMessage()) == (
        logging.INFO,
        f"rules reloaded: version {app.rules.version} (was {good.version}), 5 playbooks",
    )
    assert app.rules.version != good.version
    assert app.rules.playbooks["welcome_series"].priority == 21


# ---------------------------------------------------------------- the provider goes away


def provider_app(db: Engine, db_url: str, tmp_path: Path, fake: FakeProvider) -> App:
    settings = settings_for(
        db_url,
        tmp_path,
        email_channel="sendgrid",
        sendgrid_api_key=fake.sendgrid_api_key,
        sendgrid_host=fake.url,
        sms_channel="twilio",
        twilio_account_sid=fake.twilio_account_sid,
        twilio_auth_token=fake.twilio_auth_token,
        twilio_from_number="+15005550006",
        twilio_base_url=fake.url,
    )
    return bootstrap(settings, db=db, clock=lambda: T0, migrate=False)


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider.start()
    yield provider
    provider.stop()


def test_a_provider_outage_for_a_whole_tick_loses_nothing_and_sends_each_message_once(
    db: Engine, db_url: str, tmp_path: Path, fake: FakeProvider
) -> None:
    app = provider_app(db, db_url, tmp_path, fake)
    for name in ("ann", "bo", "cy"):
        add_customer(db, name, T0 - timedelta(minutes=5))
        add_event(db, name, "signed_up", T0 - timedelta(minutes=5))
    add_customer(db, "di", T0 - timedelta(days=200), phone="+447700900123", sms_opt_in=True)
    for n in range(5):
        add_event(db, "di", "order_placed", T0 - timedelta(days=10 - n), amount_cents=2000)
    evaluation_tick(app, T0, workers=0)
    evaluation_tick(app, T0 + timedelta(days=1), workers=0)  # di's reward SMS comes due
    queued = {m.id: m for m in messages(db)}
    assert sorted((m.customer_id, m.channel) for m in queued.values()) == [
        ("ann", "email"),
        ("bo", "email"),
        ("cy", "email"),
        ("di", "email"),
        ("di", "sms"),
    ]
    assert {m.status for m in queued.values()} == {MessageStatus.QUEUED}

    port = fake.port
    fake.stop()  # the provider is down: every connection is refused
    down = T0 + timedelta(days=1, minutes=1)
    report = dispatch_tick(app, down)
    assert (report.claimed, report.retried, report.total_sent, report.failed) == (5, 5, 0, 0)
    after = {m.id: m for m in messages(db)}
    assert set(after) == set(queued)
    for message in after.values():
        assert message.status == MessageStatus.QUEUED, message.last_error
        assert (message.attempts, message.attempted_at, message.sent_at) == (1, None, None)
        assert message.due_at > down
        assert message.last_error is not None
        assert message.last_error.startswith("attempt 1: ")
        assert "cannot reach" in message.last_error and "Connection refused" in message.last_error

    back = FakeProvider.start(port=port)  # the provider is back, at the same address
    try:
        later = down + timedelta(hours=1)
        report = dispatch_tick(app, later)
        assert (report.claimed, report.total_sent, report.retried, report.failed) == (5, 5, 0, 0)
        again = dispatch_tick(app, later + timedelta(hours=1))
        assert again.claimed == 0
        sent = {m.id: m for m in messages(db)}
        assert {m.status for m in sent.values()} == {MessageStatus.SENT}
        assert {m.attempts for m in sent.values()} == {2}
        emails = [e.message_id for e in back.sent_emails()]
        texts = [s.to for s in back.sent_sms()]
        assert sorted(emails) == sorted(i for i, m in sent.items() if m.channel == "email")
        assert texts == ["+447700900123"]
        assert [s.provider_id for s in sent.values() if s.channel == "sms"] == [
            back.sent_sms()[0].sid
        ]
    finally:
        back.stop()

"""The ingest API over HTTP, on SQLite and PostgreSQL: auth, validation, idempotency.

Also here, because they share the app fixture: staff passwords and the console's
sign-in, CSRF and pages through a plain HTTP client (the browser test drives the rest).
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlmodel import Session

from engine.bootstrap import App
from engine.data.models import (
    Customer,
    Decision,
    Enrollment,
    EnrollmentStatus,
    EscalationStatus,
    Event,
    Message,
    MessageStatus,
)
from engine.errors import ConfigurationError
from engine.escalations import cases as escalations
from engine.web.app import create_app
from engine.web.auth import (
    SESSION_COOKIE,
    StaffDirectory,
    hash_password,
    parse_staff_passwords,
    verify_password,
)
from tests.support.server import serve, web_app

API_KEY = "test-api-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
STAFF = "Priya Shah"
PASSWORD = "correct horse battery"
STAFF_PASSWORDS = f"{STAFF}:{hash_password(PASSWORD, iterations=1_000)}"


@pytest.fixture
def app(db_url: str, tmp_path: Path, now: datetime) -> Iterator[App]:
    application = web_app(db_url, tmp_path, now, api_key=API_KEY, staff_passwords=STAFF_PASSWORDS)
    yield application
    application.db.dispose()


@pytest.fixture
def client(app: App) -> Iterator[TestClient]:
    with TestClient(create_app(app)) as test_client:
        yield test_client


def count(app: App, model: Any) -> int:
    with Session(app.db) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def customer(app: App, customer_id: str) -> Customer | None:
    with Session(app.db) as session:
        return session.get(Customer, customer_id)


def locs(response: httpx.Response) -> dict[tuple[str, ...], str]:
    return {tuple(str(p) for p in e["loc"]): e["msg"] for e in response.json()["detail"]}


ANN = {
    "id": "c1",
    "email": "Ann@Example.com",
    "first_name": "Ann",
    "email_opt_in": True,
    "attributes": {"plan": "plus"},
}
ORDER = {
    "id": "e1",
    "customer_id": "c1",
    "type": "order_placed",
    "occurred_at": "2026-03-01T10:00:00Z",
    "properties": {"amount_cents": 4999},
}


# ── auth ────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": "Bearer "},
    ],
    ids=["missing", "wrong", "not-bearer", "empty"],
)
def test_a_request_without_the_right_key_is_401_and_writes_nothing(
    client: TestClient, app: App, headers: dict[str, str]
) -> None:
    response = client.post("/v1/customers", json=ANN, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "API key" in response.json()["detail"]
    assert client.post("/v1/events", json=ORDER, headers=headers).status_code == 401
    assert count(app, Customer) == 0 and count(app, Event) == 0


def test_without_the_key_even_a_malformed_body_is_401_not_422(client: TestClient) -> None:
    response = client.post(
        "/v1/customers", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 401


def test_with_no_key_configured_the_api_refuses_everything(
    db_url: str, tmp_path: Path, now: datetime
) -> None:
    application = web_app(db_url, tmp_path, now)  # api_key unset
    try:
        with TestClient(create_app(application)) as test_client:
            for headers in ({}, {"Authorization": "Bearer anything"}):
                response = test_client.post("/v1/customers", json=ANN, headers=headers)
                assert response.status_code == 503
                assert "LIFECYCLE_API_KEY" in response.json()["detail"]
        assert count(application, Customer) == 0
    finally:
        application.db.dispose()


def test_the_openapi_schema_is_served_with_the_api_key(client: TestClient) -> None:
    assert client.get("/openapi.json").status_code == 404  # not public by default
    schema = client.get("/openapi.json", headers=AUTH).json()
    assert {"/v1/customers", "/v1/events"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "CustomerIn" in schema["components"]["schemas"]
    assert not any(path.startswith("/console") for path in schema["paths"])
    assert not any(path in ("/openapi.json", "/docs") for path in schema["paths"])


# ── customers ───────────────────────────────────────────────────────────────────────


def test_a_customer_is_created_then_updated_then_unchanged(
    client: TestClient, app: App, now: datetime
) -> None:
    created = client.post("/v1/customers", json=ANN, headers=AUTH)
    assert (created.status_code, created.json()) == (201, {"id": "c1", "status": "created"})
    again = client.post("/v1/customers", json=ANN, headers=AUTH)
    assert (again.status_code, again.json()["status"]) == (200, "unchanged")
    changed = client.post(
        "/v1/customers", json={"id": "c1", "attributes": {"vip": True}}, headers=AUTH
    )
    assert (changed.status_code, changed.json()["status"]) == (200, "updated")
    row = customer(app, "c1")
    assert row is not None
    assert row.email == "ann@example.com" and row.email_opt_in and row.email_opt_in_at == now
    assert row.attributes == {"plan": "plus", "vip": True}


def test_bad_fields_are_422_naming_each_field_and_nothing_is_written(
    client: TestClient, app: App
) -> None:
    body = {**ANN, "email": "not-an-email", "timezone": "Mars/Olympus", "shoe_size": 9}
    response = client.post("/v1/customers", json=body, headers=AUTH)
    assert response.status_code == 422
    found = locs(response)
    assert "'not-an-email' is not an email address" in found[("body", "email")]
    assert "IANA time zone" in found[("body", "timezone")]
    assert ("body", "shoe_size") in found
    assert count(app, Customer) == 0


def test_catalog_problems_have_the_same_shape(client: TestClient, app: App) -> None:
    body = {**ANN, "attributes": {"plan": 5, "favourite_colour": "red"}}
    response = client.post("/v1/customers", json=body, headers=AUTH)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert {
        "loc": ["body", "attributes", "plan"],
        "msg": "expected string, got 5",
        "type": "catalog",
    } in detail
    assert (
        locs(response)[("body", "attributes", "favourite_colour")]
        == "not declared in rules/catalog.yaml"
    )
    assert count(app, Customer) == 0


def test_a_refused_update_leaves_the_customer_as_it_was(client: TestClient, app: App) -> None:
    assert client.post("/v1/customers", json=ANN, headers=AUTH).status_code == 201
    body = {"id": "c1", "email": "new@example.com", "attributes": {"vip": "yes"}}
    assert client.post("/v1/customers", json=body, headers=AUTH).status_code == 422
    row = customer(app, "c1")
    assert row is not None and row.email == "ann@example.com" and "vip" not in row.attributes


# ── events ──────────────────────────────────────────────────────────────────────────


def test_events_are_idempotent_by_id(client: TestClient, app: App, now: datetime) -> None:
    """The same event sent again, however it is spelt, is a duplicate and changes nothing."""
    client.post("/v1/customers", json=ANN, headers=AUTH)
    first = client.post("/v1/events", json=ORDER, headers=AUTH)
    assert (first.status_code, first.json()) == (201, {"id": "e1", "status": "accepted"})
    for again in (
        ORDER,
        # the same instant in another offset, and padded text
        {
            **ORDER,
            "customer_id": " c1 ",
            "occurred_at": "2026-03-01T11:00:00+01:00",
            "properties": {"amount_cents": 4999},
        },
    ):
        repeat = client.post("/v1/events", json=again, headers=AUTH)
        assert (repeat.status_code, repeat.json()) == (200, {"id": "e1", "status": "duplicate"})
    precise = {**ORDER, "id": "e2", "occurred_at": "2026-03-01T10:00:00.123456Z"}
    assert client.post("/v1/events", json=precise, headers=AUTH).status_code == 201
    assert client.post("/v1/events", json=precise, headers=AUTH).status_code == 200  # as stored
    row = customer(app, "c1")
    assert row is not None and (row.orders_count, row.total_spend_cents) == (2, 2 * 4999)
    with Session(app.db) as session:
        event = session.get(Event, "e1")
        assert (
            event is not None
            and event.received_at == now
            and event.properties == {"amount_cents": 4999}
        )


def test_an_event_id_resent_with_a_different_payload_is_a_409_and_changes_nothing(
    client: TestClient, app: App, now: datetime
) -> None:
    client.post("/v1/customers", json=ANN, headers=AUTH)
    assert client.post("/v1/events", json=ORDER, headers=AUTH).status_code == 201
    changed = {**ORDER, "occurred_at": "2026-03-01T12:00:00Z", "properties": {"amount_cents": 1}}
    response = client.post("/v1/events", json=changed, headers=AUTH)
    assert response.status_code == 409
    message = (
        "event 'e1' was recorded before with a different payload "
        "(occurred_at, properties.amount_cents differ); nothing was changed: "
        "send a new event with a new id"
    )
    assert response.json() == {
        "detail": [
            {"loc": ["body", "occurred_at"], "msg": message, "type": "conflict"},
            {"loc": ["body", "properties", "amount_cents"], "msg": message, "type": "conflict"},
        ]
    }
    other_type = client.post(
        "/v1/events", json={**ORDER, "type": "site_visit", "properties": {}}, headers=AUTH
    )
    assert other_type.status_code == 409
    assert [e["loc"] for e in other_type.json()["detail"]] == [
        ["body", "type"],
        ["body", "properties", "amount_cents"],
    ]
    row = customer(app, "c1")
    assert row is not None and (row.orders_count, row.total_spend_cents) == (1, 4999)
    with Session(app.db) as session:
        event = session.get(Event, "e1")
        assert event is not None and event.properties == {"amount_cents": 4999}
        assert (
            event.occurred_at == datetime(2026, 3, 1, 10, tzinfo=UTC) and event.received_at == now
        )


def test_an_event_for_an_unknown_customer_is_422_naming_customer_id(
    client: TestClient, app: App
) -> None:
    response = client.post("/v1/events", json={**ORDER, "customer_id": "nobody"}, headers=AUTH)
    assert response.status_code == 422
    assert locs(response) == {
        ("body", "customer_id"): "no customer with id 'nobody' (create them first, or set "
        "LIFECYCLE_CREATE_UNKNOWN_CUSTOMERS=true)"
    }
    assert count(app, Event) == 0


def test_event_types_and_properties_are_checked_against_the_catalog(
    client: TestClient, app: App
) -> None:
    client.post("/v1/customers", json=ANN, headers=AUTH)
    wrong_type = client.post(
        "/v1/events", json={**ORDER, "properties": {"amount_cents": "49.99"}}, headers=AUTH
    )
    assert wrong_type.status_code == 422
    assert locs(wrong_type) == {
        ("body", "properties", "amount_cents"): "expected money, got '49.99'"
    }
    unknown = client.post("/v1/events", json={**ORDER, "type": "order_shipped"}, headers=AUTH)
    assert "unknown event type 'order_shipped'" in locs(unknown)[("body", "type")]
    misspelt = client.post("/v1/events", json={**ORDER, "type": "signup"}, headers=AUTH)
    assert locs(misspelt)[("body", "type")] == (
        "unknown event type 'signup' (did you mean 'signed_up'?); declare it in rules/catalog.yaml"
    )
    naive = client.post("/v1/events", json={**ORDER, "occurred_at": "yesterday"}, headers=AUTH)
    assert ("body", "occurred_at") in locs(naive)
    assert count(app, Event) == 0
    row = customer(app, "c1")
    assert row is not None and row.orders_count == 0


def test_concurrent_deliveries_of_one_event_record_it_once(app: App) -> None:
    """Eight clients post one new event id at once over real HTTP, four with one payload and
    four with another: one is accepted; those with its payload answer duplicate (also the
    ones that lose the insert race) and the others conflict; never a 500."""
    payloads = [ORDER, {**ORDER, "properties": {"amount_cents": 1}}]
    with serve(create_app(app)) as base, httpx.Client(base_url=base, headers=AUTH) as http:
        assert http.post("/v1/customers", json=ANN).status_code == 201
        barrier = threading.Barrier(8)

        def post(n: int) -> tuple[int, int]:
            with httpx.Client(base_url=base, headers=AUTH, timeout=30) as own:
                barrier.wait()
                return n % 2, own.post("/v1/events", json=payloads[n % 2]).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(post, range(8)))
    (winner,) = [sent for sent, status in results if status == 201]
    assert sorted(results) == sorted(
        [(winner, 201)] + [(winner, 200)] * 3 + [(1 - winner, 409)] * 4
    )
    row = customer(app, "c1")
    assert row is not None and row.orders_count == 1 and count(app, Event) == 1
    assert row.total_spend_cents == payloads[winner]["properties"]["amount_cents"]  # type: ignore[index]


# ── staff passwords ─────────────────────────────────────────────────────────────────


def test_password_hashes_verify_and_parse() -> None:
    encoded = hash_password("s3cret", iterations=1_000, salt="abc")
    assert encoded.startswith("pbkdf2_sha256$1000$abc$")
    assert verify_password("s3cret", encoded) and not verify_password("s3cret!", encoded)
    assert not verify_password("s3cret", "md5$1$abc$AAAA")
    accounts = parse_staff_passwords(f" Ana Lopes:{encoded} ,Tom:{encoded}")
    assert accounts == {"Ana Lopes": encoded, "Tom": encoded}
    directory = StaffDirectory(accounts, "key")
    assert directory.authenticate("Ana Lopes", "s3cret") == "Ana Lopes"
    assert directory.authenticate("Ana Lopes", "nope") is None
    assert directory.authenticate("Nobody", "s3cret") is None
    with pytest.raises(ConfigurationError, match=r"entry 2 \(Tom\) is not a pbkdf2_sha256"):
        parse_staff_passwords(f"Ana:{encoded},Tom:plaintext")
    with pytest.raises(ConfigurationError, match="'Ana' is listed twice"):
        parse_staff_passwords(f"Ana:{encoded},Ana:{encoded}")


# ── the console over HTTP ───────────────────────────────────────────────────────────


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def sign_in(client: TestClient, password: str = PASSWORD) -> httpx.Response:
    form = client.get("/console/login")
    return client.post(
        "/console/login",
        data={
            "csrf_token": csrf_of(form.text),
            "name": STAFF,
            "password": password,
            "next": "/console",
        },
        follow_redirects=False,
    )


@pytest.fixture
def case_id(app: App, now: datetime) -> int:
    with Session(app.db, expire_on_commit=False) as session:
        session.add(
            Customer(
                id="c1",
                email="ann@example.com",
                signed_up_at=now - timedelta(days=40),
                email_opt_in=True,
                changed_at=now,
                created_at=now,
                updated_at=now,
            )
        )
        session.flush()
        case, _ = escalations.open_or_join(
            session,
            customer_id="c1",
            reason="parcel arrived broken",
            trigger_event_id=None,
            priority="high",
            queue="complaints",
            sla_due_at=now - timedelta(hours=1),
            now=now - timedelta(hours=5),
        )
        session.commit()
        assert case.id is not None
        return case.id


def test_console_pages_need_sign_in(client: TestClient, case_id: int) -> None:
    for path in (
        "/console",
        f"/console/cases/{case_id}",
        "/console/customers/c1",
        "/console/playbooks",
    ):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/console/login")
    assert client.get(f"/console/cases/{case_id}", follow_redirects=False).headers["location"] == (
        f"/console/login?next=/console/cases/{case_id}"
    )


def test_a_console_post_without_sign_in_is_403_and_changes_nothing(
    client: TestClient, app: App, case_id: int
) -> None:
    response = client.post(
        f"/console/cases/{case_id}/resolve", data={"note": "done", "csrf_token": "x"}
    )
    assert response.status_code == 403
    with Session(app.db) as session:
        assert escalations.get_case(session, case_id).status == EscalationStatus.OPEN


def test_sign_in_with_a_wrong_password_is_refused(client: TestClient) -> None:
    response = sign_in(client, "wrong")
    assert response.status_code == 401 and "Wrong name or password" in response.text
    assert client.get("/console", follow_redirects=False).status_code == 303


def test_sign_in_sets_a_hardened_cookie_and_forms_need_the_csrf_token(
    client: TestClient, app: App, case_id: int
) -> None:
    response = sign_in(client)
    assert response.status_code == 303 and response.headers["location"] == "/console"
    cookie = next(
        c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)
    )
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie
    queue = client.get("/console")
    assert queue.status_code == 200
    assert queue.headers["content-security-policy"].startswith("default-src 'none'")
    assert re.search(r'<tr class="case-row overdue"[^>]*>.*?overdue', queue.text, re.S)
    forged = client.post(f"/console/cases/{case_id}/acknowledge", data={"csrf_token": "guess"})
    assert forged.status_code == 403
    with Session(app.db) as session:
        assert escalations.get_case(session, case_id).status == EscalationStatus.OPEN
    token = csrf_of(client.get(f"/console/cases/{case_id}").text)
    done = client.post(f"/console/cases/{case_id}/acknowledge", data={"csrf_token": token})
    assert done.status_code == 200 and "Acknowledged." in done.text
    with Session(app.db) as session:
        case = escalations.get_case(session, case_id)
        assert (case.status, case.owner) == (EscalationStatus.ACKNOWLEDGED, STAFF)


def test_an_illegal_transition_is_a_flash_message_not_a_500(
    client: TestClient, case_id: int
) -> None:
    sign_in(client)
    token = csrf_of(client.get(f"/console/cases/{case_id}").text)
    no_note = client.post(
        f"/console/cases/{case_id}/resolve", data={"csrf_token": token, "note": " "}
    )
    assert no_note.status_code == 200 and "Write a note to resolve the case" in no_note.text
    reopen = client.post(f"/console/cases/{case_id}/reopen", data={"csrf_token": token})
    assert reopen.status_code == 200
    assert f"cannot reopen case {case_id}: it is open" in reopen.text
    stranger = client.post(
        f"/console/cases/{case_id}/assign", data={"csrf_token": token, "owner": "Mallory"}
    )
    assert "unknown support lead &#39;Mallory&#39;" in stranger.text
    assigned = client.post(
        f"/console/cases/{case_id}/assign", data={"csrf_token": token, "owner": "Ana Lopes"}
    )
    assert "Assigned to Ana Lopes." in assigned.text
    assert client.get("/console/cases/999").status_code == 404


def test_the_customer_page_explains_what_was_sent_and_why(
    client: TestClient, app: App, case_id: int, now: datetime
) -> None:
    with Session(app.db) as session:
        session.add(
            Message(
                id="m1",
                dedupe_key="enrollment:1:welcome",
                customer_id="c1",
                playbook="welcome_series",
                step_id="welcome",
                channel="email",
                template="welcome",
                to_address="ann@example.com",
                status=MessageStatus.DELIVERED,
                due_at=now,
                created_at=now,
                updated_at=now,
                sent_at=now,
            )
        )
        session.add(
            Decision(
                at=now,
                customer_id="c1",
                playbook="welcome_series",
                step_id="welcome",
                outcome="queued",
                reason="entered on signed_up",
                message_id="m1",
            )
        )
        session.add(
            Decision(
                at=now,
                customer_id="c1",
                playbook="re_engagement",
                step_id="nudge",
                outcome="skipped",
                reason="no SMS consent (never opted in, or sent STOP)",
            )
        )
        session.commit()
    sign_in(client)
    page = client.get("/console/customers/c1")
    assert page.status_code == 200
    text = page.text
    assert "delivered" in text and "entered on signed_up" in text and "no SMS consent" in text
    assert 'id="consent-email" class="yes"' in text
    assert client.get("/console/customers/nobody").status_code == 404


def test_the_playbook_page_counts_and_charts(
    client: TestClient, app: App, case_id: int, now: datetime
) -> None:
    with Session(app.db) as session:
        enrollments = []
        for i, (status, days_ago) in enumerate(
            [("converted", 1), ("active", 2), ("completed", 40)]
        ):
            enrollment = Enrollment(
                customer_id="c1",
                playbook="welcome_series",
                status=EnrollmentStatus(status),
                rules_version="v",
                entered_at=now - timedelta(days=days_ago),
                entry_number=i + 1,
                active_key=f"c1|welcome_series|{i}" if status == "active" else None,
                converted_at=now if status == "converted" else None,
            )
            session.add(enrollment)
            enrollments.append(enrollment)
        session.flush()
        # Two messages of the first journey today, one of the second three days ago, one
        # of the third 45 days ago: the span with data is the last 46 days.
        for i, (journey, days_ago) in enumerate([(0, 0), (0, 0), (1, 3), (2, 45)]):
            session.add(
                Message(
                    id=f"m{i}",
                    dedupe_key=f"k{i}",
                    customer_id="c1",
                    playbook="welcome_series",
                    enrollment_id=enrollments[journey].id,
                    channel="email",
                    template="welcome",
                    to_address="ann@example.com",
                    status=MessageStatus.SENT,
                    due_at=now,
                    created_at=now,
                    updated_at=now,
                    sent_at=now - timedelta(days=days_ago),
                )
            )
        for reason in (
            "condition false: orders_count >= 1",
            "condition false: vip",
            "no email marketing consent",
        ):
            session.add(
                Decision(
                    at=now,
                    customer_id="c1",
                    playbook="welcome_series",
                    outcome="skipped",
                    reason=reason,
                )
            )
        session.commit()
    sign_in(client)
    page = client.get("/console/playbooks/welcome_series")
    assert page.status_code == 200
    text = page.text
    assert re.search(r'id="count-enrolled">3<', text) and re.search(r'id="count-sent">4<', text)
    assert re.search(r'id="count-converted">1<', text)
    assert re.search(r"<td>condition false</td><td class=\"num\">2</td>", text)
    assert f'data-day="{now.date().isoformat()}" data-count="2"' in text
    three_days_ago = (now - timedelta(days=3)).date().isoformat()
    assert f'data-day="{three_days_ago}" data-count="1"' in text
    # By default the period is the span with data, first send to last.
    assert text.count("data-day=") == 46
    first = (now - timedelta(days=45)).date().isoformat()
    assert f'name="since" value="{first}"' in text
    assert f'name="until" value="{now.date().isoformat()}"' in text
    # One arm ("all": no split, no holdout), 1 of 3 converted, no uplift to show.
    assert re.search(r'<tr data-arm="all">\s*<th scope="row">all</th>', text)
    assert "33.3%" in text and "no holdout to compare with" in text
    assert "playbook: welcome_series" in text  # the rule file itself

    week = client.get(
        "/console/playbooks/welcome_series",
        params={
            "since": (now - timedelta(days=6)).date().isoformat(),
            "until": now.date().isoformat(),
        },
    )
    assert week.status_code == 200
    assert week.text.count("data-day=") == 7
    assert re.search(r'id="count-enrolled">2<', week.text)
    assert re.search(r'id="count-sent">3<', week.text)

    for params, message in (
        ({"since": "March"}, "since must be a date like 2026-03-01, not &#39;March&#39;"),
        (
            {"since": "2026-03-09", "until": "2026-03-01"},
            "since (2026-03-09) is after until (2026-03-01)",
        ),
        ({"since": "2024-01-01", "until": "2026-01-01"}, "show at most 366 at a time"),
    ):
        refused = client.get("/console/playbooks/welcome_series", params=params)
        assert refused.status_code == 400 and message in refused.text, params

    listing = client.get("/console/playbooks")
    assert listing.status_code == 200 and "/console/playbooks/complaint_escalation" in listing.text
    assert client.get("/console/playbooks/nope").status_code == 404


def test_the_messages_page_lists_ambiguous_messages_with_what_is_needed_to_decide(
    client: TestClient, app: App, case_id: int, now: datetime
) -> None:
    attempted = now - timedelta(hours=2)
    with Session(app.db) as session:
        session.add(
            Message(
                id="0a1b2c3d-ambiguous-message",
                dedupe_key="k-ambiguous",
                customer_id="c1",
                playbook="welcome_series",
                step_id="welcome",
                channel="email",
                template="welcome",
                to_address="ann@example.com",
                status=MessageStatus.AMBIGUOUS,
                attempted_at=attempted,
                last_error="settlement: sendgrid has not reported it",
                due_at=now,
                created_at=now,
                updated_at=now,
            )
        )
        session.commit()
    sign_in(client)
    page = client.get("/console/messages")
    assert page.status_code == 200
    row = page.text[page.text.index('id="message-0a1b2c3d-ambiguous-message"') :]
    row = row[: row.index("</tr>")]
    for shown in (
        '<code title="0a1b2c3d-ambiguous-message">0a1b2c3d</code>',
        "welcome_series · welcome",
        "ann@example.com",
        "ambiguous",
        f"<td>{attempted:%Y-%m-%d %H:%M} UTC</td>",  # when its provider call was made
        "settlement: sendgrid has not reported it",
    ):
        assert shown in row
    assert "lifecycle messages retry --status ambiguous --older-than 1h" in page.text
    assert client.get("/console/messages?status=sent").text.count('id="message-') == 0
    assert client.get("/console/messages?status=nonsense").status_code == 400


def test_the_lifecycle_page_without_a_stage_model_or_data_says_so(client: TestClient) -> None:
    assert sign_in(client).status_code == 303
    page = client.get("/console/lifecycle")
    assert page.status_code == 200
    assert "There is no stage model (rules/stages.yaml)" in page.text
    assert "no sign-ups in this period" in page.text
    assert "no NPS answers in this period" in page.text
    assert "No stage changed in this period." in page.text
    for params, message in (
        ({"since": "March"}, "since must be a date like 2026-03-01, not &#39;March&#39;"),
        ({"since": "2024-01-01", "until": "2026-01-01"}, "show at most 366 at a time"),
        # the day after until is the period's end: 9999-12-31 has none (was a 500)
        ({"since": "9999-12-01", "until": "9999-12-31"}, "until must be before 9999-12-31"),
    ):
        refused = client.get("/console/lifecycle", params=params)
        assert refused.status_code == 400 and message in refused.text, params

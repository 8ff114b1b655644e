"""The Segment-compatible API over HTTP, on SQLite and PostgreSQL: identify, track and
batch in Segment's shapes, HTTP Basic with the write key, gzip, per-call results, and
Segment's own Python SDK sending to a real server unchanged."""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from segment.analytics import Client as SegmentClient
from sqlalchemy import func, select
from sqlmodel import Session

from engine.bootstrap import App
from engine.data.models import Customer, Event
from engine.data.segment import snake_case
from engine.web.app import create_app
from tests.support.server import serve, web_app

WRITE_KEY = "segment-write-key-0123456789"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
BEARER = {"Authorization": f"Bearer {WRITE_KEY}"}
EVENT_TYPES = {"Order Completed": "order_placed", "NPS Answered": "nps_submitted"}


def make_app(db_url: str, tmp_path: Path, now: datetime, **settings: Any) -> App:
    return web_app(
        db_url,
        tmp_path,
        now,
        api_key=WRITE_KEY,
        segment_event_types=EVENT_TYPES,
        default_phone_region="GB",
        **settings,
    )


@pytest.fixture
def app(db_url: str, tmp_path: Path, now: datetime) -> Iterator[App]:
    application = make_app(db_url, tmp_path, now)
    yield application
    application.db.dispose()


@pytest.fixture
def client(app: App) -> Iterator[TestClient]:
    with TestClient(create_app(app)) as test_client:
        yield test_client


def customer(app: App, customer_id: str) -> Customer | None:
    with Session(app.db) as session:
        return session.get(Customer, customer_id)


def events(app: App) -> list[Event]:
    with Session(app.db) as session:
        return list(session.scalars(select(Event).order_by(Event.id)))


def count(app: App, model: Any) -> int:
    with Session(app.db) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


IDENTIFY = {
    "type": "identify",
    "userId": "u1",
    "messageId": "msg-identify-1",
    "timestamp": "2026-03-01T09:00:00.000Z",
    "traits": {
        "email": "Ann.Lee@Example.com",
        "phone": "07700 900123",
        "firstName": "Ann",
        "lastName": "Lee",
        "plan": "plus",
        "marketingSegment": "loyal",
        "createdAt": "2026-01-05T10:00:00+00:00",
        "emailOptIn": True,
    },
    "context": {"timezone": "Europe/London", "locale": "en_GB", "library": {"name": "x"}},
}
TRACK = {
    "type": "track",
    "userId": "u1",
    "event": "Order Completed",
    "messageId": "msg-order-1",
    "timestamp": "2026-03-01T10:00:00+01:00",
    "properties": {"amountCents": 4999, "currency": "GBP"},
}


def test_identify_maps_traits_to_the_customer_and_declared_attributes(
    client: TestClient, app: App
) -> None:
    response = client.post("/v1/identify", json=IDENTIFY, headers=BASIC)
    assert response.status_code == 201
    assert response.json() == {
        "index": 0,
        "type": "identify",
        "messageId": "msg-identify-1",
        "userId": "u1",
        "status": "created",
        "errors": [],
        "warnings": [
            "traits not declared as attributes in rules/catalog.yaml, not stored: lastName"
        ],
    }
    ann = customer(app, "u1")
    assert ann is not None
    assert (ann.email, ann.phone, ann.first_name) == ("ann.lee@example.com", "+447700900123", "Ann")
    assert (ann.timezone, ann.locale) == ("Europe/London", "en-GB")  # from the context
    assert ann.attributes == {"plan": "plus", "marketing_segment": "loyal"}
    assert ann.signed_up_at == datetime(2026, 1, 5, 10, tzinfo=UTC)
    assert ann.email_opt_in and not ann.sms_opt_in
    again = client.post("/v1/identify", json=IDENTIFY, headers=BEARER)
    assert again.status_code == 200 and again.json()["status"] == "unchanged"


def test_a_bad_trait_is_refused_at_its_place_and_a_bad_context_value_only_warned(
    client: TestClient, app: App
) -> None:
    bad = {**IDENTIFY, "traits": {"email": "ann@", "plan": 3}}
    response = client.post("/v1/identify", json=bad, headers=BASIC)
    assert response.status_code == 422 and response.json()["status"] == "rejected"
    errors = {tuple(e["loc"]): e["msg"] for e in response.json()["errors"]}
    assert set(errors) == {("body", "traits", "email")}
    assert "is not an email address" in errors[("body", "traits", "email")]
    typed = client.post("/v1/identify", json={**bad, "traits": {"plan": 3}}, headers=BASIC)
    assert typed.json()["errors"] == [
        {"loc": ["body", "traits", "plan"], "msg": "expected string, got 3", "type": "catalog"}
    ]
    assert customer(app, "u1") is None
    odd_device = {"userId": "u2", "context": {"timezone": "Mars/Base", "locale": "klingon"}}
    response = client.post("/v1/identify", json=odd_device, headers=BASIC)
    assert response.status_code == 201
    assert response.json()["warnings"] == [
        "context.timezone 'Mars/Base' is not usable, not stored",
        "context.locale 'klingon' is not usable, not stored",
    ]
    stored = customer(app, "u2")
    assert stored is not None and (stored.timezone, stored.locale) == ("UTC", "en-GB")


def test_track_maps_the_event_name_and_message_id_is_the_idempotency_key(
    client: TestClient, app: App
) -> None:
    client.post("/v1/identify", json=IDENTIFY, headers=BASIC)
    response = client.post("/v1/track", json=TRACK, headers=BASIC)
    assert response.status_code == 201 and response.json()["status"] == "accepted"
    [order] = events(app)
    assert (order.id, order.customer_id, order.type) == ("msg-order-1", "u1", "order_placed")
    assert order.occurred_at == datetime(2026, 3, 1, 9, tzinfo=UTC)
    assert order.properties == {"amount_cents": 4999, "currency": "GBP"}
    ann = customer(app, "u1")
    assert ann is not None and (ann.orders_count, ann.total_spend_cents) == (1, 4999)
    # A retried delivery: a duplicate, nothing changes.
    duplicate = client.post("/v1/track", json=TRACK, headers=BASIC)
    assert duplicate.status_code == 200 and duplicate.json()["status"] == "duplicate"
    # The same messageId with other properties: a conflict, nothing changes.
    changed = {**TRACK, "properties": {"amountCents": 100, "currency": "GBP"}}
    conflict = client.post("/v1/track", json=changed, headers=BASIC)
    assert conflict.status_code == 409 and conflict.json()["status"] == "conflict"
    [error] = conflict.json()["errors"]
    assert error["loc"] == ["body", "properties", "amount_cents"]
    assert error["msg"].startswith("event 'msg-order-1' was recorded before with a different")
    ann = customer(app, "u1")
    assert ann is not None and ann.total_spend_cents == 4999
    # Not in the table: snake_case of the name.
    visit = {**TRACK, "event": "Site Visit", "messageId": "msg-visit", "properties": {}}
    assert client.post("/v1/track", json=visit, headers=BASIC).status_code == 201
    assert [e.type for e in events(app)] == ["order_placed", "site_visit"]


def test_an_undeclared_event_or_an_anonymous_call_is_ignored_with_the_reason(
    client: TestClient, app: App
) -> None:
    client.post("/v1/identify", json=IDENTIFY, headers=BASIC)
    viewed = {**TRACK, "event": "Product Viewed", "messageId": "msg-viewed"}
    response = client.post("/v1/track", json=viewed, headers=BASIC)
    assert response.status_code == 200 and response.json()["status"] == "ignored"
    assert response.json()["warnings"] == [
        "event type 'product_viewed' (Segment event 'Product Viewed') is not declared in "
        "rules/catalog.yaml: declare it, or map the name to a declared type with "
        "LIFECYCLE_SEGMENT_EVENT_TYPES"
    ]
    anonymous = {**TRACK, "userId": None, "anonymousId": "a-1", "messageId": "msg-anon"}
    response = client.post("/v1/track", json=anonymous, headers=BASIC)
    assert response.json()["status"] == "ignored"
    assert "Lifecycle knows customers by userId" in response.json()["warnings"][0]
    assert events(app) == []


def test_a_track_for_an_unknown_user_is_refused_unless_configured_to_create_them(
    db_url: str, tmp_path: Path, now: datetime
) -> None:
    strict = make_app(db_url, tmp_path, now)
    try:
        with TestClient(create_app(strict)) as client:
            response = client.post("/v1/track", json=TRACK, headers=BASIC)
        assert response.status_code == 422
        assert response.json()["errors"] == [
            {
                "loc": ["body", "userId"],
                "msg": "no customer with id 'u1': identify them first, or set "
                "LIFECYCLE_CREATE_UNKNOWN_CUSTOMERS=true",
                "type": "not_found",
            }
        ]
        assert count(strict, Customer) == 0 and count(strict, Event) == 0
    finally:
        strict.db.dispose()
    lenient = make_app(db_url, tmp_path, now, create_unknown_customers=True)
    try:
        with TestClient(create_app(lenient)) as client:
            assert client.post("/v1/track", json=TRACK, headers=BASIC).status_code == 201
            native = {
                "id": "e-native",
                "customer_id": "u9",
                "type": "site_visit",
                "occurred_at": "2026-03-01T08:00:00Z",
            }
            assert client.post("/v1/events", json=native, headers=BEARER).status_code == 201
        created = customer(lenient, "u1")
        assert created is not None and created.signed_up_at == datetime(2026, 3, 1, 9, tzinfo=UTC)
        assert created.orders_count == 1 and created.email is None and not created.email_opt_in
        assert customer(lenient, "u9") is not None
    finally:
        lenient.db.dispose()


def test_a_batch_reports_each_call_and_keeps_the_good_ones(client: TestClient, app: App) -> None:
    body = {
        "batch": [
            {"type": "identify", "userId": "u2", "traits": {"email": "bo@example.com"}},
            {"type": "track", "userId": "u2", "event": "Signed Up", "messageId": "m-1"},
            {"type": "page", "userId": "u2", "name": "Home"},
            {
                "type": "track",
                "userId": "u2",
                "event": "NPS Answered",
                "messageId": "m-2",
                "properties": {"score": "nine"},
            },
            {"type": "track", "userId": "u2", "event": "Signed Up", "messageId": "m-1"},
            {"type": "alias", "userId": "u2", "previousId": "a-1"},
            {
                "type": "track",
                "userId": "u2",
                "event": "Site Visit",
                "timestamp": "2026-03-01T10:00:00",
            },
            "not a call",
            {"type": "screem", "userId": "u2"},
        ],
        "context": {"timezone": "Europe/Paris"},
        "writeKey": WRITE_KEY,
        "sentAt": "2026-03-02T12:00:00Z",
    }
    response = client.post("/v1/batch", json=body, headers=BASIC)
    assert response.status_code == 200
    answer = response.json()
    assert answer["success"] is False
    assert [(r["index"], r["status"]) for r in answer["results"]] == [
        (0, "created"),
        (1, "accepted"),
        (2, "ignored"),
        (3, "rejected"),
        (4, "duplicate"),
        (5, "ignored"),
        (6, "rejected"),
        (7, "rejected"),
        (8, "rejected"),
    ]
    errors = {r["index"]: r["errors"] for r in answer["results"]}
    assert errors[3] == [
        {
            "loc": ["body", "batch", 3, "properties", "score"],
            "msg": "expected int, got 'nine'",
            "type": "catalog",
        }
    ]
    assert errors[6][0]["loc"] == ["body", "batch", 6, "messageId"]
    assert errors[7][0]["msg"] == "a call is a JSON object"
    assert errors[8][0]["msg"].startswith("unknown call type 'screem'; Segment's are identify")
    bo = customer(app, "u2")
    assert bo is not None and bo.timezone == "Europe/Paris"  # the batch's context
    assert [(e.id, e.type) for e in events(app)] == [("m-1", "signed_up")]
    # The same batch again changes nothing.
    again = client.post("/v1/batch", json=body, headers=BASIC).json()["results"]
    assert [r["status"] for r in again][:2] == ["unchanged", "duplicate"]
    assert count(app, Event) == 1


def test_gzip_bodies_are_read_and_a_bomb_is_refused_unread(client: TestClient, app: App) -> None:
    compressed = gzip.compress(json.dumps({"batch": [IDENTIFY]}).encode())
    headers = {**BASIC, "Content-Encoding": "gzip", "Content-Type": "application/json"}
    response = client.post("/v1/batch", content=compressed, headers=headers)
    assert response.status_code == 200 and response.json()["results"][0]["status"] == "created"
    broken = client.post("/v1/batch", content=b"not gzip", headers=headers)
    assert broken.status_code == 400
    assert broken.json()["detail"][0]["msg"].startswith("the body is not gzip")
    bomb = gzip.compress(b'{"batch": [' + b" " * (app.settings.max_body_bytes + 10) + b"]}")
    response = client.post("/v1/batch", content=bomb, headers=headers)
    assert response.status_code == 413
    assert response.json()["detail"][0]["msg"] == (
        f"the decompressed body is larger than {app.settings.max_body_bytes:,} bytes"
    )
    not_json = client.post("/v1/track", content=b"{oops", headers=BASIC)
    assert not_json.status_code == 400 and not_json.json()["detail"][0]["type"] == "json_invalid"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic " + base64.b64encode(b"wrong-key:").decode()},
        {"Authorization": "Basic not-base64!"},
        {"Authorization": "Basic " + base64.b64encode(b":" + WRITE_KEY.encode()).decode()},
    ],
    ids=["missing", "wrong-key", "not-base64", "key-as-password"],
)
def test_without_the_write_key_nothing_is_read_or_written(
    client: TestClient, app: App, headers: dict[str, str]
) -> None:
    for path, body in (("/v1/identify", IDENTIFY), ("/v1/batch", {"batch": [IDENTIFY]})):
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 401 and "API key" in response.json()["detail"]
    assert count(app, Customer) == 0


def test_segments_own_sdk_sends_to_lifecycle_unchanged(app: App) -> None:
    """segment-analytics-python, pointed at a real server: Basic auth, its batch envelope,
    its timestamps and message ids; and with gzip on."""
    errors: list[Any] = []
    with serve(create_app(app)) as base_url:
        for compress in (False, True):
            user = f"sdk-{compress}"
            sdk = SegmentClient(
                WRITE_KEY,
                host=base_url,
                sync_mode=True,
                gzip=compress,
                on_error=lambda error, batch: errors.append(error),
            )
            sdk.identify(user, {"email": f"{user}@example.com", "plan": "pro"})
            sdk.track(user, "Order Completed", {"amountCents": 1250}, message_id=f"order-{user}")
            sdk.track(user, "Order Completed", {"amountCents": 1250}, message_id=f"order-{user}")
            assert errors == []
            stored = customer(app, user)
            assert stored is not None and stored.attributes == {"plan": "pro"}
            assert stored.orders_count == 1 and stored.total_spend_cents == 1250


@pytest.mark.parametrize(
    ("name", "snake"),
    [
        ("Order Completed", "order_completed"),
        ("orderCompleted", "order_completed"),
        ("order-completed", "order_completed"),
        ("  Signed Up! ", "signed_up"),
        ("NPS2Answered", "nps2_answered"),
    ],
)
def test_event_names_become_snake_case(name: str, snake: str) -> None:
    assert snake_case(name) == snake

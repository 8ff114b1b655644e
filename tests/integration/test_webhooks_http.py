"""Provider webhooks and the unsubscribe link over HTTP, on SQLite and PostgreSQL.

Requests are signed the way SendGrid and Twilio sign them (tests.support.fake_provider);
a forged one must change nothing, and a redelivered one must have the effect of one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlmodel import Session
from twilio.request_validator import RequestValidator

from channels.webhooks import SENDGRID_SIGNATURE_HEADER, SENDGRID_TIMESTAMP_HEADER
from engine.bootstrap import App
from engine.data.models import (
    Customer,
    Decision,
    Message,
    MessageStatus,
    Suppression,
    WebhookReceipt,
)
from engine.delivery.dispatch import read_unsubscribe_token, unsubscribe_token
from engine.runners.ticks import dispatch_config
from engine.web.app import create_app
from tests.support.fake_provider import (
    generate_sendgrid_keypair,
    sendgrid_webhook_keypair,
    sign_sendgrid_event,
)
from tests.support.server import web_app

BASE_URL = "https://hooks.lifecycle.example"
TWILIO_TOKEN = "twilio-auth-token-for-tests"
ANN_EMAIL, ANN_PHONE = "ann@example.com", "+447700900123"


@pytest.fixture
def app(db_url: str, tmp_path: Path, now: datetime) -> Iterator[App]:
    application = web_app(
        db_url,
        tmp_path,
        now,
        public_base_url=BASE_URL,
        sendgrid_webhook_public_key=sendgrid_webhook_keypair().public_key,
        twilio_auth_token=TWILIO_TOKEN,
    )
    with Session(application.db) as session:
        session.add(
            Customer(
                id="c1",
                email=ANN_EMAIL,
                phone=ANN_PHONE,
                email_opt_in=True,
                email_opt_in_at=now,
                sms_opt_in=True,
                sms_opt_in_at=now,
                signed_up_at=now - timedelta(days=10),
                changed_at=now,
                created_at=now,
                updated_at=now,
            )
        )
        for message_id, channel, status, provider_id, to in (
            ("m-sent", "email", MessageStatus.SENT, "XMSG1", ANN_EMAIL),
            ("m-ambiguous", "email", MessageStatus.AMBIGUOUS, None, ANN_EMAIL),
            ("m-batch", "email", MessageStatus.SENT, "XBATCH", ANN_EMAIL),
            ("m-batch-other", "email", MessageStatus.SENT, "XBATCH", "bob@example.com"),
            ("m-sms", "sms", MessageStatus.SENT, "SM0001", ANN_PHONE),
            ("m-sms-sending", "sms", MessageStatus.SENDING, None, ANN_PHONE),
            ("m-retry", "email", MessageStatus.QUEUED, None, ANN_EMAIL),
            ("m-by-hand", "email", MessageStatus.QUEUED, None, ANN_EMAIL),
        ):
            session.add(
                Message(
                    id=message_id,
                    dedupe_key=f"k-{message_id}",
                    customer_id="c1",
                    playbook="welcome_series",
                    step_id="welcome",
                    channel=channel,
                    template="welcome",
                    to_address=to,
                    status=status,
                    provider_id=provider_id,
                    due_at=now,
                    created_at=now,
                    updated_at=now,
                    sent_at=now if status == MessageStatus.SENT else None,
                    # queued again after a timeout (attempted), or by hand (attempts reset)
                    attempts=0 if message_id == "m-by-hand" else 1,
                )
            )
        session.commit()
    yield application
    application.db.dispose()


@pytest.fixture
def client(app: App) -> Iterator[TestClient]:
    with TestClient(create_app(app), base_url=BASE_URL) as test_client:
        yield test_client


def status_of(app: App, message_id: str) -> MessageStatus:
    with Session(app.db) as session:
        message = session.get(Message, message_id)
        assert message is not None
        return message.status


def rows(app: App, model: Any, *where: Any) -> list[Any]:
    with Session(app.db) as session:
        return list(session.scalars(select(model).where(*where)))


def ann(app: App) -> Customer:
    with Session(app.db) as session:
        customer = session.get(Customer, "c1")
        assert customer is not None
        return customer


# ── SendGrid ────────────────────────────────────────────────────────────────────────


def sg_event(kind: str, n: int, **fields: Any) -> dict[str, Any]:
    return {
        "event": kind,
        "email": ANN_EMAIL,
        "timestamp": 1_772_000_000,
        "sg_event_id": f"ev-{kind}-{n}",
        **fields,
    }


def post_sendgrid(
    client: TestClient,
    now: datetime,
    events: list[dict[str, Any]],
    private_key: Any = None,
    timestamp: int | None = None,
) -> httpx.Response:
    body = json.dumps(events).encode()
    stamp = str(timestamp if timestamp is not None else int(now.timestamp()))
    key = private_key or sendgrid_webhook_keypair().private_key
    headers = {
        SENDGRID_SIGNATURE_HEADER: sign_sendgrid_event(key, body, stamp),
        SENDGRID_TIMESTAMP_HEADER: stamp,
        "Content-Type": "application/json",
    }
    return client.post("/webhooks/sendgrid", content=body, headers=headers)


def test_signed_sendgrid_events_update_the_messages(
    client: TestClient, app: App, now: datetime
) -> None:
    response = post_sendgrid(
        client,
        now,
        [
            sg_event(
                "delivered", 1, lifecycle_message_id="m-sent", sg_message_id="XMSG1.filter0001.1"
            ),
            sg_event("processed", 2, lifecycle_message_id="m-ambiguous"),
            sg_event(
                "delivered", 3, sg_message_id="XBATCH.filter0002.7"
            ),  # found by id prefix + address
            sg_event("open", 4, lifecycle_message_id="m-sent"),
            sg_event("click", 5, lifecycle_message_id="m-sent", url="https://shop.example/offer"),
        ],
    )
    assert response.status_code == 200 and response.json() == {"processed": 5, "duplicates": 0}
    assert status_of(app, "m-sent") == MessageStatus.DELIVERED
    assert status_of(app, "m-ambiguous") == MessageStatus.SENT  # settled, not resent
    assert status_of(app, "m-batch") == MessageStatus.DELIVERED
    assert status_of(app, "m-batch-other") == MessageStatus.SENT
    decisions = {(d.outcome, d.message_id, d.reason) for d in rows(app, Decision)}
    assert decisions == {
        ("sent", "m-ambiguous", "settled by sendgrid's webhook: the provider has it"),
        ("opened", "m-sent", "sendgrid open"),
        ("clicked", "m-sent", "sendgrid click: https://shop.example/offer"),
    }
    assert rows(app, Suppression) == [] and ann(app).email_opt_in


@pytest.mark.parametrize(
    ("kind", "status", "note"),
    [
        ("processed", MessageStatus.SENT, None),
        ("deferred", MessageStatus.SENT, "sendgrid deferred: 421 try later"),
        ("delivered", MessageStatus.DELIVERED, None),
        ("bounce", MessageStatus.BOUNCED, "sendgrid bounce: 421 try later"),
        ("dropped", MessageStatus.FAILED, "sendgrid dropped: 421 try later"),
    ],
)
def test_sendgrid_events_settle_an_ambiguous_message(
    client: TestClient,
    app: App,
    now: datetime,
    kind: str,
    status: MessageStatus,
    note: str | None,
) -> None:
    event = sg_event(
        kind,
        1,
        lifecycle_message_id="m-ambiguous",
        sg_message_id="XAMB.filter0001.1",
        reason="421 try later",
    )
    assert post_sendgrid(client, now, [event]).status_code == 200
    with Session(app.db) as session:
        settled = session.get(Message, "m-ambiguous")
        assert settled is not None
        assert (settled.status, settled.last_error) == (status, note)
        # SendGrid's id is kept, so its later events without our custom arg find it too.
        assert (settled.provider, settled.provider_id, settled.sent_at) == ("sendgrid", "XAMB", now)
    assert [(d.outcome, d.message_id) for d in rows(app, Decision)] == [("sent", "m-ambiguous")]


def test_sendgrid_events_out_of_order_never_move_a_message_back(
    client: TestClient, app: App, now: datetime
) -> None:
    def send(*events: dict[str, Any]) -> None:
        assert post_sendgrid(client, now, list(events)).status_code == 200

    send(sg_event("delivered", 1, lifecycle_message_id="m-sent"))
    send(sg_event("processed", 2, lifecycle_message_id="m-sent"))
    send(sg_event("deferred", 3, lifecycle_message_id="m-sent", reason="421"))
    assert status_of(app, "m-sent") == MessageStatus.DELIVERED
    send(sg_event("bounce", 4, lifecycle_message_id="m-sent", type="blocked", reason="550"))
    send(sg_event("delivered", 5, lifecycle_message_id="m-sent"))
    send(sg_event("processed", 6, lifecycle_message_id="m-sent"))
    assert status_of(app, "m-sent") == MessageStatus.BOUNCED
    send(sg_event("dropped", 7, lifecycle_message_id="m-batch", reason="Invalid"))
    send(sg_event("delivered", 8, lifecycle_message_id="m-batch"))
    assert status_of(app, "m-batch") == MessageStatus.FAILED


def test_an_event_for_a_message_queued_again_after_a_timeout_settles_it_as_sent(
    client: TestClient, app: App, now: datetime
) -> None:
    """SendGrid had the request whose answer timed out: the retry would send it twice."""
    events = [
        sg_event("processed", 1, lifecycle_message_id="m-retry"),
        sg_event("processed", 2, lifecycle_message_id="m-by-hand"),
    ]
    assert post_sendgrid(client, now, events).status_code == 200
    assert status_of(app, "m-retry") == MessageStatus.SENT
    # Queued by hand (its attempts reset): the person who asked decides, not a late event.
    assert status_of(app, "m-by-hand") == MessageStatus.QUEUED


def test_a_hard_bounce_suppresses_the_address_and_a_block_does_not(
    client: TestClient, app: App, now: datetime
) -> None:
    post_sendgrid(
        client,
        now,
        [
            sg_event(
                "bounce",
                1,
                lifecycle_message_id="m-batch",
                type="blocked",
                reason="550 blocked by policy",
            )
        ],
    )
    assert status_of(app, "m-batch") == MessageStatus.BOUNCED
    assert rows(app, Suppression) == []
    post_sendgrid(
        client,
        now,
        [
            sg_event(
                "bounce",
                2,
                lifecycle_message_id="m-sent",
                type="bounce",
                reason="550 5.1.1 no such user",
            )
        ],
    )
    assert status_of(app, "m-sent") == MessageStatus.BOUNCED
    [suppression] = rows(app, Suppression)
    assert (suppression.channel, suppression.address, suppression.source) == (
        "email",
        ANN_EMAIL,
        "sendgrid",
    )
    assert suppression.reason == "bounce: 550 5.1.1 no such user"


def test_a_spam_report_suppresses_and_withdraws_consent(
    client: TestClient, app: App, now: datetime
) -> None:
    post_sendgrid(client, now, [sg_event("spamreport", 1, lifecycle_message_id="m-sent")])
    [suppression] = rows(app, Suppression)
    assert suppression.reason == "spam report"
    customer = ann(app)
    assert not customer.email_opt_in and customer.email_opt_out_at == now
    assert [d.outcome for d in rows(app, Decision)] == ["unsubscribed"]


def test_a_drop_for_a_bounced_address_fails_and_suppresses(
    client: TestClient, app: App, now: datetime
) -> None:
    post_sendgrid(
        client,
        now,
        [sg_event("dropped", 1, lifecycle_message_id="m-sent", reason="Bounced Address")],
    )
    assert status_of(app, "m-sent") == MessageStatus.FAILED
    assert [s.reason for s in rows(app, Suppression)] == ["dropped: Bounced Address"]


def test_redelivered_sendgrid_events_have_one_effect(
    client: TestClient, app: App, now: datetime
) -> None:
    events = [sg_event("open", 1, lifecycle_message_id="m-sent"), sg_event("spamreport", 2)]
    first = post_sendgrid(client, now, events + events[:1])  # a duplicate inside the batch too
    assert first.json() == {"processed": 2, "duplicates": 1}
    again = post_sendgrid(client, now, events)
    assert again.json() == {"processed": 0, "duplicates": 2}
    assert sorted(d.outcome for d in rows(app, Decision)) == ["opened", "unsubscribed"]
    assert len(rows(app, Suppression)) == 1 and len(rows(app, WebhookReceipt)) == 2


@pytest.mark.parametrize("forgery", ["other-key", "tampered", "unsigned", "stale"])
def test_a_forged_sendgrid_request_is_403_and_changes_nothing(
    client: TestClient, app: App, now: datetime, forgery: str
) -> None:
    events = [sg_event("spamreport", 1, lifecycle_message_id="m-sent"), sg_event("bounce", 2)]
    body = json.dumps(events).encode()
    stamp = str(int(now.timestamp()))
    key = sendgrid_webhook_keypair().private_key
    if forgery == "other-key":
        response = post_sendgrid(
            client, now, events, private_key=generate_sendgrid_keypair().private_key
        )
    elif forgery == "stale":
        response = post_sendgrid(client, now, events, timestamp=int(now.timestamp()) - 3600)
    else:
        headers = {SENDGRID_TIMESTAMP_HEADER: stamp}
        if forgery == "tampered":
            headers[SENDGRID_SIGNATURE_HEADER] = sign_sendgrid_event(key, b"[]", stamp)
        response = client.post("/webhooks/sendgrid", content=body, headers=headers)
    assert response.status_code == 403
    assert response.json()["detail"].startswith("sendgrid webhook refused")
    assert status_of(app, "m-sent") == MessageStatus.SENT and ann(app).email_opt_in
    assert rows(app, Suppression) == [] and rows(app, WebhookReceipt) == []


def test_a_signed_body_that_is_not_events_is_400(client: TestClient, now: datetime) -> None:
    response = post_sendgrid(client, now, [{"event": "open"}])
    assert response.status_code == 400 and "event 0" in response.json()["detail"]


def test_without_a_public_key_sendgrid_events_are_refused(
    db_url: str, tmp_path: Path, now: datetime
) -> None:
    application = web_app(db_url, tmp_path, now)
    try:
        with TestClient(create_app(application)) as test_client:
            response = post_sendgrid(test_client, now, [sg_event("open", 1)])
        assert response.status_code == 503
        assert "LIFECYCLE_SENDGRID_WEBHOOK_PUBLIC_KEY" in response.json()["detail"]
    finally:
        application.db.dispose()


# ── Twilio ──────────────────────────────────────────────────────────────────────────


def post_twilio(
    client: TestClient,
    path: str,
    params: dict[str, str],
    *,
    signed_url: str | None = None,
    token: str = TWILIO_TOKEN,
) -> httpx.Response:
    url = signed_url or f"{BASE_URL}{path}"
    signature = RequestValidator(token).compute_signature(url, params)
    return client.post(path, data=params, headers={"X-Twilio-Signature": signature})


def inbound(sid: str, body: str, number: str = ANN_PHONE) -> dict[str, str]:
    return {
        "MessageSid": sid,
        "From": number,
        "To": "+15005550006",
        "Body": body,
        "AccountSid": "AC1",
    }


def twiml_messages(response: httpx.Response) -> list[str]:
    """The <Message> texts of a TwiML answer (none for an empty <Response>)."""
    assert response.headers["content-type"].startswith("application/xml")
    root = ElementTree.fromstring(response.content)
    assert root.tag == "Response"
    return [element.text or "" for element in root.iter("Message")]


def test_stop_withdraws_sms_consent_and_suppresses_the_number(
    client: TestClient, app: App, now: datetime
) -> None:
    response = post_twilio(client, "/webhooks/twilio/inbound", inbound("SMin1", "  Stop "))
    assert response.status_code == 200
    assert twiml_messages(response) == []
    customer = ann(app)
    assert not customer.sms_opt_in and customer.sms_opt_out_at == now
    [suppression] = rows(app, Suppression)
    assert (suppression.channel, suppression.address, suppression.reason, suppression.source) == (
        "sms",
        ANN_PHONE,
        "STOP",
        "twilio",
    )
    # Twilio retries: the same MessageSid again has no second effect.
    assert (
        post_twilio(client, "/webhooks/twilio/inbound", inbound("SMin1", "STOP")).status_code == 200
    )
    assert [d.outcome for d in rows(app, Decision)] == ["unsubscribed"]


def test_start_after_stop_restores_consent_and_lifts_the_suppression(
    client: TestClient, app: App
) -> None:
    post_twilio(client, "/webhooks/twilio/inbound", inbound("SMin1", "STOPALL"))
    post_twilio(client, "/webhooks/twilio/inbound", inbound("SMin2", "unstop"))
    assert ann(app).sms_opt_in
    assert rows(app, Suppression) == []
    assert sorted(d.outcome for d in rows(app, Decision)) == ["resubscribed", "unsubscribed"]


def test_help_answers_with_the_brand_and_how_to_opt_out(client: TestClient, app: App) -> None:
    response = post_twilio(client, "/webhooks/twilio/inbound", inbound("SMin3", "help"))
    assert response.status_code == 200
    [reply] = twiml_messages(response)
    assert reply.startswith("Lifecycle Shop:") and reply.endswith("Reply STOP to opt out.")
    assert ann(app).sms_opt_in and rows(app, Suppression) == []
    other = post_twilio(
        client, "/webhooks/twilio/inbound", inbound("SMin4", "stop the deliveries please")
    )
    assert twiml_messages(other) == [] and ann(app).sms_opt_in


def test_the_twiml_answer_escapes_the_brand(client: TestClient, app: App) -> None:
    """The reply is built by the Twilio SDK's MessagingResponse: XML-escaped, parseable."""
    app.rules.policies.brand["name"] = "Fish & <Chips>"
    response = post_twilio(client, "/webhooks/twilio/inbound", inbound("SMin5", "INFO"))
    [reply] = twiml_messages(response)
    assert reply.startswith("Fish & <Chips>: account and offer messages.")
    assert "Fish &amp; &lt;Chips&gt;" in response.text


def queue_sms(app: App, now: datetime, *specs: tuple[str, str | None, str, str]) -> None:
    """Queued messages: (id, customer, channel, to) each, due tomorrow."""
    with Session(app.db) as session:
        for message_id, customer_id, channel, to in specs:
            session.add(
                Message(
                    id=message_id,
                    dedupe_key=f"k-{message_id}",
                    customer_id=customer_id,
                    playbook="welcome_series" if message_id != "q-staff" else None,
                    step_id="tips" if message_id != "q-staff" else None,
                    kind="staff" if message_id == "q-staff" else "marketing",
                    channel=channel,
                    template="t",
                    to_address=to,
                    due_at=now + timedelta(days=1),
                    created_at=now,
                    updated_at=now,
                )
            )
        session.commit()


@pytest.mark.parametrize("word", ["REVOKE", "opt out", "Opt-Out", "OPTOUT", "Stop."])
def test_a_stop_cancels_the_customers_queued_sms_at_once_naming_the_stop(
    client: TestClient, app: App, now: datetime, word: str
) -> None:
    """Before, the rows stayed queued to their due time and were then cancelled as "no
    phone number, or the number is suppressed"."""
    queue_sms(
        app,
        now,
        ("q-to-number", "c1", "sms", ANN_PHONE),
        ("q-old-number", "c1", "sms", "+447700900999"),  # queued before a number change
        ("q-email", "c1", "email", ANN_EMAIL),
        ("q-other", "c2", "sms", "+447700900555"),
        ("q-staff", "c1", "sms", "+447700900777"),  # a case notification to a lead
    )
    response = post_twilio(client, "/webhooks/twilio/inbound", inbound("SMstop", word))
    assert response.status_code == 200 and twiml_messages(response) == []
    said = " ".join(word.split()).upper()
    for message_id in ("q-to-number", "q-old-number"):
        assert status_of(app, message_id) == MessageStatus.CANCELLED
    for message_id in ("q-email", "q-other", "q-staff"):
        assert status_of(app, message_id) == MessageStatus.QUEUED
    cancelled = rows(app, Decision, Decision.outcome == "cancelled")
    assert sorted(d.message_id for d in cancelled) == ["q-old-number", "q-to-number"]
    for decision in cancelled:
        assert decision.reason == (
            f"cancelled: the recipient sent STOP (SMS {said} from {ANN_PHONE})"
        )
        assert (decision.customer_id, decision.playbook, decision.step_id) == (
            "c1",
            "welcome_series",
            "tips",
        )
    assert not ann(app).sms_opt_in
    # Twilio retries the webhook: nothing more is cancelled or decided.
    post_twilio(client, "/webhooks/twilio/inbound", inbound("SMstop", word))
    assert len(rows(app, Decision, Decision.outcome == "cancelled")) == 2


@pytest.mark.parametrize("forgery", ["wrong-token", "wrong-url", "unsigned"])
def test_a_forged_twilio_request_is_403_and_changes_nothing(
    client: TestClient, app: App, forgery: str
) -> None:
    path = "/webhooks/twilio/inbound"
    if forgery == "wrong-token":
        response = post_twilio(client, path, inbound("SMx", "STOP"), token="not-the-token")
    elif forgery == "wrong-url":
        response = post_twilio(
            client, path, inbound("SMx", "STOP"), signed_url=f"http://testserver{path}"
        )
    else:
        response = client.post(path, data=inbound("SMx", "STOP"))
    assert response.status_code == 403
    assert response.json()["detail"].startswith("twilio webhook refused")
    assert ann(app).sms_opt_in and rows(app, Suppression) == [] and rows(app, WebhookReceipt) == []
    status = post_twilio(
        client,
        "/webhooks/twilio/status",
        {"MessageSid": "SM0001", "MessageStatus": "failed"},
        token="not-the-token",
    )
    assert status.status_code == 403 and status_of(app, "m-sms") == MessageStatus.SENT


def test_twilio_status_callbacks_update_the_ledger(client: TestClient, app: App) -> None:
    path = "/webhooks/twilio/status"
    delivered = {"MessageSid": "SM0001", "MessageStatus": "delivered", "To": ANN_PHONE}
    assert post_twilio(client, path, delivered).status_code == 200
    assert status_of(app, "m-sms") == MessageStatus.DELIVERED
    assert post_twilio(client, path, delivered).status_code == 200  # redelivered: no change
    assert len(rows(app, WebhookReceipt)) == 1


def test_a_twilio_callback_before_the_sid_is_recorded_finds_its_message_by_its_id(
    client: TestClient, app: App
) -> None:
    path = "/webhooks/twilio/status?lifecycle_message_id=m-sms-sending"
    delivered = {"MessageSid": "SM0002", "MessageStatus": "delivered", "To": ANN_PHONE}
    assert post_twilio(client, path, delivered).status_code == 200
    with Session(app.db) as session:
        message = session.get(Message, "m-sms-sending")
        assert message is not None
        assert (message.status, message.provider_id) == (MessageStatus.DELIVERED, "SM0002")
    # Our id never takes a message that Twilio's sid says is another one.
    other = {"MessageSid": "SM0003", "MessageStatus": "failed", "To": ANN_PHONE}
    path = "/webhooks/twilio/status?lifecycle_message_id=m-sms"
    assert post_twilio(client, path, other).status_code == 200
    assert status_of(app, "m-sms") == MessageStatus.SENT


def test_an_undeliverable_number_fails_the_message_and_is_suppressed(
    client: TestClient, app: App
) -> None:
    failed = {
        "MessageSid": "SM0001",
        "MessageStatus": "undelivered",
        "ErrorCode": "30006",
        "To": ANN_PHONE,
    }
    assert post_twilio(client, "/webhooks/twilio/status", failed).status_code == 200
    with Session(app.db) as session:
        message = session.get(Message, "m-sms")
        assert message is not None and message.status == MessageStatus.FAILED
        assert (
            message.last_error
            == "twilio undelivered: error 30006 (landline or unreachable carrier)"
        )
    [suppression] = rows(app, Suppression)
    assert (suppression.channel, suppression.address) == ("sms", ANN_PHONE)
    assert ann(app).sms_opt_in  # not an opt-out: only the number is held back


def test_error_21610_means_stop_and_start_lifts_it(client: TestClient, app: App) -> None:
    failed = {"MessageSid": "SM0001", "MessageStatus": "failed", "ErrorCode": "21610"}
    assert post_twilio(client, "/webhooks/twilio/status", failed).status_code == 200
    assert status_of(app, "m-sms") == MessageStatus.FAILED and not ann(app).sms_opt_in
    assert [s.reason for s in rows(app, Suppression)] == [
        "twilio error 21610: the recipient replied STOP"
    ]
    post_twilio(client, "/webhooks/twilio/inbound", inbound("SMin9", "START"))
    assert ann(app).sms_opt_in and rows(app, Suppression) == []


# ── unsubscribe ─────────────────────────────────────────────────────────────────────


def test_the_unsubscribe_link_confirms_then_records_the_opt_out_once(
    client: TestClient, app: App, now: datetime
) -> None:
    token = unsubscribe_token(app.settings.secret_key.get_secret_value(), "c1", "email", "m-sent")
    page = client.get(f"/u/{token}")
    assert page.status_code == 200 and f'action="/u/{token}"' in page.text
    assert ann(app).email_opt_in  # looking is not unsubscribing
    for _ in range(2):  # RFC 8058 one-click, as a mail provider posts it; twice
        done = client.post(
            f"/u/{token}",
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert done.status_code == 200 and "You are unsubscribed" in done.text
    customer = ann(app)
    assert not customer.email_opt_in and customer.email_opt_out_at == now
    [decision] = rows(app, Decision)
    assert (decision.outcome, decision.message_id, decision.playbook) == (
        "unsubscribed",
        "m-sent",
        "welcome_series",
    )


def test_a_forged_unsubscribe_token_is_400_and_changes_nothing(
    client: TestClient, app: App
) -> None:
    forged = unsubscribe_token("not-our-secret", "c1", "email", "m-sent")
    assert client.get(f"/u/{forged}").status_code == 400
    response = client.post(f"/u/{forged}", data={"List-Unsubscribe": "One-Click"})
    assert response.status_code == 400 and "not valid" in response.text
    assert client.post("/u/garbage").status_code == 400
    assert ann(app).email_opt_in and rows(app, Decision) == []
    with Session(app.db) as session:
        assert session.scalar(select(func.count()).select_from(Decision)) == 0


def test_an_unsubscribe_link_signed_with_a_previous_key_still_works_after_rotation(
    app: App, now: datetime
) -> None:
    """Mail already delivered keeps working after a key change; a forged link does not."""
    delivered = unsubscribe_token(
        app.settings.secret_key.get_secret_value(), "c1", "email", "m-sent"
    )
    old = app.settings.secret_key
    app.settings = app.settings.model_copy(
        update={
            "secret_key": SecretStr("the-new-key-after-rotation-0123456789"),
            "secret_key_previous": SecretStr(
                f" an-even-older-key-0123456789 , {old.get_secret_value()}"
            ),
        }
    )
    assert app.settings.secret_keys()[-1] == "the-new-key-after-rotation-0123456789"
    with TestClient(create_app(app), base_url=BASE_URL) as client:
        page = client.get(f"/u/{delivered}")
        assert page.status_code == 200 and f'action="/u/{delivered}"' in page.text
        done = client.post(
            f"/u/{delivered}",
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert done.status_code == 200 and "You are unsubscribed" in done.text
        forged = unsubscribe_token("never-one-of-our-keys", "c1", "sms", "m-sms")
        assert client.get(f"/u/{forged}").status_code == 400
        assert (
            client.post(f"/u/{forged}", data={"List-Unsubscribe": "One-Click"}).status_code == 400
        )
    customer = ann(app)
    assert not customer.email_opt_in and customer.email_opt_out_at == now
    assert customer.sms_opt_in  # the forged SMS link changed nothing
    # New links are signed with the current key alone.
    fresh = unsubscribe_token(dispatch_config(app).secret_key, "c1", "email", "m-batch")
    assert read_unsubscribe_token("the-new-key-after-rotation-0123456789", fresh)[2] == "m-batch"

"""The channels through the real SendGrid and Twilio SDKs, against the local fake provider.

Nothing here leaves 127.0.0.1. Payloads are asserted exactly, errors by their text.
"""

from __future__ import annotations

import base64
import concurrent.futures
import email
import email.policy
import io
import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

from channels.console import ConsoleChannel
from channels.memory import MemoryChannel
from channels.sendgrid_email import SendGridEmailChannel
from channels.twilio_sms import TwilioSmsChannel, _HttpClient
from channels.webhooks import (
    SENDGRID_SIGNATURE_HEADER,
    SendGridEvent,
    classify_inbound_sms,
    parse_sendgrid_events,
    verify_sendgrid,
    verify_twilio,
)
from engine.delivery.outbound import Attempt, Email, Sent, Sms, body_digest, send_many
from engine.errors import (
    ChannelError,
    ConfigurationError,
    PermanentChannelError,
    TransientChannelError,
    WebhookPayloadError,
    WebhookSignatureError,
)
from tests.support.fake_provider import (
    FakeProvider,
    generate_sendgrid_keypair,
    sendgrid_webhook_keypair,
    sign_sendgrid_event,
    sign_twilio,
    validate_mail,
)

FROM_EMAIL = "hello@lifecycle.example"
FROM_NUMBER = "+15005550006"
STATUS_CALLBACK = "https://lifecycle.example/webhooks/twilio/status"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def unsubscribe_headers(n: int | str) -> dict[str, str]:
    return {
        "List-Unsubscribe": (
            f"<https://lifecycle.example/u/{n}>, <mailto:unsub+{n}@lifecycle.example>"
        ),
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


def welcome(n: int | str = 1, to: str | None = None) -> Email:
    return Email(
        message_id=f"msg-{n}",
        to=to or f"customer{n}@example.com",
        subject="Welcome to Lifecycle",
        html="<p>Hello and <b>welcome</b>.</p>",
        text="Hello and welcome.",
        headers=unsubscribe_headers(n),
        category="welcome-series",
    )


@pytest.fixture(autouse=True)
def only_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that tries to connect anywhere but this machine."""
    connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in LOOPBACK:
            raise AssertionError(f"a test tried to connect to {address!r}")
        connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    with FakeProvider.start() as fake:
        yield fake


@pytest.fixture
def fake(provider: FakeProvider) -> FakeProvider:
    provider.reset()
    provider.clear()
    return provider


@pytest.fixture
def sendgrid(fake: FakeProvider) -> SendGridEmailChannel:
    return SendGridEmailChannel(fake.sendgrid_api_key, FROM_EMAIL, "Lifecycle", host=fake.url)


@pytest.fixture
def twilio(fake: FakeProvider) -> TwilioSmsChannel:
    return TwilioSmsChannel(
        fake.twilio_account_sid,
        fake.twilio_auth_token,
        FROM_NUMBER,
        STATUS_CALLBACK,
        base_url=fake.url,
    )


@pytest.fixture
def own_fake() -> Iterator[FakeProvider]:
    """A fake of the test's own, for slow answers that must not outlive the test."""
    with FakeProvider.start() as fake:
        yield fake


@pytest.fixture
def stopped_url() -> str:
    """The URL of a fake provider that has been stopped: its port refuses connections."""
    fake = FakeProvider.start()
    fake.stop()
    return fake.url


def raised(call, *args) -> ChannelError:  # type: ignore[no-untyped-def]
    with pytest.raises(ChannelError) as info:
        call(*args)
    return info.value


# ── SendGrid ────────────────────────────────────────────────────────────────────────


def test_sendgrid_sends_the_exact_payload(
    fake: FakeProvider, sendgrid: SendGridEmailChannel
) -> None:
    sent = sendgrid.send(welcome(1, to="ana@example.com"))

    (request,) = fake.requests
    assert request.path == "/v3/mail/send"
    assert request.headers["Authorization"] == f"Bearer {fake.sendgrid_api_key}"
    assert request.json == {
        "from": {"email": FROM_EMAIL, "name": "Lifecycle"},
        "subject": "Welcome to Lifecycle",
        "personalizations": [
            {
                "to": [{"email": "ana@example.com"}],
                "headers": {
                    "List-Unsubscribe": "<https://lifecycle.example/u/1>, "
                    "<mailto:unsub+1@lifecycle.example>",
                    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                },
                "custom_args": {"lifecycle_message_id": "msg-1"},
            }
        ],
        "content": [
            {"type": "text/plain", "value": "Hello and welcome."},
            {"type": "text/html", "value": "<p>Hello and <b>welcome</b>.</p>"},
        ],
        "categories": ["welcome-series"],
    }
    assert sent == Sent(provider_id=request.provider_id or "?", provider="sendgrid")
    assert re.fullmatch(r"[\w-]{22}", sent.provider_id)
    (view,) = fake.sent_emails()
    assert (view.to, view.message_id, view.x_message_id) == (
        ["ana@example.com"],
        "msg-1",
        sent.provider_id,
    )
    assert view.content_types == ["text/plain", "text/html"]


def test_sendgrid_sends_html_only_and_text_only_email(
    fake: FakeProvider, sendgrid: SendGridEmailChannel
) -> None:
    html_only = Email("h", "a@example.com", "S", "<p>x</p>", "", {})
    text_only = Email("t", "b@example.com", "S", "", "x", {})
    sendgrid.send(html_only)
    sendgrid.send(text_only)
    assert [r.json["content"] for r in fake.requests] == [
        [{"type": "text/html", "value": "<p>x</p>"}],
        [{"type": "text/plain", "value": "x"}],
    ]
    assert "categories" not in fake.requests[0].json


def test_sendgrid_batch_puts_identical_content_in_requests_of_at_most_1000(
    fake: FakeProvider, sendgrid: SendGridEmailChannel
) -> None:
    same = [welcome(n) for n in range(2300)]
    other = Email("other-1", "zoe@example.com", "Your cart", "<p>cart</p>", "cart", {}, "cart")
    messages = [*same[:1500], other, *same[1500:]]

    outcomes = sendgrid.send_batch(messages)

    assert len(outcomes) == len(messages)
    assert all(isinstance(o, Sent) for o in outcomes)
    sizes = [len(r.json["personalizations"]) for r in fake.requests]
    assert sizes == [1000, 1000, 300, 1]
    # Each personalization carries its own recipient, message id and unsubscribe headers.
    first = fake.requests[0].json["personalizations"]
    assert first[7] == {
        "to": [{"email": "customer7@example.com"}],
        "headers": unsubscribe_headers(7),
        "custom_args": {"lifecycle_message_id": "msg-7"},
    }
    views = fake.sent_emails()
    assert [v.message_id for v in views] == [m.message_id for m in same] + ["other-1"]
    # Outcomes line up with the input: the one request's id for every email in it.
    ids = [r.provider_id for r in fake.requests]
    assert outcomes[0] == outcomes[999] == Sent(ids[0] or "", "sendgrid")
    assert outcomes[1000] == Sent(ids[1] or "", "sendgrid")
    assert outcomes[1500] == Sent(ids[3] or "", "sendgrid")  # "other" went last
    assert outcomes[-1] == Sent(ids[2] or "", "sendgrid")
    assert len(set(ids)) == 4


def test_sendgrid_batch_reports_a_failed_request_for_each_of_its_emails(
    fake: FakeProvider, sendgrid: SendGridEmailChannel
) -> None:
    fake.fail_next(1, 503)
    outcomes = sendgrid.send_batch([welcome(n) for n in range(1200)])
    assert all(isinstance(o, TransientChannelError) for o in outcomes[:1000])
    assert str(outcomes[0]) == "sendgrid: provider error: Service Unavailable · HTTP 503"
    assert all(isinstance(o, Sent) for o in outcomes[1000:])
    assert len(fake.sent_emails()) == 200


def test_send_many_batches_through_sendgrid(
    fake: FakeProvider, sendgrid: SendGridEmailChannel
) -> None:
    outcomes = send_many(sendgrid, [welcome(n) for n in range(5)])
    assert len(fake.requests) == 1 and len(outcomes) == 5


def test_sendgrid_429_is_transient_with_retry_after_from_the_reset_header(
    fake: FakeProvider, sendgrid: SendGridEmailChannel
) -> None:
    fake.fail_next(1, 429, reset_after_s=30)
    error = raised(sendgrid.send, welcome())
    assert isinstance(error, TransientChannelError)
    assert str(error) == "sendgrid: rate limited: too many requests · HTTP 429"
    assert error.status == 429
    assert error.retry_after is not None and 28 <= error.retry_after <= 31
    assert int(fake.requests[0].status) == 429


def test_sendgrid_429_falls_back_to_retry_after(
    fake: FakeProvider, sendgrid: SendGridEmailChannel
) -> None:
    fake.fail_next(1, 429, retry_after_s=7)
    error = raised(sendgrid.send, welcome())
    assert isinstance(error, TransientChannelError)
    assert error.retry_after == 7.0


def test_sendgrid_503_is_transient(fake: FakeProvider, sendgrid: SendGridEmailChannel) -> None:
    fake.fail_next(1, 503)
    error = raised(sendgrid.send, welcome())
    assert isinstance(error, TransientChannelError)
    assert str(error) == "sendgrid: provider error: Service Unavailable · HTTP 503"
    assert error.retry_after is None
    assert isinstance(sendgrid.send(welcome()), Sent)  # the next one goes through


def test_sendgrid_400_is_permanent_with_the_providers_message(
    fake: FakeProvider, sendgrid: SendGridEmailChannel
) -> None:
    fake.fail_next(1, 400)
    error = raised(sendgrid.send, welcome())
    assert isinstance(error, PermanentChannelError)
    assert str(error) == (
        "sendgrid: refused the email: The from address does not match a verified Sender "
        "Identity. Mail cannot be sent until this error is resolved. (field from) · HTTP 400"
    )
    assert not error.suppress


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (403, "access forbidden"),
        (413, "Payload Too Large"),
    ],
)
def test_sendgrid_other_4xx_are_permanent(
    fake: FakeProvider, sendgrid: SendGridEmailChannel, status: int, text: str
) -> None:
    fake.fail_next(1, status)
    error = raised(sendgrid.send, welcome())
    assert isinstance(error, PermanentChannelError)
    assert str(error) == f"sendgrid: refused the email: {text} · HTTP {status}"


def test_sendgrid_wrong_key_is_permanent_and_never_shows_the_key(fake: FakeProvider) -> None:
    secret = "SG.wrong-key.super-secret-value"
    channel = SendGridEmailChannel(secret, FROM_EMAIL, "Lifecycle", host=fake.url)
    error = raised(channel.send, welcome())
    assert isinstance(error, PermanentChannelError)
    assert str(error) == (
        "sendgrid: refused the email: The provided authorization grant is invalid, expired, "
        "or revoked · HTTP 401"
    )
    assert secret not in repr(channel) and "[hidden]" in repr(channel)
    assert secret not in str(error) and secret not in repr(error.__cause__)


def test_sendgrid_debug_logs_redact_the_key(
    fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    secret = fake.sendgrid_api_key
    channel = SendGridEmailChannel(secret, FROM_EMAIL, "Lifecycle", host=fake.url)
    with caplog.at_level(logging.DEBUG, logger="python_http_client"):
        channel.send(welcome())
    assert "Bearer [redacted]" in caplog.text
    assert secret not in caplog.text


def test_sendgrid_refused_connection_is_transient(stopped_url: str) -> None:
    channel = SendGridEmailChannel("SG.k.v", FROM_EMAIL, "Lifecycle", host=stopped_url)
    error = raised(channel.send, welcome())
    assert isinstance(error, TransientChannelError)
    assert str(error) == f"sendgrid: cannot reach {stopped_url}: [Errno 111] Connection refused"


def test_sendgrid_slow_answer_is_a_transient_timeout(own_fake: FakeProvider) -> None:
    fake = own_fake
    channel = SendGridEmailChannel(
        fake.sendgrid_api_key, FROM_EMAIL, "Lifecycle", host=fake.url, timeout=0.2
    )
    fake.delay(6, path="sendgrid")
    started = time.monotonic()
    error = raised(channel.send, welcome())
    assert time.monotonic() - started < 5  # gave up on its own, long before the answer
    assert isinstance(error, TransientChannelError)
    assert str(error) == f"sendgrid: no answer from {fake.url} within 0.2 s"


def test_sendgrid_dropped_connection_is_transient(
    fake: FakeProvider, sendgrid: SendGridEmailChannel
) -> None:
    fake.fail_next(1, 0)
    error = raised(sendgrid.send, welcome())
    assert isinstance(error, TransientChannelError)
    assert str(error).startswith(f"sendgrid: connection to {fake.url} failed: RemoteDisconnected")


def test_sendgrid_refuses_a_body_holding_an_api_key(
    fake: FakeProvider, sendgrid: SendGridEmailChannel
) -> None:
    leaky = Email("k", "a@example.com", "S", "", "SG.abcdefgh.ijklmnop is my key", {})
    error = raised(sendgrid.send, leaky)
    assert isinstance(error, PermanentChannelError)
    assert str(error) == (
        "sendgrid: the body looks like it contains a SendGrid API key; not sending it"
    )
    assert fake.requests == []


def test_sendgrid_refuses_sms_and_bad_settings(sendgrid: SendGridEmailChannel) -> None:
    error = raised(sendgrid.send, Sms("s", "+15551234567", "hi"))
    assert str(error) == "sendgrid: can only send email, not a Sms"
    with pytest.raises(ConfigurationError, match="setting sendgrid_api_key: is empty"):
        SendGridEmailChannel("", FROM_EMAIL, "Lifecycle")
    with pytest.raises(ConfigurationError, match="'nobody' is not an email address"):
        SendGridEmailChannel("SG.k.v", "nobody", "Lifecycle")


def test_the_fake_validates_like_sendgrid() -> None:
    errors = validate_mail(
        {
            "personalizations": [{"to": [{"email": "not-an-address"}], "custom_args": {"n": 1}}],
            "from": {"name": "no address"},
            "content": [{"type": "text/html", "value": "<p>x</p>"}, {"type": "text/plain"}],
        }
    )
    assert [e["field"] for e in errors] == [
        "personalizations.0.to",
        "personalizations.0.custom_args",
        "from.email",
        "subject",
        "content",
        "content.1.value",
    ]


# ── Twilio ──────────────────────────────────────────────────────────────────────────


def test_twilio_sends_the_exact_form(fake: FakeProvider, twilio: TwilioSmsChannel) -> None:
    sent = twilio.send(Sms("sms-1", "+15558675310", "Your order shipped. Reply STOP to stop."))

    (request,) = fake.requests
    assert request.method == "POST"
    assert request.path == f"/2010-04-01/Accounts/{fake.twilio_account_sid}/Messages.json"
    assert request.form == {
        "To": "+15558675310",
        "From": FROM_NUMBER,
        "Body": "Your order shipped. Reply STOP to stop.",
        "StatusCallback": f"{STATUS_CALLBACK}?lifecycle_message_id=sms-1",
    }
    credentials = base64.b64decode(request.headers["Authorization"].removeprefix("Basic "))
    assert credentials.decode() == f"{fake.twilio_account_sid}:{fake.twilio_auth_token}"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert re.fullmatch(r"SM[0-9a-f]{32}", sent.provider_id)
    assert sent == Sent(request.provider_id or "?", "twilio")
    (view,) = fake.sent_sms()
    assert (view.sid, view.to, view.from_, view.status_callback) == (
        sent.provider_id,
        "+15558675310",
        FROM_NUMBER,
        f"{STATUS_CALLBACK}?lifecycle_message_id=sms-1",
    )


def test_twilio_with_a_messaging_service_and_no_callback(fake: FakeProvider) -> None:
    channel = TwilioSmsChannel(
        fake.twilio_account_sid,
        fake.twilio_auth_token,
        base_url=fake.url,
        messaging_service_sid="MG" + "1" * 32,
    )
    channel.send(Sms("sms-2", "+447700900123", "Hi"))
    assert fake.requests[0].form == {
        "To": "+447700900123",
        "MessagingServiceSid": "MG" + "1" * 32,
        "Body": "Hi",
    }


def test_twilio_invalid_number_is_permanent_and_suppresses(
    fake: FakeProvider, twilio: TwilioSmsChannel
) -> None:
    error = raised(twilio.send, Sms("sms-3", "555-0100", "Hi"))
    assert isinstance(error, PermanentChannelError)
    assert error.suppress
    assert str(error) == (
        "twilio: refused the SMS: The 'To' number 555-0100 is not a valid phone number. "
        "· HTTP 400 · code 21211"
    )
    assert (error.status, error.code) == (400, "21211")


@pytest.mark.parametrize(
    ("code", "suppress", "text"),
    [
        (21610, True, "Attempt to send to unsubscribed recipient"),
        (21614, True, "'To' number is not a valid mobile number"),
        (
            21408,
            False,
            "Permission to send an SMS has not been enabled for the region indicated by the "
            "'To' number: +2348030000000.",
        ),
    ],
)
def test_twilio_refusals_for_a_number(
    fake: FakeProvider, twilio: TwilioSmsChannel, code: int, suppress: bool, text: str
) -> None:
    fake.reject_number("+2348030000000", code)
    error = raised(twilio.send, Sms("sms-4", "+2348030000000", "Hi"))
    assert isinstance(error, PermanentChannelError)
    assert error.suppress is suppress
    assert str(error) == f"twilio: refused the SMS: {text} · HTTP 400 · code {code}"


def test_twilio_other_4xx_is_permanent_without_suppression(
    fake: FakeProvider, twilio: TwilioSmsChannel
) -> None:
    fake.fail_next(1, 400, twilio_code=21606, message="The From phone number is not valid.")
    error = raised(twilio.send, Sms("sms-5", "+15558675310", "Hi"))
    assert isinstance(error, PermanentChannelError) and not error.suppress
    assert str(error) == (
        "twilio: refused the SMS: The From phone number is not valid. · HTTP 400 · code 21606"
    )


def test_twilio_429_is_transient_with_retry_after(
    fake: FakeProvider, twilio: TwilioSmsChannel
) -> None:
    fake.fail_next(1, 429, retry_after_s=5, path="twilio")
    error = raised(twilio.send, Sms("sms-6", "+15558675310", "Hi"))
    assert isinstance(error, TransientChannelError)
    assert str(error) == "twilio: rate limited: Too Many Requests · HTTP 429 · code 20429"
    assert error.retry_after == 5.0


def test_twilio_503_is_transient(fake: FakeProvider, twilio: TwilioSmsChannel) -> None:
    fake.fail_next(1, 503)
    error = raised(twilio.send, Sms("sms-7", "+15558675310", "Hi"))
    assert isinstance(error, TransientChannelError)
    assert str(error) == (
        "twilio: provider error: Service is unavailable. Please try again · HTTP 503 · code 20503"
    )


def test_twilio_failure_injection_respects_the_path(
    fake: FakeProvider, twilio: TwilioSmsChannel, sendgrid: SendGridEmailChannel
) -> None:
    fake.fail_next(1, 503, path="sendgrid")
    assert isinstance(twilio.send(Sms("sms-8", "+15558675310", "Hi")), Sent)
    assert isinstance(raised(sendgrid.send, welcome()), TransientChannelError)


def test_twilio_wrong_token_is_permanent_and_never_shows_the_token(fake: FakeProvider) -> None:
    secret = "a-very-secret-auth-token"
    channel = TwilioSmsChannel(fake.twilio_account_sid, secret, FROM_NUMBER, base_url=fake.url)
    error = raised(channel.send, Sms("sms-9", "+15558675310", "Hi"))
    assert isinstance(error, PermanentChannelError)
    assert str(error) == "twilio: refused the SMS: Authenticate · HTTP 401 · code 20003"
    assert secret not in repr(channel) and "auth_token=[hidden]" in repr(channel)


def test_twilio_refused_connection_is_transient(stopped_url: str) -> None:
    channel = TwilioSmsChannel("AC" + "0" * 32, "token", FROM_NUMBER, base_url=stopped_url)
    error = raised(channel.send, Sms("sms-10", "+15558675310", "Hi"))
    assert isinstance(error, TransientChannelError)
    assert str(error) == (
        f"twilio: cannot reach {stopped_url}: ConnectionRefusedError: [Errno 111] "
        "Connection refused"
    )


def test_twilio_slow_answer_is_a_transient_timeout(own_fake: FakeProvider) -> None:
    fake = own_fake
    channel = TwilioSmsChannel(
        fake.twilio_account_sid,
        fake.twilio_auth_token,
        FROM_NUMBER,
        base_url=fake.url,
        timeout=0.2,
    )
    fake.delay(6, path="twilio")
    started = time.monotonic()
    error = raised(channel.send, Sms("sms-11", "+15558675310", "Hi"))
    assert time.monotonic() - started < 5  # gave up on its own, long before the answer
    assert isinstance(error, TransientChannelError)
    assert str(error) == f"twilio: no answer from {fake.url} within 0.2 s"


def test_twilio_keeps_working_after_a_dropped_keep_alive_connection(
    fake: FakeProvider, twilio: TwilioSmsChannel
) -> None:
    twilio.send(Sms("sms-12", "+15558675310", "warm the connection pool"))
    fake.fail_next(1, 0)
    error = raised(twilio.send, Sms("sms-13", "+15558675310", "Hi"))
    assert isinstance(error, TransientChannelError)
    assert isinstance(twilio.send(Sms("sms-14", "+15558675310", "Hi")), Sent)


# ── Twilio lookups (settlement) ─────────────────────────────────────────────────────


def attempt(to: str, body: str | None = None, sid: str | None = None) -> Attempt:
    digest = body_digest(body) if body is not None else None
    return Attempt("m-1", to, datetime.now(UTC) - timedelta(minutes=1), digest, sid)


def test_twilio_lookup_lists_the_recipients_messages_and_recognises_ours_by_body(
    fake: FakeProvider, twilio: TwilioSmsChannel
) -> None:
    ann, bob = "+15558675310", "+15558675311"
    first = twilio.send(Sms("s1", ann, "Your order shipped."))
    ours = twilio.send(Sms("s2", ann, "Last chance: 15% off ends Sunday."))
    twilio.send(Sms("s3", bob, "Last chance: 15% off ends Sunday."))
    records = twilio.lookup(attempt(ann, "Last chance: 15% off ends Sunday."))
    assert sorted((r.provider_id, r.status, r.matches, r.detail) for r in records) == sorted(
        [
            (first.provider_id, "sent", False, "queued"),
            (ours.provider_id, "sent", True, "queued"),
        ]
    )
    (request,) = [r for r in fake.requests if r.method == "GET"]
    assert request.path == f"/2010-04-01/Accounts/{fake.twilio_account_sid}/Messages.json"
    assert twilio.lookup(attempt("+15558675312", "anything")) == []  # never received


def test_twilio_lookup_ignores_what_was_created_before_the_attempt(
    fake: FakeProvider, twilio: TwilioSmsChannel
) -> None:
    twilio.send(Sms("s1", "+15558675310", "Hi"))
    later = Attempt("m-1", "+15558675310", datetime.now(UTC) + timedelta(hours=1), None)
    assert twilio.lookup(later) == []


def test_the_fake_pages_twilio_lists_like_twilio(
    fake: FakeProvider, twilio: TwilioSmsChannel
) -> None:
    sent = [twilio.send(Sms(f"s{n}", "+15558675310", f"Message {n}")).provider_id for n in range(5)]
    listed = twilio._client.messages.list(to="+15558675310", page_size=2)
    assert [m.sid for m in listed] == list(reversed(sent))  # newest first, over three pages
    pages = [dict(parse_qsl(r.query)) for r in fake.requests if r.method == "GET"]
    assert [(p.get("Page"), p["PageSize"], p["To"]) for p in pages] == [
        (None, "2", "+15558675310"),  # the SDK's first request; then next_page_uri
        ("1", "2", "+15558675310"),
        ("2", "2", "+15558675310"),
    ]
    assert pages[1]["PageToken"].startswith("PASM")


def test_twilio_lookup_by_sid_fetches_that_message(
    fake: FakeProvider, twilio: TwilioSmsChannel
) -> None:
    sent = twilio.send(Sms("s1", "+15558675310", "Hi"))
    (record,) = twilio.lookup(attempt("+15558675310", sid=sent.provider_id))
    assert (record.provider_id, record.matches) == (sent.provider_id, True)
    error = raised(twilio.lookup, attempt("+15558675310", sid="SM" + "0" * 32))
    assert isinstance(error, PermanentChannelError)
    assert str(error) == (
        f"twilio: cannot look up: The requested resource /2010-04-01/Accounts/"
        f"{fake.twilio_account_sid}/Messages/SM{'0' * 32}.json was not found · HTTP 404 · "
        "code 20404"
    )


def test_twilio_lookup_while_twilio_fails_is_a_transient_error(
    fake: FakeProvider, twilio: TwilioSmsChannel, stopped_url: str
) -> None:
    fake.fail_next(1, 503, path="twilio", method="GET")
    error = raised(twilio.lookup, attempt("+15558675310", "Hi"))
    assert isinstance(error, TransientChannelError)
    assert str(error) == (
        "twilio: provider error: Service is unavailable. Please try again · HTTP 503 · code 20503"
    )
    down = TwilioSmsChannel("AC" + "0" * 32, "token", FROM_NUMBER, base_url=stopped_url)
    assert isinstance(raised(down.lookup, attempt("+15558675310", "Hi")), TransientChannelError)


def test_twilio_base_url_rewrites_every_twilio_host() -> None:
    client = _HttpClient("http://127.0.0.1:9999/prefix/", timeout=1)
    assert client.rewrite("https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json?x=1") == (
        "http://127.0.0.1:9999/prefix/2010-04-01/Accounts/AC1/Messages.json?x=1"
    )
    assert client.rewrite("https://api.dublin.ie1.twilio.com/v1/x") == (
        "http://127.0.0.1:9999/prefix/v1/x"
    )
    assert client.rewrite("https://example.com/v1/x") == "https://example.com/v1/x"
    assert _HttpClient(None, timeout=1).rewrite("https://api.twilio.com/a") == (
        "https://api.twilio.com/a"
    )


def test_twilio_settings_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="exactly one of a sender number"):
        TwilioSmsChannel("AC1", "token")
    with pytest.raises(ConfigurationError, match="Twilio needs both"):
        TwilioSmsChannel("AC1", "", FROM_NUMBER)


# ── webhook signatures and payloads ─────────────────────────────────────────────────

SIGNED_AT = 1_767_225_600  # 2026-01-01T00:00:00Z
EVENTS_BODY = (
    b'[{"email":"ana@example.com","event":"delivered","timestamp":1767225590,'
    b'"sg_event_id":"ZGVsaXZlcmVk","sg_message_id":"c9yESinDqlWaKArTh3mtig.recvd-1-2.0",'
    b'"lifecycle_message_id":"msg-1","response":"250 OK"},\n'
    b' {"email":"bob@example.com","event":"bounce","timestamp":1767225595,'
    b'"sg_event_id":"Ym91bmNl","sg_message_id":"AbC.filter-9","lifecycle_message_id":"msg-2",'
    b'"reason":"550 5.1.1 The email account does not exist","type":"bounce"}]'
)


def signed(body: bytes = EVENTS_BODY, at: int = SIGNED_AT) -> tuple[str, str]:
    keys = sendgrid_webhook_keypair()
    return sign_sendgrid_event(keys.private_key, body, at), str(at)


def test_a_correctly_signed_sendgrid_payload_verifies_and_parses() -> None:
    signature, timestamp = signed()
    key = sendgrid_webhook_keypair().public_key
    verify_sendgrid(key, EVENTS_BODY, signature, timestamp, now=SIGNED_AT + 5)

    events = parse_sendgrid_events(EVENTS_BODY)
    assert events == [
        SendGridEvent(
            event="delivered",
            email="ana@example.com",
            timestamp=1767225590,
            sg_event_id="ZGVsaXZlcmVk",
            sg_message_id="c9yESinDqlWaKArTh3mtig.recvd-1-2.0",
            lifecycle_message_id="msg-1",
        ),
        SendGridEvent(
            event="bounce",
            email="bob@example.com",
            timestamp=1767225595,
            sg_event_id="Ym91bmNl",
            sg_message_id="AbC.filter-9",
            lifecycle_message_id="msg-2",
            reason="550 5.1.1 The email account does not exist",
            bounce_type="bounce",
        ),
    ]
    assert events[0].x_message_id == "c9yESinDqlWaKArTh3mtig"
    assert events[0].raw["response"] == "250 OK"


def test_the_sendgrid_key_may_be_given_as_pem() -> None:
    signature, timestamp = signed()
    der = sendgrid_webhook_keypair().public_key
    pem = f"-----BEGIN PUBLIC KEY-----\n{der[:40]}\n{der[40:]}\n-----END PUBLIC KEY-----\n"
    verify_sendgrid(pem, EVENTS_BODY, signature, timestamp, now=SIGNED_AT)


def refusal(*args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(WebhookSignatureError) as info:
        verify_sendgrid(*args, **kwargs)
    return str(info.value)


def test_sendgrid_refuses_a_tampered_body() -> None:
    signature, timestamp = signed()
    key = sendgrid_webhook_keypair().public_key
    tampered = EVENTS_BODY.replace(b"bounce", b"open")
    assert refusal(key, tampered, signature, timestamp, now=SIGNED_AT) == (
        "sendgrid webhook refused: the signature does not match the body and timestamp"
    )
    # Re-serializing the JSON changes the bytes too: verify the raw body, as received.
    reserialized = json.dumps(json.loads(EVENTS_BODY)).encode()
    assert "does not match" in refusal(key, reserialized, signature, timestamp, now=SIGNED_AT)


def test_sendgrid_refuses_a_payload_signed_with_another_key() -> None:
    other = generate_sendgrid_keypair()
    signature = sign_sendgrid_event(other.private_key, EVENTS_BODY, SIGNED_AT)
    key = sendgrid_webhook_keypair().public_key
    assert refusal(key, EVENTS_BODY, signature, str(SIGNED_AT), now=SIGNED_AT) == (
        "sendgrid webhook refused: the signature does not match the body and timestamp"
    )


def test_sendgrid_refuses_a_changed_timestamp() -> None:
    signature, _ = signed()
    key = sendgrid_webhook_keypair().public_key
    later = str(SIGNED_AT + 1)
    assert "does not match" in refusal(key, EVENTS_BODY, signature, later, now=SIGNED_AT)


@pytest.mark.parametrize(
    ("signature", "timestamp", "now", "message"),
    [
        (None, str(SIGNED_AT), SIGNED_AT, f"missing {SENDGRID_SIGNATURE_HEADER} header"),
        ("sig", "", SIGNED_AT, "missing X-Twilio-Email-Event-Webhook-Timestamp header"),
        ("sig", "yesterday", SIGNED_AT, "timestamp 'yesterday' is not a whole number of seconds"),
        (
            "sig",
            str(SIGNED_AT),
            SIGNED_AT + 600,
            "timestamp is 600 s old, more than the 300 s allowed",
        ),
        (
            "sig",
            str(SIGNED_AT),
            SIGNED_AT - 301,
            "timestamp is 301 s in the future, more than 300 s",
        ),
        ("not base64!", str(SIGNED_AT), SIGNED_AT, "the signature is not base64"),
    ],
)
def test_sendgrid_refuses_missing_stale_and_malformed_headers(
    signature: str | None, timestamp: str, now: int, message: str
) -> None:
    key = sendgrid_webhook_keypair().public_key
    assert refusal(key, EVENTS_BODY, signature, timestamp, now=now) == (
        f"sendgrid webhook refused: {message}"
    )


def test_a_stale_but_correctly_signed_payload_is_refused() -> None:
    signature, timestamp = signed()
    key = sendgrid_webhook_keypair().public_key
    message = refusal(key, EVENTS_BODY, signature, timestamp, now=SIGNED_AT + 301)
    assert message == (
        "sendgrid webhook refused: timestamp is 301 s old, more than the 300 s allowed"
    )


def test_a_malformed_sendgrid_public_key_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        verify_sendgrid("bm90IGEga2V5", EVENTS_BODY, "c2ln", str(SIGNED_AT), now=SIGNED_AT)
    assert str(info.value).startswith(
        "setting sendgrid_webhook_public_key: is not a valid public key"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b"[{]",
            "the body is not JSON: Expecting property name enclosed in double quotes at "
            "line 1 column 3",
        ),
        (b'{"event": "open"}', "the body must be a JSON array of events, not dict"),
        (b'["\xff"]', "the body is not UTF-8 (invalid start byte at byte 2)"),
    ],
)
def test_a_malformed_sendgrid_body_says_why(body: bytes, message: str) -> None:
    with pytest.raises(WebhookPayloadError) as info:
        parse_sendgrid_events(body)
    assert str(info.value) == f"sendgrid webhook payload refused (1 problem): {message}"


def test_bad_sendgrid_events_are_named_by_index() -> None:
    good = {"email": "a@example.com", "event": "open", "timestamp": 1, "sg_event_id": "e0"}
    body = json.dumps(
        [good, "open", {**good, "email": None}, {**good, "timestamp": "soon", "reason": ["x"]}]
    )
    with pytest.raises(WebhookPayloadError) as info:
        parse_sendgrid_events(body)
    assert str(info.value) == (
        "sendgrid webhook payload refused (4 problems): "
        "event 1: must be a JSON object, not str; "
        "event 2: 'email' is missing or not a non-empty string; "
        "event 3: 'timestamp' is missing or not whole seconds: 'soon'; "
        "event 3: 'reason' must be a string, not list"
    )
    assert info.value.problems[0].startswith("event 1:")


TWILIO_URL = "https://lifecycle.example/webhooks/twilio/inbound?tenant=1"
TWILIO_PARAMS = {
    "MessageSid": "SM" + "a" * 32,
    "From": "+15558675310",
    "To": FROM_NUMBER,
    "Body": "STOP",
}


def test_a_correctly_signed_twilio_request_verifies() -> None:
    signature = sign_twilio("token-1", TWILIO_URL, TWILIO_PARAMS)
    verify_twilio("token-1", TWILIO_URL, TWILIO_PARAMS, signature)


@pytest.mark.parametrize(
    ("token", "url", "params", "signature", "message"),
    [
        (
            "token-2",
            TWILIO_URL,
            TWILIO_PARAMS,
            None,
            "the signature does not match https://lifecycle.example/webhooks/twilio/inbound"
            "?tenant=1 and its 4 parameter(s) (is this the public URL Twilio was given?)",
        ),
        ("token-1", TWILIO_URL, {**TWILIO_PARAMS, "Body": "START"}, None, "does not match"),
        ("token-1", TWILIO_URL.replace("https", "http"), TWILIO_PARAMS, None, "does not match"),
        ("token-1", TWILIO_URL, TWILIO_PARAMS, "", "missing X-Twilio-Signature header"),
        ("token-1", TWILIO_URL, TWILIO_PARAMS, "Zm9yZ2Vk", "does not match"),
    ],
)
def test_a_forged_twilio_request_is_refused(
    token: str, url: str, params: dict[str, str], signature: str | None, message: str
) -> None:
    if signature is None:  # signed correctly with token-1 for the original request
        signature = sign_twilio("token-1", TWILIO_URL, TWILIO_PARAMS)
    with pytest.raises(WebhookSignatureError) as info:
        verify_twilio(token, url, params, signature)
    assert str(info.value).startswith("twilio webhook refused: ")
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("body", "keyword"),
    [
        ("STOP", "stop"),
        (" stop \n", "stop"),
        ("StopAll", "stop"),
        ("unsubscribe", "stop"),
        ("Cancel", "stop"),
        ("END", "stop"),
        ("quit", "stop"),
        ("START", "start"),
        ("unstop", "start"),
        ("help", "help"),
        ("INFO", "help"),
        ("REVOKE", "stop"),
        ("optout", "stop"),
        ("opt out", "stop"),
        ("Opt-Out", "stop"),
        (" OPT  OUT! ", "stop"),
        ("Stop.", "stop"),
        ("'quit'", "stop"),
        ("yes", "start"),
        ("YES!", "start"),
        ("stop it", "other"),
        ("yes please", "other"),
        ("don't opt out", "other"),
        ("", "other"),
        ("Thanks!", "other"),
    ],
)
def test_inbound_sms_keywords(body: str, keyword: str) -> None:
    assert classify_inbound_sms(body) == keyword


# ── console and memory ──────────────────────────────────────────────────────────────


def test_console_writes_a_parseable_email_file(tmp_path: Path) -> None:
    out = io.StringIO()
    channel = ConsoleChannel(tmp_path / "outbox", stream=out, clock=lambda: SIGNED_AT)
    sent = channel.send(welcome(1, to="ana@example.com"))

    assert sent == Sent("console-msg-1", "console")
    path = tmp_path / "outbox" / "msg-1.eml"
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert message["To"] == "ana@example.com"
    assert message["Subject"] == "Welcome to Lifecycle"
    assert message["Date"].datetime == datetime(2026, 1, 1, tzinfo=UTC)
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["List-Unsubscribe"] == unsubscribe_headers(1)["List-Unsubscribe"]
    assert message["X-Lifecycle-Message-Id"] == "msg-1"
    assert message.get_content_type() == "multipart/alternative"
    parts = [(p.get_content_type(), p.get_content().strip()) for p in message.iter_parts()]
    assert parts == [
        ("text/plain", "Hello and welcome."),
        ("text/html", "<p>Hello and <b>welcome</b>.</p>"),
    ]
    printed = out.getvalue()
    assert "── email msg-1 → ana@example.com" in printed
    assert "Subject: Welcome to Lifecycle" in printed and str(path) in printed


def test_console_resend_overwrites_and_sms_is_text(tmp_path: Path) -> None:
    channel = ConsoleChannel(tmp_path, stream=None)
    channel.send(welcome(1))
    changed = Email("msg-1", "ana@example.com", "Second try", "", "plain", {})
    channel.send(changed)
    channel.send(Sms("sms/../1", "+15558675310", "Hi there"))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["msg-1.eml", "sms%2F..%2F1.txt"]
    message = email.message_from_bytes((tmp_path / "msg-1.eml").read_bytes())
    assert message["Subject"] == "Second try"
    assert (tmp_path / "sms%2F..%2F1.txt").read_text() == (
        "To: +15558675310\nMessage-Id: sms/../1\n\nHi there\n"
    )


def test_memory_channel_records_and_fails_on_request() -> None:
    channel = MemoryChannel()
    limit = TransientChannelError("memory", "rate limited", status=429, retry_after=3)
    channel.fail_next(2, limit)
    for _ in range(2):
        assert raised(channel.send, welcome(1)) is limit
    assert channel.send(welcome(1)) == Sent("memory-1", "memory")
    outcomes = send_many(channel, [welcome(2), Sms("s", "+15558675310", "x")])
    assert outcomes == [Sent("memory-2", "memory"), Sent("memory-3", "memory")]
    assert [m.message_id for m in channel.sent] == ["msg-1", "msg-2", "s"]
    assert channel.attempts == 5
    channel.fail_next(1, PermanentChannelError("memory", "unsubscribed", suppress=True))
    batch = channel.send_batch([welcome(3), welcome(4)])
    assert isinstance(batch[0], PermanentChannelError) and batch[1] == Sent("memory-4", "memory")


def test_messages_validate_in_their_constructors() -> None:
    with pytest.raises(ValueError, match="email m: header X-Bad must not contain a line break"):
        Email("m", "a@example.com", "S", "", "x", {"X-Bad": "1\r\nBcc: everyone@example.com"})
    with pytest.raises(ValueError, match="email m: 'ana' is not an email address"):
        Email("m", "ana", "S", "", "x", {})
    with pytest.raises(ValueError, match="both the HTML and the text body are empty"):
        Email("m", "a@example.com", "S", " ", "", {})
    with pytest.raises(ValueError, match="sms s: the body is empty"):
        Sms("s", "+15558675310", "  ")
    headers = {"List-Unsubscribe": "<https://x>"}
    message = Email("m", "a@example.com", "S", "", "x", headers)
    headers["List-Unsubscribe"] = "changed"
    assert message.headers["List-Unsubscribe"] == "<https://x>"


def test_console_prints_to_the_current_stdout_and_keeps_unicode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    channel = ConsoleChannel(tmp_path)
    message = Email("m-ü", "zoë@example.com", "Bienvenue, Zoë 🎉", "<p>café</p>", "café ☕", {})
    channel.send(message)

    printed = capsys.readouterr().out
    assert "── email m-ü → zoë@example.com\n   Subject: Bienvenue, Zoë 🎉\n   café ☕\n" in printed
    (path,) = tmp_path.iterdir()
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert parsed["Subject"] == "Bienvenue, Zoë 🎉"
    assert parsed["X-Lifecycle-Message-Id"] == "m-ü"
    assert [p.get_content().strip() for p in parsed.iter_parts()] == ["café ☕", "<p>café</p>"]


def test_the_fake_answers_other_requests_while_one_is_delayed(own_fake: FakeProvider) -> None:
    fake = own_fake
    sendgrid = SendGridEmailChannel(fake.sendgrid_api_key, FROM_EMAIL, "L", host=fake.url)
    twilio = TwilioSmsChannel(
        fake.twilio_account_sid, fake.twilio_auth_token, FROM_NUMBER, base_url=fake.url
    )
    fake.delay(3, path="twilio")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(twilio.send, Sms("slow", "+15558675310", "Hi"))
        time.sleep(0.05)
        sendgrid.send(welcome())
        assert not slow.done()  # the email was answered while the SMS still waits
        assert isinstance(slow.result(timeout=5), Sent)
    assert [r.status for r in fake.requests] == [202, 201]

"""Dispatch through the real SendGrid and Twilio SDKs against the local fake provider.

Covers the exact payloads, retries of 429 and 503, permanent failures with the provider's
reason, suppression, a template failing for one message only, and the recovery rule for
a dispatcher killed between claim and provider call, and between provider success and
recording (in a real child process, killed with os._exit).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlmodel import Session

from engine.bootstrap import App, bootstrap
from engine.data.ingest import CustomerIn, upsert_customer
from engine.data.models import Message, MessageStatus, Suppression
from engine.delivery.dispatch import read_unsubscribe_token
from engine.runners.ticks import dispatch_tick
from engine.settings import Settings
from tests.support.fake_provider import FakeProvider
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)  # 13:00 in London: inside every window


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider.start() as provider:
        yield provider


def settings_for(db_url: str, fake: FakeProvider, outbox: Path) -> Settings:
    return Settings(
        database_url=db_url,
        rules_dir=FIXTURE_RULES,
        templates_dir=FIXTURE_TEMPLATES,
        outbox_dir=outbox,
        email_channel="sendgrid",
        sendgrid_api_key=fake.sendgrid_api_key,
        sendgrid_host=fake.url,
        sms_channel="twilio",
        twilio_account_sid=fake.twilio_account_sid,
        twilio_auth_token=fake.twilio_auth_token,
        twilio_from_number="+15005550006",
        twilio_base_url=fake.url,
        public_base_url="https://lifecycle.example",
        secret_key="test-secret",
    )


@pytest.fixture
def app(db: Engine, db_url: str, fake: FakeProvider, tmp_path: Path) -> App:
    fake.reset()
    fake.clear()
    return bootstrap(settings_for(db_url, fake, tmp_path / "outbox"), db=db, migrate=False)


def customer(app: App, customer_id: str = "ann", **fields: object) -> None:
    data = {
        "id": customer_id,
        "email": f"{customer_id}@example.com",
        "phone": "+447700900123",
        "first_name": "Ann",
        "email_opt_in": True,
        "sms_opt_in": True,
        "timezone": "Europe/London",
        "signed_up_at": NOW - timedelta(days=3),
        **fields,
    }
    with Session(app.db) as session:
        upsert_customer(session, CustomerIn(**data), NOW)
        session.commit()


def queue(
    app: App,
    customer_id: str = "ann",
    *,
    channel: str = "email",
    template: str = "welcome",
    playbook: str = "welcome_series",
    step: str | None = None,
) -> str:
    message_id = str(uuid.uuid4())
    with Session(app.db) as session:
        session.add(
            Message(
                id=message_id,
                dedupe_key=f"test:{message_id}",
                customer_id=customer_id,
                playbook=playbook,
                step_id=step or template,
                kind="marketing",
                channel=channel,
                template=template,
                to_address="",
                context={"event": {}},
                status=MessageStatus.QUEUED,
                due_at=NOW,
                created_at=NOW,
                updated_at=NOW,
            )
        )
        session.commit()
    return message_id


def message(app: App, message_id: str) -> Message:
    with Session(app.db) as session:
        found = session.get(Message, message_id)
        assert found is not None
        return found


def test_email_payload_through_the_sendgrid_sdk(app: App, fake: FakeProvider) -> None:
    customer(app)
    message_id = queue(app)
    report = dispatch_tick(app, NOW)
    assert report.sent == {"email": 1}
    (email,) = fake.sent_emails()
    assert email.to == ["ann@example.com"]
    assert email.from_email == "hello@lifecycle.example"
    assert email.subject == "Welcome to Lifecycle Shop, Ann!"
    assert email.content_types == ["text/plain", "text/html"]
    assert email.text is not None and "Welcome, Ann!" in email.text
    assert email.html is not None and "<h1>Welcome, Ann!</h1>" in email.html
    assert email.custom_args["lifecycle_message_id"] == message_id
    assert email.categories == ["welcome_series"]
    assert email.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    mailto, url = [part.strip(" <>") for part in email.headers["List-Unsubscribe"].split(",")]
    assert mailto.startswith("mailto:unsubscribe@lifecycle.example?subject=unsubscribe-")
    assert url.startswith("https://lifecycle.example/u/")
    token = url.rsplit("/", 1)[1]
    # the link names the message's topic (the fixture welcome series: product_news)
    assert read_unsubscribe_token("test-secret", token) == (
        "ann",
        "email",
        message_id,
        "product_news",
    )
    assert url in email.text  # the footer link is the same signed one
    stored = message(app, message_id)
    assert stored.status == MessageStatus.SENT
    assert stored.provider == "sendgrid" and stored.provider_id == email.x_message_id
    assert stored.to_address == "ann@example.com"


def test_sms_payload_through_the_twilio_sdk(app: App, fake: FakeProvider) -> None:
    customer(app)
    message_id = queue(app, channel="sms", template="last_chance", playbook="re_engagement")
    dispatch_tick(app, NOW)
    (sms,) = fake.sent_sms()
    assert sms.to == "+447700900123"
    assert sms.from_ == "+15005550006"
    assert (
        sms.body
        == "Lifecycle Shop: Ann, last chance for 15% off with code COMEBACK15, ends Sunday. Reply STOP to opt out."
    )
    assert sms.status_callback == "https://lifecycle.example/webhooks/twilio/status"
    assert message(app, message_id).provider_id == sms.sid


@pytest.mark.parametrize("status", [429, 503])
def test_transient_errors_are_retried_until_they_succeed(
    app: App, fake: FakeProvider, status: int
) -> None:
    customer(app)
    message_id = queue(app)
    fake.fail_next(2, status, path="/v3/mail/send", reset_after_s=30)
    first = dispatch_tick(app, NOW)
    assert first.retried == 1 and first.total_sent == 0
    retry = message(app, message_id)
    assert retry.status == MessageStatus.QUEUED and retry.attempts == 1
    assert f"HTTP {status}" in (retry.last_error or "")
    assert retry.due_at > NOW
    if status == 429:  # the rate-limit reset is honoured, not the generic backoff
        assert abs((retry.due_at - NOW).total_seconds() - 30) < 2
    dispatch_tick(app, retry.due_at)
    again = message(app, message_id)
    assert again.status == MessageStatus.QUEUED and again.attempts == 2
    dispatch_tick(app, again.due_at)
    done = message(app, message_id)
    assert done.status == MessageStatus.SENT and done.attempts == 3
    assert len(fake.sent_emails()) == 1


def test_a_400_fails_the_row_with_the_providers_message(app: App, fake: FakeProvider) -> None:
    customer(app)
    message_id = queue(app)
    fake.fail_next(
        1,
        400,
        path="/v3/mail/send",
        message="The from address does not match a verified Sender Identity.",
    )
    report = dispatch_tick(app, NOW)
    assert report.failed == 1
    failed = message(app, message_id)
    assert failed.status == MessageStatus.FAILED
    assert "The from address does not match a verified Sender Identity." in (
        failed.last_error or ""
    )
    dispatch_tick(app, NOW + timedelta(hours=2))
    assert fake.sent_emails() == []


def test_an_invalid_number_fails_and_suppresses_it(app: App, fake: FakeProvider) -> None:
    customer(app)
    fake.reject_number("+447700900123", 21211)
    message_id = queue(app, channel="sms", template="last_chance", playbook="re_engagement")
    dispatch_tick(app, NOW)
    assert message(app, message_id).status == MessageStatus.FAILED
    with Session(app.db) as session:
        (suppression,) = session.scalars(select(Suppression))
    assert (suppression.channel, suppression.address) == ("sms", "+447700900123")
    # The next SMS to that number is not even attempted.
    later = queue(app, channel="sms", template="loyalty_reward_sms", playbook="loyalty_reward")
    dispatch_tick(app, NOW)
    assert message(app, later).status == MessageStatus.CANCELLED
    assert (
        message(app, later).last_error
        == "at send time: no phone number, or the number is suppressed"
    )


def test_a_broken_template_fails_one_message_not_the_batch(
    app: App, fake: FakeProvider, tmp_path: Path
) -> None:
    customer(app)
    customer(app, "bob", first_name="Bob")
    broken_dir = tmp_path / "templates"
    import shutil

    shutil.copytree(FIXTURE_TEMPLATES, broken_dir)
    (broken_dir / "email" / "tips_broken.subject").write_text("{{ customer.nickname }}\n")
    (broken_dir / "email" / "tips_broken.html").write_text("<p>x</p>\n")
    (broken_dir / "email" / "tips_broken.txt").write_text("x\n")
    from engine.delivery.templates import TemplateStore

    app.templates = TemplateStore(broken_dir)
    bad = queue(app, "ann", template="tips_broken")
    good = queue(app, "bob")
    report = dispatch_tick(app, NOW)
    assert report.failed == 1 and report.total_sent == 1
    assert message(app, good).status == MessageStatus.SENT
    failed = message(app, bad)
    assert failed.status == MessageStatus.FAILED
    assert (
        failed.last_error is not None
        and "render failed: template email/tips_broken.subject" in failed.last_error
    )
    assert "nickname" in failed.last_error


CHILD = textwrap.dedent(
    """
    import os, sys
    from datetime import datetime
    from engine.bootstrap import bootstrap
    from engine.delivery.dispatch import Dispatcher
    from engine.settings import Settings
    from engine.runners.ticks import dispatch_config
    settings = Settings.model_validate_json(sys.argv[1])
    app = bootstrap(settings, migrate=False)
    die_at = sys.argv[2]
    hooks = {die_at: lambda ids: os._exit(17)}
    dispatcher = Dispatcher(app.db, app.rules, app.templates, app.channels, dispatch_config(app), hooks=hooks)
    dispatcher.run_once(datetime.fromisoformat(sys.argv[3]))
    os._exit(0)
    """
)


def run_dispatcher_that_dies(settings: Settings, die_at: str) -> int:
    payload = settings.model_dump_json()
    # SecretStr fields dump as '**********': pass the real values through.
    import json

    data = json.loads(payload)
    for name in (
        "sendgrid_api_key",
        "twilio_auth_token",
        "secret_key",
        "api_key",
        "staff_passwords",
    ):
        value = getattr(settings, name, None)
        data[name] = value.get_secret_value() if value is not None else None
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(data, default=str), die_at, NOW.isoformat()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode


def test_killed_between_claim_and_provider_call_nothing_lost_nothing_twice(
    app: App, fake: FakeProvider
) -> None:
    customer(app)
    message_id = queue(app)
    assert run_dispatcher_that_dies(app.settings, "claimed") == 17
    stuck = message(app, message_id)
    assert stuck.status == MessageStatus.SENDING and stuck.attempted_at is None
    assert fake.sent_emails() == []
    # Within the lease nobody touches it; after the lease it is requeued and sent once.
    assert dispatch_tick(app, NOW + timedelta(minutes=1)).claimed == 0
    report = dispatch_tick(app, NOW + timedelta(minutes=6))
    assert report.requeued_after_crash == 1 and report.sent == {"email": 1}
    assert [e.message_id for e in fake.sent_emails()] == [message_id]
    assert message(app, message_id).status == MessageStatus.SENT


def test_killed_after_provider_success_the_message_is_marked_ambiguous_not_resent(
    app: App, fake: FakeProvider
) -> None:
    customer(app)
    message_id = queue(app)
    assert run_dispatcher_that_dies(app.settings, "sent") == 17
    assert [e.message_id for e in fake.sent_emails()] == [message_id]
    stuck = message(app, message_id)
    assert stuck.status == MessageStatus.SENDING and stuck.attempted_at is not None
    report = dispatch_tick(app, NOW + timedelta(minutes=6))
    assert report.marked_ambiguous == 1 and report.total_sent == 0
    ambiguous = message(app, message_id)
    assert ambiguous.status == MessageStatus.AMBIGUOUS
    assert (
        ambiguous.last_error
        == "ambiguous: its dispatcher stopped after calling the provider; not resent"
    )
    dispatch_tick(app, NOW + timedelta(hours=1))
    assert len(fake.sent_emails()) == 1  # at most once: never sent again by itself

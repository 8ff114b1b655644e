"""Dispatch through the real SendGrid and Twilio SDKs against the local fake provider.

Covers the exact payloads, retries of 429 and 503, permanent failures with the provider's
reason, suppression, a template failing for one message only, and exactly once message by
message: the recovery rule for a dispatcher killed between claim and provider call,
during it and after it (real child processes, killed with os._exit or SIGKILL), a crash
mid-batch leaving in doubt only the calls in flight, a channel that raises anything
failing only its own message, a webhook that lands before the record winning, and
leases that hold through a long send and keep two dispatchers apart.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update
from sqlmodel import Session, col

from channels.memory import MemoryChannel
from channels.webhooks import SendGridEvent, parse_sendgrid_events
from engine.bootstrap import App, bootstrap
from engine.data.ingest import CustomerIn, upsert_customer
from engine.data.models import Decision, Message, MessageStatus, Suppression
from engine.delivery.dispatch import Dispatcher, DispatchReport, read_unsubscribe_token
from engine.delivery.outbound import Email, Sent, Sms
from engine.runners.ticks import dispatch_config, dispatch_tick
from engine.settings import Settings
from engine.usecases.ledger import apply_sendgrid_events, apply_twilio_status
from tests.support.fake_provider import FakeProvider
from tests.support.outbox import queue_for_many
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
        dispatch_settle_grace_seconds=0,
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
    assert sms.status_callback == (
        f"https://lifecycle.example/webhooks/twilio/status?lifecycle_message_id={message_id}"
    )
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


def dispatcher(
    app: App,
    *,
    channels: dict[str, Any] | None = None,
    hooks: dict[str, Callable[[list[str]], None]] | None = None,
    **config: Any,
) -> Dispatcher:
    """A dispatcher like the tick's, with test hooks and config changes."""
    return Dispatcher(
        app.db,
        app.rules,
        app.templates,
        channels if channels is not None else app.channels,
        replace(dispatch_config(app), **config),
        hooks=hooks,
    )


def run(dispatch: Dispatcher, now: datetime) -> DispatchReport:
    try:
        return dispatch.run_once(now)
    finally:
        dispatch.close()


def many(app: App, count: int, channel: str) -> dict[str, str]:
    """``count`` customers with one queued message each; message id by recipient."""
    return queue_for_many(app.db, count, (channel,), NOW, prefix=channel)


def all_messages(app: App) -> list[Message]:
    with Session(app.db) as session:
        return list(session.scalars(select(Message)))


def expire_leases(app: App) -> None:
    """What five minutes after a dispatcher died look like: its leases have run out."""
    with Session(app.db) as session:
        session.execute(
            update(Message)
            .where(col(Message.status) == MessageStatus.SENDING)
            .values(lease_expires_at=datetime(2000, 1, 1, tzinfo=UTC))
        )
        session.commit()


# ── a dispatcher that dies: the recovery rule ───────────────────────────────────────

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


def child_command(settings: Settings, die_at: str) -> list[str]:
    """The command of a dispatcher process that exits with 17 at hook ``die_at``
    (``never``: it runs to the end)."""
    data = json.loads(settings.model_dump_json())
    # SecretStr fields dump as '**********': pass the real values through.
    for name in (
        "sendgrid_api_key",
        "twilio_auth_token",
        "secret_key",
        "api_key",
        "staff_passwords",
    ):
        value = getattr(settings, name, None)
        data[name] = value.get_secret_value() if value is not None else None
    return [sys.executable, "-c", CHILD, json.dumps(data, default=str), die_at, NOW.isoformat()]


def run_dispatcher_that_dies(settings: Settings, die_at: str) -> int:
    result = subprocess.run(
        child_command(settings, die_at), cwd=ROOT, capture_output=True, text=True, timeout=120
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
    assert stuck.lease_expires_at is not None and stuck.claim_token
    assert fake.sent_emails() == []
    # Within its lease nobody touches it, whatever a tick's own now says...
    assert dispatch_tick(app, NOW + timedelta(days=1)).claimed == 0
    # ...and once the lease has run out it is requeued and sent once.
    expire_leases(app)
    report = dispatch_tick(app, NOW + timedelta(minutes=1))
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
    expire_leases(app)
    report = dispatch_tick(app, NOW + timedelta(minutes=1))
    assert report.marked_ambiguous == 1 and report.total_sent == 0
    ambiguous = message(app, message_id)
    assert ambiguous.status == MessageStatus.AMBIGUOUS
    assert ambiguous.last_error == (
        "ambiguous: its dispatcher stopped during the provider call; "
        "not resent unless the provider shows it never arrived"
    )
    dispatch_tick(app, NOW + timedelta(hours=1))
    assert len(fake.sent_emails()) == 1  # never sent again by itself


# ── point 6: settling what a crash left ambiguous ────────────────────────────────────


def sms_to_ann(app: App) -> str:
    customer(app)
    return queue(app, channel="sms", template="last_chance", playbook="re_engagement")


def decisions_of(app: App, message_id: str) -> list[tuple[str, str]]:
    with Session(app.db) as session:
        rows = session.scalars(select(Decision).where(col(Decision.message_id) == message_id))
        return [(d.outcome, d.reason) for d in rows]


def test_an_ambiguous_sms_that_twilio_received_is_settled_with_its_sid_not_resent(
    app: App, fake: FakeProvider
) -> None:
    message_id = sms_to_ann(app)
    assert run_dispatcher_that_dies(app.settings, "sent") == 17
    (sms,) = fake.sent_sms()
    expire_leases(app)
    report = dispatch_tick(app, NOW + timedelta(minutes=1))
    assert (report.marked_ambiguous, report.settled, report.total_sent) == (1, 1, 0)
    settled = message(app, message_id)
    assert (settled.status, settled.provider, settled.provider_id) == (
        MessageStatus.SENT,
        "twilio",
        sms.sid,
    )
    note = f"settled: twilio has it as {sms.sid} (queued)"
    assert settled.last_error == note
    assert decisions_of(app, message_id) == [("sent", note)]
    lookups = [r for r in fake.requests if r.method == "GET"]
    assert [r.path for r in lookups] == [
        f"/2010-04-01/Accounts/{fake.twilio_account_sid}/Messages.json"
    ]
    dispatch_tick(app, NOW + timedelta(hours=1))
    assert len(fake.sent_sms()) == 1


def test_an_ambiguous_sms_that_twilio_never_received_is_sent_again_once(
    app: App, fake: FakeProvider
) -> None:
    message_id = sms_to_ann(app)
    assert run_dispatcher_that_dies(app.settings, "attempted") == 17
    assert fake.sent_sms() == []
    assert message(app, message_id).attempted_at is not None  # marked: it may have gone out
    expire_leases(app)
    report = dispatch_tick(app, NOW + timedelta(minutes=1))
    assert (report.marked_ambiguous, report.settled_requeued) == (1, 1)
    assert report.sent == {"sms": 1}  # requeued, then sent in the same tick
    (sms,) = fake.sent_sms()
    sent = message(app, message_id)
    assert (sent.status, sent.provider_id) == (MessageStatus.SENT, sms.sid)
    dispatch_tick(app, NOW + timedelta(hours=1))
    assert len(fake.sent_sms()) == 1


def test_an_ambiguous_sms_stays_ambiguous_while_twilio_cannot_tell_and_settles_later(
    app: App, fake: FakeProvider
) -> None:
    message_id = sms_to_ann(app)
    assert run_dispatcher_that_dies(app.settings, "attempted") == 17
    expire_leases(app)
    fake.fail_next(1, 503, path="twilio", method="GET")
    report = dispatch_tick(app, NOW + timedelta(minutes=1))
    assert (report.marked_ambiguous, report.still_ambiguous, report.total_sent) == (1, 1, 0)
    waiting = message(app, message_id)
    assert waiting.status == MessageStatus.AMBIGUOUS
    assert waiting.last_error is not None
    assert waiting.last_error.startswith("settlement: twilio: provider error: ")
    assert waiting.last_error.endswith("HTTP 503 · code 20503; asking again later")
    # Not asked again at every tick: only once settle_retry has passed.
    assert dispatch_tick(app, NOW + timedelta(minutes=2)).still_ambiguous == 0
    assert len([r for r in fake.requests if r.method == "GET"]) == 1
    with Session(app.db) as session:
        session.execute(
            update(Message)
            .where(col(Message.id) == message_id)
            .values(settle_after=datetime(2000, 1, 1, tzinfo=UTC))
        )
        session.commit()
    later = dispatch_tick(app, NOW + timedelta(minutes=10))
    assert (later.settled_requeued, later.sent) == (1, {"sms": 1})
    assert len(fake.sent_sms()) == 1


def test_an_ambiguous_email_is_settled_by_sendgrids_events(app: App, fake: FakeProvider) -> None:
    customer(app)
    message_id = queue(app)
    assert run_dispatcher_that_dies(app.settings, "sent") == 17
    expire_leases(app)
    report = dispatch_tick(app, NOW + timedelta(minutes=1))
    # SendGrid cannot be asked: the row waits for its events.
    assert (report.marked_ambiguous, report.settled, report.still_ambiguous) == (1, 0, 0)
    assert message(app, message_id).status == MessageStatus.AMBIGUOUS
    processed = parse_sendgrid_events(json.dumps(fake.sendgrid_events(["processed"])))
    apply_sendgrid_events(app.db, processed, NOW)
    (email,) = fake.sent_emails()
    settled = message(app, message_id)
    assert (settled.status, settled.provider_id) == (MessageStatus.SENT, email.x_message_id)
    delivered = parse_sendgrid_events(json.dumps(fake.sendgrid_events(["delivered"])))
    apply_sendgrid_events(app.db, delivered, NOW)
    assert message(app, message_id).status == MessageStatus.DELIVERED
    dispatch_tick(app, NOW + timedelta(hours=1))
    assert len(fake.sent_emails()) == 1


# ── point 5: only the calls in flight are in doubt ─────────────────────────────────


def test_a_crash_mid_batch_leaves_in_doubt_only_the_messages_in_flight(
    app: App, fake: FakeProvider
) -> None:
    by_number = many(app, 200, "sms")
    fake.delay(0.005, path="twilio")  # slow enough that the kill lands mid-batch
    child = subprocess.Popen(
        child_command(app.settings, "never"),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while len(fake.sent_sms()) < 60 and child.poll() is None:
            assert time.monotonic() < deadline, "the dispatcher never got going"
            time.sleep(0.002)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, "the dispatcher finished before the kill"
    assert 60 <= len(fake.sent_sms()) < 200
    expire_leases(app)
    report = run(dispatcher(app), NOW)  # the recovery rule, settlement, then the rest
    assert report.marked_ambiguous <= dispatch_config(app).send_threads  # the calls in flight
    assert report.settled + report.settled_requeued == report.marked_ambiguous
    numbers = [sms.to for sms in fake.sent_sms()]
    assert sorted(numbers) == sorted(by_number)  # each number once: none twice, none lost
    assert {m.status for m in all_messages(app)} == {MessageStatus.SENT}


# ── point 7: one message's failure stays with that message ──────────────────────────


class BrokenFor(MemoryChannel):
    """A channel with a bug: it raises KeyError for one recipient."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address

    def send(self, message: Email | Sms) -> Sent:
        if message.to == self.address:
            raise KeyError("boom")
        return super().send(message)


def test_a_channel_that_raises_anything_fails_only_its_own_message(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    by_address = many(app, 20, "email")
    broken_address = "email-00007@example.com"
    broken = BrokenFor(broken_address)
    channels = {"email": broken, "sms": broken}
    with caplog.at_level(logging.ERROR):
        report = run(dispatcher(app, channels=channels), NOW)
    assert (report.sent, report.retried, report.failed) == ({"email": 19}, 1, 0)
    assert sorted(e.to for e in broken.emails()) == sorted(set(by_address) - {broken_address})
    retry = message(app, by_address[broken_address])
    assert retry.status == MessageStatus.QUEUED and retry.attempted_at is None
    assert retry.last_error is not None
    assert retry.last_error.startswith("attempt 1: memory: the channel raised KeyError: 'boom'")
    (logged,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "channel memory raised KeyError sending" in logged.getMessage()
    assert logged.exc_info is not None  # the traceback: a bug in a channel must be visible
    others = [m for m in all_messages(app) if m.id != retry.id]
    assert {m.status for m in others} == {MessageStatus.SENT}
    # Retried with backoff until the retry limit, then failed with the reason.
    for _ in range(dispatch_config(app).max_attempts - 1):
        run(dispatcher(app, channels=channels), message(app, retry.id).due_at)
    failed = message(app, retry.id)
    assert failed.status == MessageStatus.FAILED
    assert failed.last_error == (
        "gave up after 6 attempts: memory: the channel raised KeyError: 'boom'"
    )
    assert len(broken.emails()) == 19


# ── point 8: a webhook that lands before the record wins ────────────────────────────


@pytest.mark.parametrize(
    ("channel", "webhook", "final"),
    [
        ("email", "delivered", MessageStatus.DELIVERED),
        ("email", "bounce", MessageStatus.BOUNCED),
        ("sms", "delivered", MessageStatus.DELIVERED),
        ("sms", "undelivered", MessageStatus.FAILED),
    ],
)
def test_a_webhook_that_lands_before_the_record_is_never_overwritten_by_sent(
    app: App, fake: FakeProvider, channel: str, webhook: str, final: MessageStatus
) -> None:
    customer(app)
    if channel == "email":
        message_id = queue(app)
    else:
        message_id = queue(app, channel="sms", template="last_chance", playbook="re_engagement")

    def webhook_first(ids: list[str]) -> None:
        """The provider's webhook arrives between its answer and our record."""
        if channel == "email":
            (email,) = fake.sent_emails()
            event = SendGridEvent(
                event=webhook,
                email=email.to[0],
                timestamp=int(NOW.timestamp()),
                sg_event_id=f"ev-{webhook}",
                sg_message_id=f"{email.x_message_id}.filter0001.1",
                lifecycle_message_id=message_id,
                reason="550 5.1.1 no such user" if webhook == "bounce" else None,
            )
            apply_sendgrid_events(app.db, [event], NOW)
        else:
            (sms,) = fake.sent_sms()
            code = "30006" if webhook == "undelivered" else ""
            apply_twilio_status(app.db, sms.sid, webhook, code, sms.to, NOW, message_id)

    report = run(dispatcher(app, hooks={"sent": webhook_first}), NOW)
    assert report.sent == {channel: 1}
    stored = message(app, message_id)
    assert stored.status == final  # not moved back to sent
    provider_ids = [e.x_message_id for e in fake.sent_emails()] + [s.sid for s in fake.sent_sms()]
    assert [stored.provider_id] == provider_ids
    with Session(app.db) as session:
        outcomes = [d.outcome for d in session.scalars(select(Decision))]
    assert outcomes == ["sent"]


def test_an_outcome_is_not_recorded_once_another_dispatcher_holds_the_claim(
    app: App, fake: FakeProvider
) -> None:
    """The other guard of point 8: the claim. While this dispatcher's call was in flight,
    its lease ran out and another dispatcher claimed the row again (after settlement found
    nothing at the provider yet and requeued it). The late answer must not overwrite the
    new claim's row; the new claim records its own outcome."""
    message_id = sms_to_ann(app)

    def taken_over(ids: list[str]) -> None:
        with Session(app.db) as session:
            session.execute(
                update(Message)
                .where(col(Message.id) == message_id)
                .values(claimed_by="another-dispatcher", claim_token="another-claim")
            )
            session.commit()

    report = run(dispatcher(app, hooks={"sent": taken_over}), NOW)
    assert (report.sent, report.claims_lost) == ({}, 1)
    stored = message(app, message_id)
    assert stored.status == MessageStatus.SENDING  # still the other dispatcher's to record
    assert (stored.claim_token, stored.provider_id, stored.sent_at) == ("another-claim", None, None)
    assert decisions_of(app, message_id) == []


# ── point 9: leases on one clock ────────────────────────────────────────────────────


def test_a_long_send_keeps_its_lease_and_no_other_dispatcher_takes_it(
    app: App, fake: FakeProvider
) -> None:
    customer(app)
    message_id = queue(app, channel="sms", template="last_chance", playbook="re_engagement")
    lease = timedelta(seconds=0.6)
    fake.delay(1.8, path="twilio")  # the provider call lasts three leases
    in_call = threading.Event()
    first = dispatcher(app, lease=lease, hooks={"attempted": lambda ids: in_call.set()})
    result: list[DispatchReport] = []
    sending = threading.Thread(target=lambda: result.append(run(first, NOW)))
    sending.start()
    try:
        assert in_call.wait(timeout=30), "the first dispatcher never made its call"
        time.sleep(3 * lease.total_seconds() / 2)  # past the lease, had it not been renewed
        # Another dispatcher whose clock says a day later finds nothing to take over.
        other = run(dispatcher(app, lease=lease), NOW + timedelta(days=1))
    finally:
        sending.join(timeout=60)
    assert (other.claimed, other.requeued_after_crash, other.marked_ambiguous) == (0, 0, 0)
    assert result[0].sent == {"sms": 1}
    assert [s.to for s in fake.sent_sms()] == ["+447700900123"]
    stored = message(app, message_id)
    assert stored.status == MessageStatus.SENT and stored.provider_id == fake.sent_sms()[0].sid


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_two_dispatchers_claiming_at_once_on_postgresql_send_every_message_once(
    app: App, fake: FakeProvider
) -> None:
    by_number = many(app, 300, "sms")
    fake.delay(0.002, path="twilio")
    claimed: dict[str, list[str]] = {"first": [], "second": []}
    batch_sizes: list[int] = []
    first_claimed = threading.Event()

    def on_claim(name: str) -> Callable[[list[str]], None]:
        def hook(ids: list[str]) -> None:
            claimed[name].extend(ids)
            batch_sizes.append(len(ids))
            first_claimed.set()

        return hook

    reports: dict[str, DispatchReport] = {}

    def work(name: str, now: datetime) -> None:
        one = dispatcher(app, batch_size=25, send_threads=4, hooks={"claimed": on_claim(name)})
        reports[name] = run(one, now)

    first = threading.Thread(target=work, args=("first", NOW))
    # The second's clock is ten minutes ahead, past the first's lease if leases were
    # compared with a tick's own now.
    second = threading.Thread(target=work, args=("second", NOW + timedelta(minutes=10)))
    first.start()
    assert first_claimed.wait(timeout=30)
    second.start()
    first.join(timeout=120)
    second.join(timeout=120)
    assert claimed["first"] and claimed["second"], "both dispatchers claimed batches"
    assert max(batch_sizes) == 25  # a claim takes one batch, not everything due
    assert not set(claimed["first"]) & set(claimed["second"])
    assert sorted(claimed["first"] + claimed["second"]) == sorted(by_number.values())
    for report in reports.values():
        assert (report.requeued_after_crash, report.marked_ambiguous, report.claims_lost) == (
            0,
            0,
            0,
        )
    assert sum(r.total_sent for r in reports.values()) == 300
    numbers = [s.to for s in fake.sent_sms()]
    assert sorted(numbers) == sorted(by_number)  # each once
    assert {m.status for m in all_messages(app)} == {MessageStatus.SENT}

"""The crash test of exactly once: kill -9 a real dispatcher mid-batch, restart, settle, count.

Each kill point: 2,000 messages (1,000 emails through the SendGrid SDK, 1,000 SMS through
the Twilio SDK, to the local fake provider), ``lifecycle dispatch`` as a real process,
SIGKILL at a random moment (after a random number of provider requests, plus a random few
milliseconds), SendGrid's signed event webhook posted to the app for what the fake
received (once right after the kill, once at the end, as SendGrid posts as it goes),
``lifecycle dispatch`` run again until nothing is left to do (the dead dispatcher's lease
has to run out first: 2 s here). Then what the provider received is counted per
recipient: no message received twice, none lost, and no row left ambiguous that the
provider could settle (the only rows allowed to stay ambiguous are emails SendGrid never
received: it cannot be asked, and sends no event for what it does not have).

``make test`` runs one kill point per database; ``make crash-test`` runs ten
(``LIFECYCLE_CRASH_KILL_POINTS=10``) and prints the counts (``LIFECYCLE_CRASH_REPORT``).
``LIFECYCLE_CRASH_SEED`` changes the random kill moments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlmodel import Session

from engine.bootstrap import bootstrap
from engine.data.models import Message, MessageStatus
from engine.settings import Settings
from engine.web.app import create_app
from tests.support.fake_provider import (
    FakeProvider,
    post_sendgrid_events,
    sendgrid_webhook_keypair,
)
from tests.support.outbox import queue_for_many
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES
from tests.support.server import serve

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)  # 13:00 in London: inside every window
PER_CHANNEL = 1000
KILL_POINTS = int(os.environ.get("LIFECYCLE_CRASH_KILL_POINTS", "1"))
SEED = int(os.environ.get("LIFECYCLE_CRASH_SEED", "20261201"))
LEASE_SECONDS = 2
SEND_THREADS = 8
DISPATCHER = "from engine.cli import app; app(prog_name='lifecycle')"


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider.start() as provider:
        yield provider


@pytest.fixture
def webhooks(db: Engine, db_url: str, tmp_path: Path) -> Iterator[str]:
    """The web app (real clock), serving the SendGrid event webhook on 127.0.0.1."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=db_url,
        rules_dir=FIXTURE_RULES,
        templates_dir=FIXTURE_TEMPLATES,
        outbox_dir=tmp_path / "outbox",
        secret_key="crash-test-secret",
        sendgrid_webhook_public_key=sendgrid_webhook_keypair().public_key,
    )
    application = bootstrap(settings, db=db, channels={}, migrate=False)
    with serve(create_app(application)) as base_url:
        yield f"{base_url}/webhooks/sendgrid"


def environment(db_url: str, fake: FakeProvider, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LIFECYCLE_DATABASE_URL": db_url,
        "LIFECYCLE_RULES_DIR": str(FIXTURE_RULES),
        "LIFECYCLE_TEMPLATES_DIR": str(FIXTURE_TEMPLATES),
        "LIFECYCLE_OUTBOX_DIR": str(tmp_path / "outbox"),
        "LIFECYCLE_SECRET_KEY": "crash-test-secret",
        "LIFECYCLE_PUBLIC_BASE_URL": "https://lifecycle.example",
        "LIFECYCLE_EMAIL_CHANNEL": "sendgrid",
        "LIFECYCLE_SENDGRID_API_KEY": fake.sendgrid_api_key,
        "LIFECYCLE_SENDGRID_HOST": fake.url,
        "LIFECYCLE_SMS_CHANNEL": "twilio",
        "LIFECYCLE_TWILIO_ACCOUNT_SID": fake.twilio_account_sid,
        "LIFECYCLE_TWILIO_AUTH_TOKEN": fake.twilio_auth_token,
        "LIFECYCLE_TWILIO_FROM_NUMBER": "+15005550006",
        "LIFECYCLE_TWILIO_BASE_URL": fake.url,
        "LIFECYCLE_DISPATCH_LEASE_SECONDS": str(LEASE_SECONDS),
        "LIFECYCLE_DISPATCH_SEND_THREADS": str(SEND_THREADS),
        "LIFECYCLE_DISPATCH_SETTLE_GRACE_SECONDS": "0.5",
        "LIFECYCLE_DISPATCH_SETTLE_RETRY_SECONDS": "1",
        "LIFECYCLE_DISPATCH_SETTLE_PER_TICK": "100",
    }


def statuses(db: Engine) -> dict[str, Message]:
    with Session(db) as session:
        return {m.id: m for m in session.scalars(select(Message))}


def dispatch(env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", DISPATCHER, "dispatch", "--now", NOW.isoformat()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kill_point", range(KILL_POINTS))
def test_kill_9_mid_batch_then_restart_each_message_once_none_lost(
    db: Engine,
    db_url: str,
    fake: FakeProvider,
    webhooks: str,
    tmp_path: Path,
    kill_point: int,
) -> None:
    by_recipient = queue_for_many(db, PER_CHANNEL, ("email", "sms"), NOW, prefix="crash")
    total = len(by_recipient)
    env = environment(db_url, fake, tmp_path)
    rng = random.Random(SEED * 100 + kill_point)
    kill_after = rng.randrange(50, total - 50)  # provider requests before the kill
    extra_ms = rng.uniform(0, 20)
    first = subprocess.Popen(
        [sys.executable, "-c", DISPATCHER, "dispatch", "--now", NOW.isoformat()],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(fake.requests) < kill_after and first.poll() is None:
            assert time.monotonic() < deadline, "the dispatcher never got going"
            time.sleep(0.001)
        time.sleep(extra_ms / 1000)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        _, errors = first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL, f"it finished before the kill: {errors}"
    received_at_kill = len(fake.requests)
    # The rows in doubt: marked attempted just before their call, the outcome unrecorded.
    in_flight = {
        m.id: m.channel
        for m in statuses(db).values()
        if m.status == MessageStatus.SENDING and m.attempted_at is not None
    }
    post_sendgrid_events(webhooks, fake.sendgrid_events(), sendgrid_webhook_keypair().private_key)

    # Restart until nothing is left to send or to settle (the lease runs out after 2 s).
    runs = 0
    deadline = time.monotonic() + 120
    while True:
        dispatch(env)
        runs += 1
        rows = statuses(db).values()
        busy = [m for m in rows if m.status in (MessageStatus.QUEUED, MessageStatus.SENDING)]
        asking = [m for m in rows if m.status == MessageStatus.AMBIGUOUS and m.channel == "sms"]
        if not busy and not asking:
            break
        assert time.monotonic() < deadline, f"still {len(busy)} to send, {len(asking)} to settle"
        time.sleep(0.5)
    post_sendgrid_events(webhooks, fake.sendgrid_events(), sendgrid_webhook_keypair().private_key)

    received = Counter(e.to[0] for e in fake.sent_emails()) + Counter(s.to for s in fake.sent_sms())
    rows_by_id = statuses(db)
    final = {to: rows_by_id[mid] for to, mid in by_recipient.items()}
    recipient = {mid: to for to, mid in by_recipient.items()}
    duplicates = sum(n - 1 for n in received.values() if n > 1)
    lost = [to for to, m in final.items() if received[to] == 0 and m.status != "ambiguous"]
    ambiguous = [to for to, m in final.items() if m.status == MessageStatus.AMBIGUOUS]
    settleable = [to for to in ambiguous if received[to] > 0]
    reached = {mid for mid in in_flight if received[recipient[mid]] > 0}
    result: dict[str, Any] = {
        "database": db.dialect.name,
        "kill_point": kill_point,
        "seed": SEED * 100 + kill_point,
        "killed_after_requests": received_at_kill,
        "messages": total,
        "in_flight_at_kill": len(in_flight),
        "in_flight_emails": sum(1 for c in in_flight.values() if c == "email"),
        "in_flight_provider_had": len(reached),
        "sms_resent_after_lookup": sum(
            1 for mid in in_flight if in_flight[mid] == "sms" and mid not in reached
        ),
        "received": sum(1 for to in by_recipient if received[to] > 0),
        "duplicates": duplicates,
        "lost": len(lost),
        "left_ambiguous": len(ambiguous),
        "left_ambiguous_provider_had": len(settleable),
        "dispatcher_runs_after_kill": runs,
    }
    print(f"\ncrash {json.dumps(result)}")
    report = os.environ.get("LIFECYCLE_CRASH_REPORT")
    if report:
        with open(report, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(result) + "\n")

    assert duplicates == 0, [to for to, n in received.items() if n > 1]
    assert lost == []
    assert settleable == []  # the provider has it: settled, not left for a person
    assert len(in_flight) <= SEND_THREADS  # only the calls in flight at the kill were in doubt
    # What may stay ambiguous: emails SendGrid never got (it cannot be asked).
    assert all(final[to].channel == "email" and received[to] == 0 for to in ambiguous)
    done = {m.status for to, m in final.items() if to not in ambiguous}
    assert done <= {MessageStatus.SENT, MessageStatus.DELIVERED}
    emails = [m for m in final.values() if m.channel == "email" and m.status != "ambiguous"]
    assert {m.status for m in emails} == {MessageStatus.DELIVERED}

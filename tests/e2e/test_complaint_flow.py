"""A complaint from the API to its resolution in the browser, on a fake clock.

A customer on the welcome series complains through the ingest API: one case opens, the
on-duty lead is notified through the console channel, marketing pauses; a second
complaint joins the case; the SLA breach notifies the next tier exactly once; resolving
the case in the console (real chromium) lets the paused welcome step go out.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from email import message_from_bytes
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlmodel import Session

from channels.console import ConsoleChannel
from engine.bootstrap import App, bootstrap
from engine.data.models import Escalation, EscalationStatus, Message, MessageStatus
from engine.runners.ticks import dispatch_tick, evaluation_tick, sla_tick
from engine.settings import Settings
from engine.web.app import create_app
from engine.web.auth import hash_password
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES
from tests.support.server import serve

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEY = "test-api-key"
STAFF, PASSWORD = "Priya Shah", "pass phrase for tests"


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(now: datetime) -> Clock:
    return Clock(now)


@pytest.fixture
def app(db_url: str, tmp_path: Path, clock: Clock) -> Iterator[App]:
    console = ConsoleChannel(tmp_path / "outbox", stream=None)
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=db_url,
        rules_dir=FIXTURE_RULES,
        templates_dir=FIXTURE_TEMPLATES,
        outbox_dir=tmp_path / "outbox",
        api_key=KEY,
        secret_key="complaint-flow-secret",
        staff_passwords=f"{STAFF}:{hash_password(PASSWORD, iterations=1_000)}",
    )
    application = bootstrap(
        settings, channels={"email": console, "sms": console}, clock=clock, migrate=False
    )
    yield application
    application.db.dispose()


def tick(app: App) -> None:
    now = app.clock()
    evaluation_tick(app, now, workers=0)
    sla_tick(app, now)
    dispatch_tick(app, now)


def staff_messages(app: App, what: str) -> list[Message]:
    with Session(app.db) as session:
        return list(
            session.scalars(select(Message).where(Message.kind == "staff", Message.step_id == what))
        )


def welcome_steps_sent(app: App) -> list[str]:
    with Session(app.db) as session:
        rows = session.scalars(
            select(Message.step_id).where(
                Message.customer_id == "ann",
                Message.playbook == "welcome_series",
                Message.status == MessageStatus.SENT,
            )
        )
        return [str(step) for step in rows]


def complaint_to_breach(app: App, clock: Clock, tmp_path: Path) -> int:
    """Everything up to the SLA breach; returns the case id."""
    api = TestClient(create_app(app))
    headers = {"Authorization": f"Bearer {KEY}"}
    start = clock.now
    customer = {
        "id": "ann",
        "email": "ann@example.com",
        "first_name": "Ann",
        "email_opt_in": True,
        "signed_up_at": start.isoformat(),
    }
    assert api.post("/v1/customers", json=customer).status_code == 401  # no key, nothing written
    assert api.post("/v1/customers", json=customer, headers=headers).status_code == 201
    signup = {
        "id": "ev-1",
        "customer_id": "ann",
        "type": "signed_up",
        "occurred_at": start.isoformat(),
    }
    assert api.post("/v1/events", json=signup, headers=headers).status_code == 201
    tick(app)
    assert welcome_steps_sent(app) == ["welcome"]

    clock.now = start + timedelta(days=1)
    complaint = {
        "id": "ev-2",
        "customer_id": "ann",
        "type": "complaint",
        "occurred_at": clock.now.isoformat(),
        "properties": {"reason": "Parcel arrived damaged", "severity": 2},
    }
    assert api.post("/v1/events", json=complaint, headers=headers).status_code == 201
    assert api.post("/v1/events", json=complaint, headers=headers).json()["status"] == "duplicate"
    tick(app)
    with Session(app.db) as session:
        (case,) = session.scalars(select(Escalation))
    assert case.status == EscalationStatus.OPEN and case.reason == "Parcel arrived damaged"
    (opened_email,) = [m for m in staff_messages(app, "opened") if m.channel == "email"]
    assert opened_email.to_address == "priya.shah@lifecycle.example"  # the on-duty tier-1 lead
    written = message_from_bytes((tmp_path / "outbox" / f"{opened_email.id}.eml").read_bytes())
    assert written["To"] == "priya.shah@lifecycle.example"
    # The playbook sets the priority by severity: 2 is normal...
    assert written["Subject"] == f"[NORMAL] New complaint case #{case.id} for ann"
    assert case.priority == "normal"

    clock.now = start + timedelta(days=1, hours=2)
    second = {
        **complaint,
        "id": "ev-3",
        "occurred_at": clock.now.isoformat(),
        "properties": {"reason": "Still no reply"},
    }
    assert api.post("/v1/events", json=second, headers=headers).status_code == 201
    tick(app)
    with Session(app.db) as session:
        cases = list(session.scalars(select(Escalation)))
    assert [c.id for c in cases] == [case.id]  # joined, not a second case
    # ...and one without a severity is high ('otherwise'), which raises the open case.
    assert cases[0].priority == "high"

    # Day 2: the tips step is due but marketing is paused while the case is open.
    clock.now = start + timedelta(days=2, hours=1)
    tick(app)
    assert welcome_steps_sent(app) == ["welcome"]

    # The 4-hour SLA passed long ago: tier 2 is told once, however many checks run.
    for _ in range(3):
        tick(app)
        clock.now += timedelta(minutes=30)
    breached = staff_messages(app, "breached")
    assert sorted((m.channel, m.to_address, m.status) for m in breached) == [
        ("email", "ana.lopes@lifecycle.example", MessageStatus.SENT),
        ("sms", "+447700900003", MessageStatus.SENT),
    ]
    return int(case.id)  # type: ignore[arg-type]


def test_complaint_breach_and_resolution_through_the_engine(
    app: App, clock: Clock, tmp_path: Path
) -> None:
    case_id = complaint_to_breach(app, clock, tmp_path)
    from engine.escalations import cases as escalations

    with Session(app.db) as session:
        escalations.resolve(session, case_id, "Refunded", "priya", clock.now)
        session.commit()
    tick(app)
    assert welcome_steps_sent(app) == ["welcome", "tips"]


@pytest.mark.browser
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"
)
def test_resolving_in_the_browser_resumes_marketing(
    app: App, clock: Clock, tmp_path: Path, db_url: str
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("the browser run uses SQLite; the engine flow runs on both databases above")
    case_id = complaint_to_breach(app, clock, tmp_path)
    from playwright.sync_api import expect, sync_playwright

    with serve(create_app(app)) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page()
        page.set_default_timeout(10_000)
        page.goto(f"{base}/console")
        page.fill("input[name=name]", STAFF)
        page.fill("input[name=password]", PASSWORD)
        page.click("button:has-text('Sign in')")
        row = page.locator("tr.case-row")
        expect(row).to_have_count(1)
        expect(row.locator(".badge.overdue")).to_have_text("overdue")
        row.locator("a", has_text=f"#{case_id}").click()
        page.click("button:has-text('Acknowledge')")
        expect(page.locator("#case-status")).to_have_text("acknowledged")
        page.fill("textarea[name=note]", "Refund issued, apologised.")
        page.click("button:has-text('Resolve')")
        expect(page.locator("#case-status")).to_have_text("resolved")
        browser.close()
    tick(app)
    assert welcome_steps_sent(app) == ["welcome", "tips"]

"""The support console in a real browser: Debian's chromium driven by Playwright.

The app runs under uvicorn on a free 127.0.0.1 port over a SQLite file, with a clock
fixed at ``now``; the cases are opened through engine.escalations.cases, as the complaint
playbook opens them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from engine.bootstrap import App
from engine.data.models import Customer, EscalationStatus
from engine.escalations import cases as escalations
from engine.web.app import create_app
from engine.web.auth import hash_password
from tests.support.server import serve, web_app

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
STAFF, PASSWORD = "Priya Shah", "correct horse battery"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's chromium is not installed at /usr/bin/chromium (make browser installs it)",
    ),
]


@pytest.fixture
def app(sqlite_template: Path, tmp_path: Path, now: datetime) -> Iterator[App]:
    path = tmp_path / "console.db"
    shutil.copy(sqlite_template, path)
    application = web_app(
        f"sqlite:///{path}",
        tmp_path,
        now,
        staff_passwords=f"{STAFF}:{hash_password(PASSWORD, iterations=1_000)}",
    )
    with Session(application.db) as session:
        for cid, name in (("c1", "Ann"), ("c2", "Bob")):
            session.add(
                Customer(
                    id=cid,
                    first_name=name,
                    email=f"{name.lower()}@example.com",
                    signed_up_at=now - timedelta(days=30),
                    changed_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
        session.flush()
        for cid, reason, due in (
            ("c2", "refund not received", now + timedelta(hours=5)),
            ("c1", "parcel arrived broken", now - timedelta(hours=2)),  # overdue
        ):
            escalations.open_or_join(
                session,
                customer_id=cid,
                reason=reason,
                trigger_event_id=None,
                priority="high",
                queue="complaints",
                sla_due_at=due,
                now=now - timedelta(hours=6),
            )
        session.commit()
    yield application
    application.db.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    pytest.importorskip("playwright", reason="the playwright package is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


def test_a_lead_signs_in_and_works_an_overdue_case(app: App, browser: object) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    with serve(create_app(app)) as base:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(10_000)

        # Without sign-in, console pages lead to the sign-in form.
        page.goto(f"{base}/console/cases/2")
        assert page.url == f"{base}/console/login?next=/console/cases/2"
        page.goto(f"{base}/console")
        assert page.url.startswith(f"{base}/console/login")

        page.fill("input[name=name]", STAFF)
        page.fill("input[name=password]", "wrong")
        page.click("button:has-text('Sign in')")
        expect(page.locator(".flash.error")).to_have_text("Wrong name or password.")
        page.fill("input[name=password]", PASSWORD)
        page.click("button:has-text('Sign in')")
        assert page.url == f"{base}/console"
        expect(page.locator("header .who")).to_have_text(STAFF)

        # The queue: the overdue case first, marked; the other not.
        rows = page.locator("tr.case-row")
        expect(rows).to_have_count(2)
        expect(rows.nth(0)).to_have_class("case-row overdue")
        expect(rows.nth(0).locator(".badge.overdue")).to_have_text("overdue")
        expect(rows.nth(0)).to_contain_text("parcel arrived broken")
        expect(rows.nth(1)).not_to_contain_text("overdue")

        rows.nth(0).locator("a", has_text="#2").click()
        assert page.url == f"{base}/console/cases/2"
        expect(page.locator("#case-status")).to_have_text("open")
        expect(page.locator("table.facts")).to_contain_text("days_since_signup")

        page.click("button:has-text('Acknowledge')")
        expect(page.locator(".flash.ok")).to_have_text("Acknowledged.")
        expect(page.locator("#case-status")).to_have_text("acknowledged")
        expect(page.locator("#case-owner")).to_have_text(STAFF)

        page.fill("textarea[name=note]", "Replacement sent; apologised by phone.")
        page.click("button:has-text('Resolve')")
        expect(page.locator(".flash.ok")).to_have_text("Resolved.")
        expect(page.locator("#case-status")).to_have_text("resolved")
        expect(page.locator("table.history")).to_contain_text(
            "Replacement sent; apologised by phone."
        )

        # Back in the queue only the other case is left.
        page.click("nav a:has-text('Queue')")
        expect(page.locator("tr.case-row")).to_have_count(1)
        expect(page.locator("tr.case-row")).to_contain_text("refund not received")

        page.click("button:has-text('Sign out')")
        page.goto(f"{base}/console")
        assert page.url.startswith(f"{base}/console/login")
        context.close()

    with Session(app.db) as session:
        case = escalations.get_case(session, 2)
        assert case.status == EscalationStatus.RESOLVED and case.owner == STAFF
        assert [n.action for n in escalations.history(session, 2)] == [
            "opened",
            "acknowledged",
            "resolved",
        ]

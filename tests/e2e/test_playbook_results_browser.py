"""A playbook's results page in a real browser (Debian's chromium, driven by Playwright):
the per-arm table, the conversion-by-arm chart and the period form.

The data is built by hand so that every figure on the page is known: an A/B split with a
holdout, over two weeks of March (the demo's kind of past data, which a "last 30 days"
default would have shown as empty charts).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from engine.bootstrap import App
from engine.data.models import Customer, Enrollment, EnrollmentStatus, Message, MessageStatus
from engine.web.app import create_app
from engine.web.auth import hash_password
from tests.support.browser import NEEDS_CHROMIUM, chromium
from tests.support.paths import ROOT
from tests.support.server import serve, web_app

JOURNEYS = ROOT / "tests" / "fixtures" / "journeys"
STAFF, PASSWORD = "Priya Shah", "correct horse battery"
NOW = datetime(2026, 4, 20, 12, 0, tzinfo=UTC)  # weeks after the data: the default matters
FIRST = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)

# arm -> (enrolled, converted); entries spread over 14 days from FIRST.
ARMS = {"a": (120, 12), "b": (120, 24), "holdout": (40, 2)}

pytestmark = [pytest.mark.browser, NEEDS_CHROMIUM]


@pytest.fixture
def app(sqlite_template: Path, tmp_path: Path) -> Iterator[App]:
    path = tmp_path / "results.db"
    shutil.copy(sqlite_template, path)
    application = web_app(
        f"sqlite:///{path}",
        tmp_path,
        NOW,
        rules_dir=JOURNEYS / "rules",
        templates_dir=JOURNEYS / "templates",
        staff_passwords=f"{STAFF}:{hash_password(PASSWORD, iterations=1_000)}",
    )
    with Session(application.db) as session:
        number = 0
        for arm, (enrolled, converted) in ARMS.items():
            for n in range(enrolled):
                number += 1
                customer_id = f"c{number:04d}"
                entered = FIRST + timedelta(days=n % 14, hours=n % 5)
                session.add(
                    Customer(
                        id=customer_id,
                        email=f"{customer_id}@example.com",
                        signed_up_at=entered - timedelta(days=40),
                        changed_at=entered,
                        created_at=entered,
                        updated_at=entered,
                    )
                )
                enrollment = Enrollment(
                    customer_id=customer_id,
                    playbook="abtest",
                    status=EnrollmentStatus.CONVERTED
                    if n < converted
                    else EnrollmentStatus.COMPLETED,
                    rules_version="v",
                    entered_at=entered,
                    entry_number=1,
                    arm=arm,
                    last_touch_at=entered,
                    converted_at=entered + timedelta(days=2) if n < converted else None,
                )
                session.add(enrollment)
                session.flush()
                if arm != "holdout":
                    session.add(
                        Message(
                            id=f"m{number:04d}",
                            dedupe_key=f"k{number:04d}",
                            customer_id=customer_id,
                            playbook="abtest",
                            enrollment_id=enrollment.id,
                            channel="email",
                            template="one" if arm == "a" else "two",
                            to_address=f"{customer_id}@example.com",
                            status=MessageStatus.DELIVERED,
                            due_at=entered,
                            created_at=entered,
                            updated_at=entered,
                            sent_at=entered,
                        )
                    )
        session.commit()
    yield application
    application.db.dispose()


def test_a_marketer_reads_the_results_of_an_ab_test(app: App) -> None:
    from playwright.sync_api import expect

    with chromium() as browser, serve(create_app(app)) as base:
        page = browser.new_context().new_page()
        page.set_default_timeout(10_000)
        page.goto(f"{base}/console/login?next=/console/playbooks/abtest")
        page.fill("input[name=name]", STAFF)
        page.fill("input[name=password]", PASSWORD)
        page.click("button:has-text('Sign in')")
        assert page.url == f"{base}/console/playbooks/abtest"

        # By default the period is the span with data (2 to 15 March), not the last 30 days.
        expect(page.locator("input[name=since]")).to_have_value("2026-03-02")
        expect(page.locator("input[name=until]")).to_have_value("2026-03-15")
        expect(page.locator("#count-enrolled")).to_have_text("280")
        expect(page.locator("#count-converted")).to_have_text("38")

        rows = page.locator("#results tbody tr")
        expect(rows).to_have_count(3)
        b = page.locator('#results tr[data-arm="b"]')
        expect(b.locator("td").nth(0)).to_have_text("120")  # enrolled
        expect(b.locator("td").nth(1)).to_have_text("120")  # sent
        expect(b.locator("td").nth(5)).to_have_text("24")  # converted
        expect(b.locator("td.rate")).to_contain_text("20.0%")
        # b: 20% against the holdout's 5%: +15.0 pp, Newcombe's interval.
        expect(b.locator("td.uplift")).to_contain_text("+15.0 pp")
        expect(b.locator("td.uplift")).to_contain_text("vs holdout")
        holdout = page.locator('#results tr[data-arm="holdout"]')
        expect(holdout.locator("td").nth(1)).to_have_text("0")  # sent nothing
        expect(holdout.locator("td.uplift")).to_have_text("comparison group")

        # The chart draws each arm with its interval and the holdout's rate as a line.
        chart = page.locator("svg.chart.rates")
        expect(chart).to_be_visible()
        expect(chart.locator("g.arm")).to_have_count(3)
        expect(chart.locator('g.arm[data-arm="b"] text.count')).to_have_text("20.0% (24 of 120)")
        assert chart.locator("line.reference").count() == 1
        bar_a = chart.locator('g.arm[data-arm="a"] rect.bar').bounding_box()
        bar_b = chart.locator('g.arm[data-arm="b"] rect.bar').bounding_box()
        assert bar_a is not None and bar_b is not None
        assert bar_b["width"] == pytest.approx(2 * bar_a["width"], rel=0.02)
        expect(page.locator("svg.chart.sends rect.bar")).to_have_count(14)

        # A shorter period: the first week only; the uplift now lacks data in the holdout.
        page.fill("input[name=since]", "2026-03-02")
        page.fill("input[name=until]", "2026-03-04")
        page.click("button:has-text('Show')")
        expect(page.locator("input[name=until]")).to_have_value("2026-03-04")
        expect(page.locator("svg.chart.sends rect.bar")).to_have_count(3)
        expect(page.locator("#count-enrolled")).to_have_text("63")
        expect(b.locator("td.uplift")).to_contain_text("not enough data")
        expect(page.locator("#period-note a")).to_have_text("the span that has data")

        # A reversed period is refused with a page that says why, not a traceback.
        page.fill("input[name=since]", "2026-03-09")
        page.fill("input[name=until]", "2026-03-01")
        page.click("button:has-text('Show')")
        expect(page.locator("main")).to_contain_text(
            "since (2026-03-09) is after until (2026-03-01)"
        )

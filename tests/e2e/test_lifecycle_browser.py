"""The Lifecycle page in a real browser (Debian's chromium, driven by Playwright): the
stage funnel, the cohort retention heat map and the NPS trend are drawn with data, on a
desktop and on a phone, and a screenshot shows each of them.

The data is built by hand so that the figures are known: stages recorded on the
customers, sign-ups in three months with activity after them, NPS answers over weeks.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from engine.bootstrap import App
from engine.data.models import Customer, Event, StageTransition
from engine.web.app import create_app
from engine.web.auth import hash_password
from tests.support.browser import NEEDS_CHROMIUM, chromium
from tests.support.paths import ROOT
from tests.support.png import bluish, count_pixels
from tests.support.server import serve, web_app

STAGES = ROOT / "tests" / "fixtures" / "stages"
STAFF, PASSWORD = "Priya Shah", "correct horse battery"
NOW = datetime(2026, 4, 20, 12, 0, tzinfo=UTC)
# stage -> customers in it now
COUNTS = {"prospect": 12, "active": 30, "loyal": 9, "at_risk": 6, "churned": 3}
SCORES = [10, 9, 9, 7, 6, 3, 10, 8]  # one answer a week, from 2 March

pytestmark = [pytest.mark.browser, NEEDS_CHROMIUM]


@pytest.fixture
def app(sqlite_template: Path, tmp_path: Path) -> Iterator[App]:
    path = tmp_path / "lifecycle.db"
    shutil.copy(sqlite_template, path)
    application = web_app(
        f"sqlite:///{path}",
        tmp_path,
        NOW,
        rules_dir=STAGES / "rules",
        templates_dir=STAGES / "templates",
        staff_passwords=f"{STAFF}:{hash_password(PASSWORD, iterations=1_000)}",
    )
    months = [datetime(2026, m, 3, 10, tzinfo=UTC) for m in (1, 2, 3)]
    with Session(application.db) as session:
        number = 0
        for stage, count in COUNTS.items():
            for _ in range(count):
                number += 1
                cid = f"c{number:03d}"
                signed_up = months[number % 3]
                session.add(
                    Customer(
                        id=cid,
                        signed_up_at=signed_up,
                        changed_at=signed_up,
                        created_at=signed_up,
                        updated_at=signed_up,
                        stage=stage,
                        stage_since=signed_up,
                    )
                )
                session.flush()
                session.add(
                    StageTransition(
                        customer_id=cid, to_stage=stage, at=signed_up, rules_version="v"
                    )
                )
                # Active in some of the months after signing up: every second customer
                # the month after, every third the one after that.
                for k, every in ((1, 2), (2, 3)):
                    if number % every == 0:
                        at = signed_up + timedelta(days=31 * k)
                        session.add(_event(f"v{number}-{k}", cid, "site_visit", at, {}))
        for week, score in enumerate(SCORES):
            at = datetime(2026, 3, 2, 12, tzinfo=UTC) + timedelta(weeks=week)
            session.add(
                _event(f"n{week}", f"c{week + 1:03d}", "nps_submitted", at, {"score": score})
            )
        session.commit()
    yield application
    application.db.dispose()


def _event(eid: str, cid: str, kind: str, at: datetime, properties: dict[str, object]) -> Event:
    return Event(
        id=eid,
        customer_id=cid,
        type=kind,
        properties=properties,
        occurred_at=at,
        received_at=at,
        evaluated_at=at,
    )


def _sign_in(page: object, base: str) -> None:
    page.goto(f"{base}/console/login?next=/console/lifecycle")  # type: ignore[attr-defined]
    page.fill("input[name=name]", STAFF)  # type: ignore[attr-defined]
    page.fill("input[name=password]", PASSWORD)  # type: ignore[attr-defined]
    page.click("button:has-text('Sign in')")  # type: ignore[attr-defined]


def test_the_lifecycle_page_draws_the_funnel_the_heat_map_and_the_nps_trend(
    app: App, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    with chromium() as browser, serve(create_app(app)) as base:
        page = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
        page.set_default_timeout(10_000)
        _sign_in(page, base)
        assert page.url == f"{base}/console/lifecycle"
        expect(page.locator("nav a[aria-current=page]")).to_have_text("Lifecycle")
        expect(page.locator("#kpi-customers")).to_have_text("60")

        # The funnel: one bar per stage in the funnel's order, as long as its count.
        funnel = page.locator("#chart-funnel")
        stages = funnel.locator("g.stage")
        expect(stages).to_have_count(5)
        assert [stages.nth(i).get_attribute("data-stage") for i in range(5)] == list(COUNTS)
        widths = {
            stage: funnel.locator(f'g.stage[data-stage="{stage}"] rect.bar').bounding_box()
            for stage in COUNTS
        }
        assert all(box is not None and box["width"] > 0 for box in widths.values())
        assert widths["active"]["width"] == pytest.approx(  # type: ignore[index]
            10 * widths["churned"]["width"],
            rel=0.03,  # type: ignore[index]
        )
        expect(funnel.locator('g.stage[data-stage="active"] text.count')).to_have_text("30 (50.0%)")

        # The heat map: the January cohort has months 1 to 3, March only month 1.
        heat = page.locator("#chart-retention")
        expect(heat.locator("g.cohort")).to_have_count(3)
        expect(heat.locator('g.cohort[data-cohort="2026-01"] rect.cell')).to_have_count(3)
        expect(heat.locator('g.cohort[data-cohort="2026-03"] rect.cell')).to_have_count(1)

        # Sign-ups of January (every third customer) visit 31 and 62 days later (half of
        # them, all of them); answering the NPS survey is activity too (see SCORES).
        def retention(cohort: str) -> list[str | None]:
            cells = heat.locator(f'g.cohort[data-cohort="{cohort}"] rect.cell')
            return [cells.nth(i).get_attribute("data-retention") for i in range(cells.count())]

        assert retention("2026-01") == ["0.5", "1.0", "0.05"]
        assert retention("2026-02") == ["0.55", "0.05"]
        assert retention("2026-03") == ["0.5"]

        # The NPS trend: a point a week; the first week's one promoter is +100.
        nps = page.locator("#chart-nps")
        expect(nps.locator("circle.point")).to_have_count(len(SCORES))
        expect(nps.locator("polyline.line")).to_have_count(1)
        assert nps.locator("circle.point").first.get_attribute("data-nps") == "100.0"
        # 4 promoters (10, 9, 9, 10), 2 passives (7, 8), 2 detractors (6, 3): NPS 25.
        expect(page.locator("#kpi-nps")).to_have_text("25.0")

        # The screenshot shows each chart drawn: the accent's blue inside each one's box.
        shot = tmp_path / "lifecycle.png"
        page.screenshot(path=str(shot), full_page=True)
        for chart, least in ((funnel, 2_000), (heat, 1_000), (nps, 100)):
            box = chart.bounding_box()
            assert box is not None and box["width"] > 100 and box["height"] > 50
            scroll = page.evaluate("window.scrollY")
            region = (box["x"], box["y"] + scroll, box["width"], box["height"])
            assert count_pixels(shot, region, bluish) >= least, chart

        # On a phone the charts shrink to the screen instead of spilling off it.
        phone = browser.new_context(viewport={"width": 390, "height": 844}).new_page()
        phone.set_default_timeout(10_000)
        _sign_in(phone, base)
        for chart_id in ("#chart-funnel", "#chart-retention", "#chart-nps"):
            box = phone.locator(chart_id).bounding_box()
            assert box is not None and 0 < box["width"] <= 390
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390 + 1
        phone.screenshot(path=str(tmp_path / "lifecycle-phone.png"), full_page=True)

        # A reversed period is a page saying why, not a traceback.
        page.goto(f"{base}/console/lifecycle?since=2026-03-09&until=2026-03-01")
        expect(page.locator("main")).to_contain_text(
            "since (2026-03-09) is after until (2026-03-01)"
        )

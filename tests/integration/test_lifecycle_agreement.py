"""The lifecycle report agrees with the same KPIs computed another way (plain SQL and
Python: tests/support/kpi_oracle.py) on seeded customers swept twice, on SQLite and
PostgreSQL; bench/lifecycle_report.py does the same on 100,000 after 30 simulated days."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from engine.bootstrap import App
from engine.data.seed import seed
from engine.data.uow import reading
from engine.runners.ticks import evaluation_tick
from engine.usecases.lifecycle_report import as_json, default_since, lifecycle_report
from tests.support.apps import fixture_app
from tests.support.kpi_oracle import oracle, reported
from tests.support.paths import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "stages"
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
def app(db: Engine, db_url: str, tmp_path: Path) -> Iterator[App]:
    yield fixture_app(db, db_url, tmp_path / "outbox", FIXTURES / "rules", FIXTURES / "templates")


def test_the_report_agrees_with_the_kpis_computed_by_plain_sql(app: App) -> None:
    seed(app.db, 300, NOW)
    evaluation_tick(app, NOW, full=True, workers=0)
    evaluation_tick(app, NOW + timedelta(days=45), full=True, workers=0)
    until = NOW + timedelta(days=45, hours=1)
    with reading(app.db) as session:
        since = default_since(session)
        assert since is not None
        document = as_json(lifecycle_report(session, app.rules.stages, since, until))
        expected = oracle(session, since, until)
    got = reported(document)
    assert got == expected
    # Every customer has a stage after a sweep, and some moved between the two sweeps.
    assert sum(got["stages"].values()) == got["customers"] == 300
    assert "(none yet)" not in got["stages"]
    assert got["transitions"] > 300
    assert got["nps"]["answers"] > 0 and got["orders"]["repeat_buyers"] > 0
    assert len(got["cohorts"]) > 6

"""`lifecycle report lifecycle` as a marketer runs it: the tables, --json, --csv DIR, and
a reversed period refused with a sentence (CliRunner in-process, SQLite)."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from tests.support.paths import ROOT

STAGES = ROOT / "tests" / "fixtures" / "stages"
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("LIFECYCLE_OUTBOX_DIR", str(tmp_path / "outbox"))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(STAGES / "rules"))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(STAGES / "templates"))
    return tmp_path


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_the_lifecycle_report_after_two_sweeps(env: Path) -> None:
    assert cli("seed", "--customers", "120", "--now", NOW.isoformat())[0] == 0
    code, output = cli("tick", "--full", "--now", NOW.isoformat())
    assert code == 0, output
    assert "120 stage changes" in output  # each customer's first stage
    later = (NOW + timedelta(days=40)).isoformat()
    assert cli("tick", "--full", "--now", later)[0] == 0
    until = (NOW + timedelta(days=41)).isoformat()

    code, output = cli("report", "lifecycle", "--until", until, "--json")
    assert code == 0, output
    document = json.loads(output)
    assert document["customers"] == 120
    assert sum(s["customers"] for s in document["stages"]) == 120
    assert [s["stage"] for s in document["stages"]] == [
        "prospect",
        "active",
        "loyal",
        "at_risk",
        "churned",
    ]
    assert document["transitions"]["total"] > 120  # the first stages, and moves since
    assert document["transitions"]["counts"][0]["from"] in (
        "(new)",
        *document["transitions"]["from"],
    )
    assert {"historic", "predictive"} <= set(document["clv"])

    code, output = cli("report", "lifecycle", "--until", until, "--csv", str(env / "kpis"))
    assert code == 0, output
    assert "Customers per stage now (120)" in output
    assert "Retention by sign-up cohort" in output and "NPS:" in output
    assert f"CSV files written to {env / 'kpis'}" in output
    with (env / "kpis" / "stages.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["stage", "label", "customers"]
    assert sum(int(r[2]) for r in rows[1:]) == 120
    assert sorted(p.name for p in (env / "kpis").iterdir()) == [
        "churn.csv",
        "clv_by_cohort.csv",
        "nps.csv",
        "onboarding.csv",
        "retention.csv",
        "stages.csv",
        "summary.csv",
        "transitions.csv",
    ]


def test_a_reversed_period_is_refused_with_a_sentence(env: Path) -> None:
    assert cli("init")[0] == 0
    code, output = cli(
        "report", "lifecycle", "--since", "2026-03-09T00:00:00Z", "--until", "2026-03-01T00:00:00Z"
    )
    assert code == 1
    assert "--since (2026-03-09T00:00:00+00:00) must be before --until" in output
    assert "Traceback" not in output

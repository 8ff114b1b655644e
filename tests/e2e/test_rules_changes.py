"""A rules change that strands active journeys: `rules check` warns, the next tick ends
them with a decision saying why, and no tick fails (it used to raise IndexError)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from engine.cli import app
from engine.data.db import make_engine
from engine.data.models import Decision, Enrollment
from engine.data.uow import reading
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    rules = tmp_path / "rules"
    shutil.copytree(FIXTURE_RULES, rules)
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", f"sqlite:///{tmp_path / 'db.sqlite'}")
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(rules))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    monkeypatch.setenv("LIFECYCLE_OUTBOX_DIR", str(tmp_path / "outbox"))
    return tmp_path


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_a_renamed_step_is_warned_of_and_its_journeys_end_with_a_reason(project: Path) -> None:
    assert cli("seed", "--customers", "100", "--now", NOW.isoformat())[0] == 0
    code, output = cli("tick", "--now", NOW.isoformat())
    assert code == 0, output
    db = make_engine(f"sqlite:///{project / 'db.sqlite'}")
    with reading(db) as session:
        waiting = session.scalars(
            select(Enrollment).where(
                Enrollment.playbook == "welcome_series", Enrollment.status == "active"
            )
        ).all()
    assert waiting and {e.step_id for e in waiting} == {"tips"}
    path = project / "rules" / "welcome_series.yaml"
    path.write_text(path.read_text().replace("- id: tips", "- id: getting_started"))
    code, output = cli("rules", "check")
    assert code == 0, output
    assert (
        f"warning: {len(waiting)} active enrollment{'s' if len(waiting) != 1 else ''} of "
        "'welcome_series' wait for step 'tips', which the playbook no longer has: they end "
        "(cancelled) at the next tick"
    ) in output
    code, output = cli("tick", "--now", (NOW + timedelta(days=3)).isoformat())
    assert code == 0, output
    with reading(db) as session:
        ended = session.scalars(
            select(Decision).where(
                Decision.playbook == "welcome_series", Decision.outcome == "cancelled"
            )
        ).all()
    assert len(ended) == len(waiting)
    assert {d.reason for d in ended} == {"its next step 'tips' is no longer in the playbook"}
    assert cli("rules", "check")[1].count("warning:") == 0
    db.dispose()


def test_rules_check_creates_no_database(project: Path) -> None:
    code, output = cli("rules", "check")
    assert code == 0, output
    assert not (project / "db.sqlite").exists()

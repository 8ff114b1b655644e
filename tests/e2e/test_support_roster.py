"""The support roster, through the CLI: `rules check` and `init` refuse a roster that would
notify nobody of complaint cases, and LIFECYCLE_ROSTER_FILE is the roster everywhere."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlmodel import col
from typer.testing import CliRunner

from engine.cli import app
from engine.data.db import make_engine
from engine.data.ingest import CustomerIn, EventIn, record_event, upsert_customer
from engine.data.models import Message
from engine.data.uow import reading, unit_of_work
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

runner = CliRunner()
NOW = datetime(2026, 3, 2, 9, tzinfo=UTC)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A rules directory without its support_roster.yaml."""
    rules = tmp_path / "rules"
    shutil.copytree(FIXTURE_RULES, rules)
    (rules / "support_roster.yaml").unlink()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIFECYCLE_ROSTER_FILE", raising=False)
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", f"sqlite:///{tmp_path / 'roster.db'}")
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(rules))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    monkeypatch.setenv("LIFECYCLE_OUTBOX_DIR", str(tmp_path / "outbox"))
    monkeypatch.setenv("COLUMNS", "400")
    return tmp_path


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_rules_check_and_init_refuse_rules_that_escalate_to_nobody(project: Path) -> None:
    problem = (
        "rules/complaint_escalation.yaml:15:7: step 'open_case' of complaint_escalation "
        "escalates, but there is no support roster rules/support_roster.yaml: nobody would be "
        "notified of its cases"
    )
    for command in (["rules", "check"], ["init"]):
        code, output = cli(*command)
        assert code == 1, output
        assert problem in output, output


def test_lifecycle_roster_file_is_the_roster_of_rules_check_init_and_the_engine(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roster = project / "team" / "leads.yaml"
    roster.parent.mkdir()
    roster.write_text(
        "leads:\n  - {name: Zoe Field, email: zoe.field@example.com, tier: 1, on_duty: true}\n"
    )
    monkeypatch.setenv("LIFECYCLE_ROSTER_FILE", str(roster))
    code, output = cli("rules", "check")
    assert code == 0, output
    assert f"support roster: {roster}, 1 lead; on duty at tier 1: Zoe Field" in output
    code, output = cli("init")
    assert code == 0, output
    assert f"support roster: {roster}, 1 lead; on duty at tier 1: Zoe Field" in output
    db = make_engine(f"sqlite:///{project / 'roster.db'}")
    with unit_of_work(db) as session:
        upsert_customer(session, CustomerIn(id="c1", email="c1@example.com"), NOW)
        session.flush()
        record_event(
            session,
            EventIn(
                id="k1",
                customer_id="c1",
                type="complaint",
                occurred_at=NOW,
                properties={"reason": "Late delivery", "severity": 2},
            ),
            NOW,
        )
    code, output = cli("tick", "--now", NOW.isoformat())
    assert code == 0, output
    with reading(db) as session:
        notified = session.scalars(
            select(col(Message.to_address)).where(col(Message.kind) == "staff")
        ).all()
    db.dispose()
    assert set(notified) == {"zoe.field@example.com"}

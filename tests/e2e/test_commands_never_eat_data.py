"""Commands that must never eat data: `evaluate` and `simulate` leave the database as it was.

Each runs as a marketer runs it (the CLI, on SQLite and PostgreSQL); the database is
compared row for row, every table, before and after.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, select, text
from sqlmodel import col
from typer.testing import CliRunner

from engine.cli import app
from engine.data.db import make_engine, upgrade
from engine.data.ingest import CustomerIn, EventIn, record_event, upsert_customer
from engine.data.models import Escalation, Message
from engine.data.scratch import scratch_copy
from engine.data.seed import seed
from engine.data.uow import reading, unit_of_work
from tests.support.fake_provider import FakeProvider
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES, ROOT

runner = CliRunner()


def snapshot(db: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (Alembic's included), in primary-key order."""
    metadata = MetaData()
    metadata.reflect(db)
    with db.connect() as connection:
        return {
            name: [
                tuple(row)
                for row in connection.execute(
                    select(table).order_by(*(table.primary_key.columns or table.columns))
                )
            ]
            for name, table in sorted(metadata.tables.items())
        }


@pytest.fixture
def cli_env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", db_url)
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(FIXTURE_RULES))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    monkeypatch.setenv("LIFECYCLE_OUTBOX_DIR", str(tmp_path / "outbox"))
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def a_sign_up_and_a_complaint(db: Engine, now: datetime) -> None:
    with unit_of_work(db) as session:
        for customer_id in ("new-1", "angry-1"):
            upsert_customer(
                session,
                CustomerIn(
                    id=customer_id,
                    email=f"{customer_id}@example.com",
                    email_opt_in=True,
                    signed_up_at=now - timedelta(hours=1),
                ),
                now - timedelta(hours=1),
            )
        session.flush()
        record_event(
            session,
            EventIn(id="e-signup", customer_id="new-1", type="signed_up", occurred_at=now),
            now,
        )
        record_event(
            session,
            EventIn(
                id="e-complaint",
                customer_id="angry-1",
                type="complaint",
                occurred_at=now,
                properties={"reason": "Parcel arrived damaged", "severity": 2},
            ),
            now,
        )


def test_evaluate_changes_no_row_and_the_next_tick_still_acts_on_the_events(
    cli_env: Path, db: Engine, now: datetime
) -> None:
    a_sign_up_and_a_complaint(db, now)
    before = snapshot(db)
    moment = now.isoformat()
    for args in (
        ("evaluate", "--now", moment),
        ("evaluate", "--customer", "new-1", "--now", moment),
        ("evaluate", "--dry-run", "--json", "--now", moment),
    ):
        code, output = cli(*args)
        assert code == 0, output
        assert snapshot(db) == before, f"`lifecycle {' '.join(args)}` changed the database"
    code, output = cli("explain", "new-1", "--now", moment)
    assert "waits for a new 'signed_up' event; none is pending" not in output, output
    code, output = cli("tick", "--now", moment)
    assert code == 0, output
    with reading(db) as session:
        welcome = session.scalars(select(Message).where(col(Message.customer_id) == "new-1")).all()
        cases = session.scalars(
            select(Escalation).where(col(Escalation.customer_id) == "angry-1")
        ).all()
    assert [(m.playbook, m.template) for m in welcome] == [("welcome_series", "welcome")]
    assert len(cases) == 1 and cases[0].reason == "Parcel arrived damaged"


# ── simulate ────────────────────────────────────────────────────────────────────────

START = "2026-03-02T09:00:00Z"


def seeded(url: str, customers: int = 60) -> None:
    engine = make_engine(url)
    upgrade(engine)  # a new file, or already migrated (then nothing happens)
    seed(engine, customers, datetime.fromisoformat(START).replace(tzinfo=UTC))
    engine.dispose()  # the last connection closes: SQLite folds its WAL back into the file


def snapshot_of(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = make_engine(url)
    try:
        return snapshot(engine)
    finally:
        engine.dispose()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def test_simulate_leaves_the_working_copy_and_its_database_unchanged(tmp_path: Path) -> None:
    """A marketer's project under git, with its database: simulate as a real process, with
    every default (./lifecycle.db, ./outbox), then `git status` shows nothing."""
    repo = tmp_path / "project"
    shutil.copytree(FIXTURE_RULES, repo / "rules")
    shutil.copytree(FIXTURE_TEMPLATES, repo / "templates" / "messages")
    seeded(f"sqlite:///{repo / 'lifecycle.db'}")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "a project")
    before = snapshot_of(f"sqlite:///{repo / 'lifecycle.db'}")
    result = subprocess.run(
        [sys.executable, "-c", "from engine.cli import app; app()", "simulate", "--days", "2"]
        + ["--start", START, "--activity", "synthetic", "--json"],
        cwd=repo,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["activity"] == "synthetic" and report["events"], report
    assert report["playbooks"]["welcome_series"]["sent"]["email"] >= 1  # it did work
    assert git(repo, "status", "--porcelain") == ""
    assert snapshot_of(f"sqlite:///{repo / 'lifecycle.db'}") == before


def test_simulate_never_changes_the_database_nor_calls_a_configured_provider(
    cli_env: Path, db_url: str, db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SendGrid and Twilio configured (at the local fake provider): the simulation still
    sends through the console channel only, and the database (SQLite file or PostgreSQL
    schema) is row for row as it was."""
    seeded(db_url)
    before = snapshot(db)
    with FakeProvider.start() as fake:
        for name, value in {
            "LIFECYCLE_EMAIL_CHANNEL": "sendgrid",
            "LIFECYCLE_SENDGRID_API_KEY": fake.sendgrid_api_key,
            "LIFECYCLE_SENDGRID_HOST": fake.url,
            "LIFECYCLE_SMS_CHANNEL": "twilio",
            "LIFECYCLE_TWILIO_ACCOUNT_SID": fake.twilio_account_sid,
            "LIFECYCLE_TWILIO_AUTH_TOKEN": fake.twilio_auth_token,
            "LIFECYCLE_TWILIO_FROM_NUMBER": "+447700900000",
            "LIFECYCLE_TWILIO_BASE_URL": fake.url,
            "LIFECYCLE_SECRET_KEY": "a-secret-key-that-is-long-enough-0123",
        }.items():
            monkeypatch.setenv(name, value)
        code, output = cli(
            "simulate", "--days", "2", "--start", START, "--activity", "synthetic", "--json"
        )
        assert code == 0, output
        assert fake.requests == []
    report = json.loads(output)
    assert sum(t["sent"].get("email", 0) for t in report["playbooks"].values()) >= 1
    assert snapshot(db) == before
    assert not (cli_env / "outbox").exists()  # rendered messages went to a scratch directory


def test_simulate_adds_synthetic_activity_only_when_asked(cli_env: Path, db_url: str) -> None:
    seeded(db_url)
    code, output = cli("simulate", "--days", "1", "--start", START, "--json")
    assert code == 0, output
    plain = json.loads(output)
    assert (plain["activity"], plain["events"], plain["new_customers"]) == ("none", {}, 0)
    assert plain["playbooks"]["welcome_series"]["enrolled"] >= 1  # the data as it is moved
    code, output = cli("simulate", "--days", "1", "--start", START, "--activity", "synthetic")
    assert code == 0, output
    assert "new customer" in output and "resolved by the simulated lead" in output


def test_simulate_keeps_its_copy_and_messages_only_where_asked(
    cli_env: Path, db_url: str, db: Engine
) -> None:
    if not db_url.startswith("sqlite"):
        code, output = cli("simulate", "--days", "1", "--work-db", str(cli_env / "copy.db"))
        assert code == 1
        assert "a kept copy (--work-db) is a SQLite file" in output
        return
    seeded(db_url)
    before = snapshot(db)
    copy, outbox = cli_env / "kept.db", cli_env / "kept-outbox"
    code, output = cli(
        "simulate", "--days", "1", "--start", START, "--work-db", str(copy), "--outbox", str(outbox)
    )
    assert code == 0, output
    assert f"The simulated database is kept in {copy}" in output
    assert any(outbox.glob("*.eml"))
    kept = snapshot_of(f"sqlite:///{copy}")
    assert len(kept["messages"]) > len(before["messages"]) and snapshot(db) == before
    code, output = cli("simulate", "--days", "1", "--work-db", str(copy))
    assert code == 1 and f"cannot copy {copy}: already exists" in output


@pytest.mark.parametrize("fails", [False, True], ids=["succeeds", "fails"])
def test_the_scratch_copy_is_removed_at_the_end_even_when_the_work_fails(
    db_url: str, db: Engine, fails: bool
) -> None:
    seeded(db_url, customers=5)
    where: list[str] = []
    with contextlib.suppress(RuntimeError), scratch_copy(db_url) as copy:
        with copy.connect() as connection:
            if copy.dialect.name == "postgresql":
                where.append(str(connection.scalar(text("SELECT current_schema()"))))
            else:
                where.append(str(copy.url.database))
            assert connection.scalar(text("SELECT count(*) FROM customers")) == 5
        if fails:
            raise RuntimeError("the simulation failed")
    (place,) = where
    if db.dialect.name == "postgresql":
        assert place.startswith("lifecycle_scratch_")
        with db.connect() as connection:
            left = connection.scalar(
                text("SELECT count(*) FROM information_schema.schemata WHERE schema_name = :s"),
                {"s": place},
            )
        assert left == 0
    else:
        assert not Path(place).parent.exists()

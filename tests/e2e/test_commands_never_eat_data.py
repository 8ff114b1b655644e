"""Commands that must never eat data: `evaluate` and `simulate` leave the database as it was.

Each runs as a marketer runs it (the CLI, on SQLite and PostgreSQL); the database is
compared row for row, every table, before and after.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, select
from sqlmodel import col
from typer.testing import CliRunner

from engine.cli import app
from engine.data.ingest import CustomerIn, EventIn, record_event, upsert_customer
from engine.data.models import Escalation, Message
from engine.data.uow import reading, unit_of_work
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

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

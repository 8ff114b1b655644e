"""What a new user meets first, through the real command line: no database created by a
command that only reads, tables readable at 80 columns, counts that say what they count,
and moments without an offset never silently taken as UTC."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from engine.cli import app
from engine.data.db import alembic_config, make_engine, normalize_url
from tests.conftest import POSTGRES_URL, _postgres_available
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

NOW = "2026-03-02T09:00:00Z"
INIT = "Run `lifecycle init` to create or upgrade it"
# Every command that must find a database and never create one, with its arguments.
NEEDS_A_DATABASE = [
    ["explain", "c1"],
    ["evaluate"],
    ["preview", "welcome", "--customer", "c1"],
    ["messages", "list"],
    ["escalations", "list"],
    ["escalations", "show", "1"],
    ["customers", "export", "c1"],
    ["customers", "erase", "c1", "--yes"],
    ["staff", "sessions"],
    ["tick"],
    ["dispatch"],
]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in os.environ:
        if name.startswith("LIFECYCLE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", f"sqlite:///{tmp_path / 'shop.db'}")
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(FIXTURE_RULES))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    monkeypatch.setenv("LIFECYCLE_OUTBOX_DIR", str(tmp_path / "outbox"))
    monkeypatch.setenv("COLUMNS", "80")
    return tmp_path


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("args", NEEDS_A_DATABASE, ids=" ".join)
def test_a_command_that_needs_a_database_never_creates_one(env: Path, args: list[str]) -> None:
    """Before, any command silently created ./lifecycle.db (or the configured file)."""
    code, output = cli(*args)
    assert code == 1, output
    assert f"there is no database file {env / 'shop.db'}" in output
    assert INIT in output.replace("\n", " ")
    assert sorted(p.name for p in env.iterdir()) == []  # no file, no -wal, no outbox


def test_facts_needs_no_database_and_init_creates_it(env: Path) -> None:
    code, output = cli("facts")
    assert code == 0 and "orders_count" in output
    assert not (env / "shop.db").exists()
    code, output = cli("init")
    assert code == 0 and "database ready" in output
    code, output = cli("messages", "list", "--json")
    assert code == 0 and json.loads(output) == []


def test_an_older_schema_is_reported_not_migrated_behind_the_users_back(env: Path) -> None:
    engine = make_engine(f"sqlite:///{env / 'shop.db'}")
    command.upgrade(alembic_config(engine), "0003_security")
    code, output = cli("evaluate")
    assert code == 1
    assert "the database is at revision 0003_security, older than this Lifecycle" in output
    assert INIT in output.replace("\n", " ")
    assert cli("init")[0] == 0 and cli("evaluate", "--now", NOW)[0] == 0


@pytest.fixture
def empty_schema_url() -> Iterator[str]:
    if not _postgres_available():
        pytest.skip(f"no PostgreSQL server reachable at {POSTGRES_URL}")
    schema = f"t_empty_{uuid.uuid4().hex[:8]}"
    admin = create_engine(normalize_url(POSTGRES_URL))
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.mark.postgres
def test_on_postgresql_a_schema_without_tables_points_to_init(
    env: Path, empty_schema_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", empty_schema_url)
    code, output = cli("explain", "c1")
    assert code == 1 and "the database has no Lifecycle tables" in output
    assert INIT in output.replace("\n", " ")
    engine = make_engine(empty_schema_url)
    with engine.connect() as connection:
        tables = connection.execute(
            text(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()"
            )
        ).scalar()
    engine.dispose()
    assert tables == 0  # nothing was created


def seeded(env: Path) -> None:
    assert cli("seed", "--customers", "60", "--now", NOW)[0] == 0
    code, output = cli("tick", "--now", NOW)
    assert code == 0, output


@pytest.mark.parametrize(
    ("args", "whole"),
    [
        (["evaluate", "--now", NOW], ["complaint_escalation", "first_order_offer", "(onboarding)"]),
        (["messages", "list"], ["seed-00000001", "welcome_series · welcome", "1 try"]),
        (["escalations", "list", "--now", NOW], ["seed-00000007", "SLA due (UTC)"]),
        (["facts"], ["days_since_last_activity", "total_spend_cents"]),
        (["report", "playbooks", "--until", "2026-03-03T00:00:00Z"], ["converted", "enrolled"]),
        (
            ["simulate", "--days", "2", "--start", NOW],
            ["complaint_escalation", "completed", "welcome_series: sent email"],
        ),
    ],
    ids=["evaluate", "messages", "escalations", "facts", "report", "simulate"],
)
def test_every_table_is_readable_at_80_columns(
    env: Path, args: list[str], whole: list[str]
) -> None:
    """Rich cut ids ("seed-00…", "welcome_…") to fit 80 columns; now ids and times stay
    whole, and text wraps between words."""
    seeded(env)
    code, output = cli(*args)
    assert code == 0, output
    assert "…" not in output
    # (a path is printed whole, to be copied: only lines without one must fit)
    assert all(len(line) <= 80 for line in output.splitlines() if str(env) not in line), output
    for word in whole:
        assert word in output, (word, output)


def test_messages_list_shows_when_each_message_was_sent(env: Path) -> None:
    seeded(env)
    code, output = cli("messages", "list", "--json", "--limit", "500")
    records = json.loads(output)
    sent = [r for r in records if r["status"] == "sent"]
    assert sent and all(r["sent_at"].startswith("2026-03-02T09:00") for r in sent)
    assert all(r["sent_at"] is None for r in records if r["status"] == "queued")
    code, table = cli("messages", "list", "--status", "sent", "--limit", "3")
    assert table.count("2026-03-02 09:00") == 6  # due and sent, for each of the 3


def test_evaluate_counts_customers_and_pending_events_apart(env: Path, tmp_path: Path) -> None:
    """One customer with six pending events showed "matched 7" for a sweep playbook."""
    customers = tmp_path / "customers.jsonl"
    customers.write_text(
        json.dumps({"id": "c1", "email": "ann@example.com", "email_opt_in": True}) + "\n"
    )
    events = tmp_path / "events.jsonl"
    orders = [
        {
            "id": f"o{n}",
            "customer_id": "c1",
            "type": "order_placed",
            "occurred_at": f"2026-02-2{n}T10:00:00Z",
            "properties": {"amount_cents": 2000},
        }
        for n in range(6)
    ]
    events.write_text("".join(json.dumps(order) + "\n" for order in orders))
    assert cli("import", "customers", str(customers))[0] == 0
    assert cli("import", "events", str(events))[0] == 0
    code, output = cli("evaluate", "--json", "--now", NOW)
    summary = json.loads(output)
    assert (summary["customers"], summary["pending_events"]) == (1, 6)
    loyalty = summary["playbooks"]["loyalty_reward"]
    assert (loyalty["matched"], loyalty["matched_in"]) == (1, "customers")
    assert summary["playbooks"]["welcome_series"]["matched_in"] == "events"
    code, output = cli("evaluate", "--now", NOW)
    assert "Evaluation of 1 customer and 6 pending events" in output
    assert "1 customer " in output and "7 customers" not in output


def test_a_moment_without_an_offset_is_taken_as_utc_with_a_warning(env: Path) -> None:
    assert cli("init")[0] == 0
    code, output = cli("evaluate", "--now", "2026-03-02T09:00:00")
    assert code == 0
    assert (
        "warning: 2026-03-02T09:00:00 has no UTC offset, so it is taken as UTC; write "
        "2026-03-02T09:00:00Z (or +01:00...) to say which"
    ) in output.replace("\n", " ")
    code, output = cli("evaluate", "--now", "2026-03-02T10:00:00+01:00")
    assert code == 0 and "warning" not in output
    code, output = cli("evaluate", "--now", "next tuesday")
    assert code == 2 and "is not an ISO 8601 moment" in output


def test_every_command_reads_the_same_settings_from_dot_env(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .env in the working directory is read by rules check and facts as by every other
    command: its rules directory is the one checked, its database the one used."""
    for name in ("LIFECYCLE_RULES_DIR", "LIFECYCLE_TEMPLATES_DIR", "LIFECYCLE_DATABASE_URL"):
        monkeypatch.delenv(name)
    rules = env / "my-rules"
    shutil.copytree(FIXTURE_RULES, rules)
    (rules / "welcome_series.yaml").write_text(
        (rules / "welcome_series.yaml").read_text().replace("orders_count >= 1", "order_count >= 1")
    )
    (env / ".env").write_text(
        f"LIFECYCLE_RULES_DIR={rules}\nLIFECYCLE_TEMPLATES_DIR={FIXTURE_TEMPLATES}\n"
        f"LIFECYCLE_DATABASE_URL=sqlite:///{env / 'from-dotenv.db'}\n"
    )
    code, output = cli("rules", "check")
    assert code == 1 and "my-rules/welcome_series.yaml:12:9: unknown fact 'order_count'" in output
    code, output = cli("facts")
    assert code == 1 and "unknown fact 'order_count'" in output
    code, output = cli("explain", "c1")
    assert code == 1 and f"there is no database file {env / 'from-dotenv.db'}" in output

"""The `lifecycle` command line, end to end on a real SQLite file, as a marketer uses it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from engine.cli import app
from engine.cli.common import LifecycleTyper
from engine.errors import EvaluationWorkerCrashed
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

ROOT = Path(__file__).resolve().parents[2]
NOW = "2026-03-02T09:00:00Z"
runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("LIFECYCLE_OUTBOX_DIR", str(tmp_path / "outbox"))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(FIXTURE_RULES))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    return tmp_path


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_rules_check_reports_a_misspelled_fact_and_duration_as_a_real_process(
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(FIXTURE_RULES, rules)
    path = rules / "welcome_series.yaml"
    path.write_text(
        path.read_text()
        .replace("orders_count >= 1", "order_count >= 1")
        .replace("wait: 3d", "wait: 3dd")
    )
    result = subprocess.run(
        [sys.executable, "-c", "from engine.cli import app; app()", "rules", "check", str(rules)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"{path}:12:9: unknown fact 'order_count' (did you mean 'orders_count'?)" in lines
    assert any(line.startswith(f"{path}:20:11: bad duration '3dd'") for line in lines), lines
    assert "2 problems found" in result.stderr


def test_facts_lists_builtins_attributes_and_event_properties(env: Path) -> None:
    code, output = cli("facts", "--json")
    assert code == 0
    facts = {row["name"]: row for row in json.loads(output)}
    assert facts["orders_count"]["type"] == "int"
    assert facts["total_spend_cents"]["type"] == "money"
    assert facts["plan"]["source"] == "attribute"
    assert facts["event.reason"]["source"] == "event"


def test_seed_evaluate_and_explain(env: Path) -> None:
    code, output = cli("seed", "--customers", "120", "--now", NOW)
    assert code == 0, output
    code, output = cli("evaluate", "--dry-run", "--json", "--now", NOW)
    assert code == 0, output
    summary = json.loads(output)
    assert summary["customers"] == 120
    for playbook in (
        "welcome_series",
        "re_engagement",
        "loyalty_reward",
        "referral_ask",
        "complaint_escalation",
    ):
        assert summary["playbooks"][playbook]["matched"] >= 1, (playbook, summary)
    # Reference evaluator gives the same counts.
    code, reference = cli(
        "evaluate", "--dry-run", "--json", "--engine", "reference", "--workers", "0", "--now", NOW
    )
    assert json.loads(reference)["playbooks"] == summary["playbooks"]
    code, output = cli(
        "evaluate", "--dry-run", "--json", "--customer", "seed-00000001", "--now", NOW
    )
    detail = json.loads(output)["details"]
    assert {m["playbook"] for d in detail for m in d["matches"]} == {"welcome_series"}
    code, output = cli("explain", "seed-00000003", "--json", "--now", NOW)
    assert code == 0, output
    report = {p["playbook"]: p for p in json.loads(output)["playbooks"]}
    welcome = report["welcome_series"]
    assert welcome["matches"] is False
    code, output = cli("explain", "nobody", "--now", NOW)
    assert code == 1 and "no customer with id 'nobody'" in output


def test_explain_says_which_part_is_false(env: Path) -> None:
    cli("seed", "--customers", "10", "--now", NOW)
    code, output = cli(
        "explain", "seed-00000006", "--json", "--now", NOW
    )  # a browser: never ordered
    loyalty = next(p for p in json.loads(output)["playbooks"] if p["playbook"] == "loyalty_reward")
    enter = loyalty["checks"][0]
    assert enter["holds"] is False
    assert "orders_count >= 5 is false: orders_count is 0" in enter["why"]


def test_import_reports_bad_rows_and_is_idempotent(env: Path, tmp_path: Path) -> None:
    customers = tmp_path / "customers.csv"
    customers.write_text(
        "id,email,phone,timezone,email_opt_in\n"
        "a1,a1@example.com,+447700900001,Europe/London,true\n"
        "a2,not-an-email,,Europe/London,true\n"
        "a3,a3@example.com,+447700900003,Mars/Olympus,false\n"
    )
    code, output = cli("import", "customers", str(customers), "--now", NOW)
    assert code == 1
    assert "row 2" in output and "email: 'not-an-email' is not an email address" in output
    assert "row 3" in output and "Mars/Olympus" in output
    assert "1 customer created" in output
    code, output = cli("import", "customers", str(customers), "--now", NOW)
    assert "0 customers created, 0 updated, 1 unchanged" in output
    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"id": "e1", "customer_id": "a1", "type": "order_placed", "occurred_at": "2026-03-01T10:00:00Z", "properties": {"amount_cents": 1999}}\n'
        '{"id": "e2", "customer_id": "a1", "type": "ordr_placed", "occurred_at": "2026-03-01T10:00:00Z"}\n'
    )
    code, output = cli("import", "events", str(events), "--now", NOW)
    assert code == 1 and "unknown event type 'ordr_placed'" in output and "1 event stored" in output
    code, output = cli("import", "events", str(events), "--now", NOW)
    assert "0 events stored, 1 duplicate," in output


def test_tick_escalations_and_messages(env: Path) -> None:
    cli("seed", "--customers", "60", "--now", NOW)
    code, output = cli("tick", "--now", NOW)
    assert code == 0, output
    assert "enrolled" in output and "dispatched" in output
    code, output = cli("escalations", "list", "--json", "--now", NOW)
    cases = json.loads(output)
    assert cases and all(c["status"] == "open" for c in cases)
    first = cases[0]["id"]
    code, output = cli("escalations", "ack", str(first), "--now", NOW)
    assert code == 0 and f"case {first} is acknowledged" in output
    code, output = cli("escalations", "assign", str(first), "Ana Lopes", "--now", NOW)
    assert code == 0 and "owned by Ana Lopes" in output
    code, output = cli("escalations", "assign", str(first), "Nobody Here", "--now", NOW)
    assert code == 1 and "no support lead named 'Nobody Here'" in output
    code, output = cli("escalations", "resolve", str(first), "--note", "Refunded", "--now", NOW)
    assert code == 0 and "resolved" in output
    code, output = cli("escalations", "resolve", str(first), "--note", "again", "--now", NOW)
    assert code == 1 and f"cannot resolve case {first}: it is resolved" in output
    code, output = cli("escalations", "show", "999999")
    assert code == 1 and "no escalation case with id 999999" in output
    code, output = cli("escalations", "show", str(first), "--json")
    history = [h["action"] for h in json.loads(output)["history"]]
    assert history == ["opened", "acknowledged", "assigned", "resolved"]
    code, output = cli("messages", "list", "--status", "sent", "--json")
    assert code == 0 and json.loads(output), output
    code, output = cli("messages", "retry", "no-such-id")
    assert code == 1 and "no message with id 'no-such-id'" in output


def test_preview_renders_with_real_facts(env: Path) -> None:
    cli("seed", "--customers", "10", "--now", NOW)
    code, output = cli("preview", "loyalty_reward", "--customer", "seed-00000004", "--now", NOW)
    assert code == 0, output
    assert "Subject: Thank you," in output and "orders and $" in output
    code, output = cli("preview", "sms/last_chance", "--customer", "seed-00000004", "--now", NOW)
    assert code == 0 and "GSM-7" in output and "segment" in output


def test_simulate_prints_per_playbook_outcomes(env: Path) -> None:
    cli("seed", "--customers", "80", "--now", NOW)
    code, output = cli(
        "simulate",
        "--days",
        "3",
        "--start",
        NOW,
        "--json",
        "--customer",
        "seed-00000001",
        "--activity",
        "synthetic",
    )
    assert code == 0, output
    report = json.loads(output)
    assert report["hours"] == 72
    welcome = report["playbooks"]["welcome_series"]
    assert welcome["enrolled"] >= 1 and welcome["sent"]["email"] >= 1
    assert [row["outcome"] for row in report["timeline"]][:2] == ["enrolled", "queued"]


def test_importing_history_starts_no_journey(env: Path, tmp_path: Path) -> None:
    customers = tmp_path / "old.csv"
    customers.write_text(
        "id,email,email_opt_in,signed_up_at\nold1,old1@example.com,true,2025-01-10T10:00:00Z\n"
    )
    events = tmp_path / "old-events.jsonl"
    events.write_text(
        '{"id": "h1", "customer_id": "old1", "type": "signed_up", "occurred_at": "2025-01-10T10:00:00Z"}\n'
        '{"id": "h2", "customer_id": "old1", "type": "order_placed", "occurred_at": "2025-02-01T10:00:00Z", "properties": {"amount_cents": 5000}}\n'
    )
    assert cli("import", "customers", str(customers), "--now", NOW)[0] == 0
    code, output = cli("import", "events", str(events), "--history", "--now", NOW)
    assert code == 0 and "2 events stored" in output
    code, output = cli("evaluate", "--dry-run", "--json", "--customer", "old1", "--now", NOW)
    (detail,) = json.loads(output)["details"]  # no pending event: only the sweep subject
    assert detail["event"] is None
    assert {m["playbook"] for m in detail["matches"]} == {"re_engagement"}  # the facts moved
    code, output = cli("tick", "--now", NOW)
    assert "1 enrolled" in output


def test_messages_retry_takes_several_ids_unique_prefixes_and_a_status_filter(env: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlmodel import Session

    from engine.bootstrap import bootstrap
    from engine.data.models import Message, MessageStatus
    from engine.settings import Settings

    now = datetime.fromisoformat(NOW).replace(tzinfo=UTC)
    application = bootstrap(Settings())
    rows = [
        ("aaaa1111-0000-4000-8000-000000000001", MessageStatus.AMBIGUOUS, timedelta(hours=2)),
        ("aaaa2222-0000-4000-8000-000000000002", MessageStatus.AMBIGUOUS, timedelta(minutes=10)),
        ("bbbb3333-0000-4000-8000-000000000003", MessageStatus.FAILED, None),
        ("cccc4444-0000-4000-8000-000000000004", MessageStatus.SENT, timedelta(hours=3)),
    ]
    with Session(application.db) as session:
        for message_id, status, age in rows:
            session.add(
                Message(
                    id=message_id,
                    dedupe_key=f"k-{message_id}",
                    customer_id="c1",
                    channel="sms",
                    template="last_chance",
                    to_address="+447700900123",
                    status=status,
                    attempted_at=now - age if age else None,
                    due_at=now,
                    created_at=now - timedelta(hours=4),
                    updated_at=now - timedelta(hours=4),
                )
            )
        session.commit()
    application.db.dispose()

    code, output = cli("messages", "list", "--status", "ambiguous")
    assert code == 0 and "aaaa1111" in output and "aaaa2222" in output and "bbbb" not in output
    code, output = cli(
        "messages", "list", "--status", "ambiguous", "--older-than", "1h", "--now", NOW
    )
    assert "aaaa1111" in output and "aaaa2222" not in output

    code, output = cli("messages", "retry", "aaaa")
    assert code == 1
    assert (
        "message id prefix 'aaaa' matches 2 messages: aaaa1111-0000-4000-8000-000000000001, "
        "aaaa2222-0000-4000-8000-000000000002; give more of the id" in output
    )
    assert "0 message(s) queued again; 1 refused" in output

    code, output = cli(
        "messages", "retry", "--status", "ambiguous", "--older-than", "1h", "--now", NOW
    )
    assert code == 0, output
    assert "1 message(s) queued again: aaaa1111; 0 refused" in output

    code, output = cli("messages", "retry", "aaaa2222", "bbbb3333", "cccc4444", "zzzz")
    assert code == 1
    assert "2 message(s) queued again: aaaa2222, bbbb3333; 2 refused" in output
    assert "cannot retry message cccc4444-0000-4000-8000-000000000004: it is sent" in output
    assert "no message with id 'zzzz'" in output
    code, output = cli("messages", "list", "--status", "queued", "--json")
    queued = {m["id"][:8]: m for m in json.loads(output)}
    assert set(queued) == {"aaaa1111", "aaaa2222", "bbbb3333"}
    assert queued["aaaa2222"]["last_error"] == "retried by hand (was ambiguous)"
    assert queued["bbbb3333"]["last_error"] == "retried by hand (was failed)"

    code, output = cli("messages", "retry", "--status", "ambiguous", "--older-than", "3x")
    assert code == 1 and "--older-than: bad duration '3x'" in output
    code, output = cli("messages", "retry")
    assert code == 1 and "give message ids, or --status (with --older-than), not both" in output
    code, output = cli("messages", "retry", "--status", "sent")
    assert code == 1 and "unknown status to retry 'sent'; use one of: ambiguous, failed" in output


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["tick", "--now", "0001-01-01T00:00:00+05:00"], "'--now': 0001-01-01T00:00:00+05:00"),
        (["evaluate", "--now", "9999-12-31T23:59:59-05:00"], "'--now': 9999-12-31T23:59:59-05:00"),
        (["tick", "--now", "0001-01-01T00:00:00Z"], "'--now': 0001-01-01T00:00:00Z"),
        (
            ["simulate", "--days", "2", "--start", "9999-12-30T00:00:00Z"],
            "'--start': 9999-12-30T00:00:00Z",
        ),
        (
            ["messages", "list", "--status", "ambiguous", "--older-than", "999999999d"],
            "--older-than: 999999999d",
        ),
    ],
    ids=["year-1-offset", "9999-offset", "year-1", "simulate-9999", "older-than"],
)
def test_moments_out_of_range_on_the_command_line_are_errors_not_tracebacks(
    env: Path, args: list[str], said: str
) -> None:
    """The out-of-range moments of issue 10 point 6, typed at a terminal: once an
    OverflowError traceback from deep in the engine; now the option is named, exit 1 or 2."""
    cli("init")
    result = runner.invoke(app, args)
    assert result.exit_code in (1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert said in result.output and "out of range" in result.output, result.output


def test_init_where_the_database_cannot_be_created_names_it_without_a_traceback(
    tmp_path: Path,
) -> None:
    """Once an OperationalError traceback: a SQLite file in a directory that is not there."""
    url = f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}"
    result = subprocess.run(
        [sys.executable, "-c", "from engine.cli import app; app()", "init"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "LIFECYCLE_DATABASE_URL": url,
            "LIFECYCLE_RULES_DIR": str(FIXTURE_RULES),
            "LIFECYCLE_TEMPLATES_DIR": str(FIXTURE_TEMPLATES),
        },
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "╭" not in result.stderr
    assert (
        f"error: the database at LIFECYCLE_DATABASE_URL={url} cannot be used: "
        "unable to open database file"
    ) in result.stderr


@pytest.mark.parametrize(
    "raised",
    [
        EvaluationWorkerCrashed("c-000100", 500, 3, "killed by signal 9"),
        OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly")),
    ],
    ids=["worker-died", "database-went-away"],
)
def test_an_error_no_command_expected_still_ends_as_one_error_line(
    raised: Exception, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root app's net: what reaches the top is a line naming it and exit 1."""
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", "postgresql+psycopg://ops:secret@db.example/x")
    net = LifecycleTyper()

    @net.command()
    def work() -> None:
        raise raised

    with pytest.raises(SystemExit) as exited:
        net([], prog_name="lifecycle")
    assert exited.value.code == 1
    said = capsys.readouterr().err
    assert said.startswith("error: ") and "Traceback" not in said
    if isinstance(raised, OperationalError):
        assert "LIFECYCLE_DATABASE_URL=postgresql+psycopg://ops:***@db.example/x" in said
        assert "server closed the connection unexpectedly" in said
    else:
        assert str(raised) in said.replace("\n", " ")

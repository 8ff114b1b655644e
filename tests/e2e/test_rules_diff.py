"""`lifecycle rules diff`: the impact of proposed rules on the customers in the database,
through the real CLI, checked against what `lifecycle evaluate` says of each version."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from engine.cli import app
from engine.data.db import make_engine
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("current", "proposed"):
        shutil.copytree(FIXTURE_RULES, tmp_path / name)
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", db_url)
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(tmp_path / "current"))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    monkeypatch.setenv("LIFECYCLE_OUTBOX_DIR", str(tmp_path / "outbox"))
    monkeypatch.setenv("COLUMNS", "300")
    return tmp_path


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def edit(path: Path, old: str, new: str) -> None:
    source = path.read_text()
    assert old in source, (path, old)
    path.write_text(source.replace(old, new))


def evaluate(rules: Path, monkeypatch: pytest.MonkeyPatch, moment: datetime) -> dict[str, Any]:
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(rules))
    code, output = cli("evaluate", "--dry-run", "--json", "--now", moment.isoformat())
    assert code == 0, output
    return dict(json.loads(output))


def diff(project: Path, moment: datetime, *extra: str) -> dict[str, Any]:
    code, output = cli(
        "rules",
        "diff",
        str(project / "proposed"),
        "--against",
        str(project / "current"),
        "--json",
        "--now",
        moment.isoformat(),
        *extra,
    )
    assert code == 0, output
    return dict(json.loads(output))


def test_the_counts_are_those_of_two_evaluate_runs(
    project: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("seed", "--customers", "600", "--now", NOW.isoformat())[0] == 0
    proposed = project / "proposed"
    # A lower loyalty threshold, a stricter referral ask, a new exit on re-engagement.
    edit(
        proposed / "loyalty_reward.yaml",
        "orders_count >= 5 or total_spend_cents >= $500",
        "orders_count >= 3 or total_spend_cents >= $300",
    )
    edit(proposed / "referral_ask.yaml", "nps_score >= 9", "nps_score >= 10")
    edit(proposed / "welcome_series.yaml", "email_opt_in", "email_opt_in and has_phone")
    before = evaluate(project / "current", monkeypatch, NOW)
    after = evaluate(proposed, monkeypatch, NOW)
    snapshot = _fingerprint(db_url)
    report = diff(project, NOW)
    assert _fingerprint(db_url) == snapshot  # read-only
    assert report["customers"] == before["customers"] == after["customers"]
    assert report["pending_events"] == before["pending_events"]
    for pid, impact in report["playbooks"].items():
        was, will = before["playbooks"][pid], after["playbooks"][pid]
        pairs = [
            (impact["entry"], was["matched"], will["matched"]),
            (impact["goal_met"], was["goal_met"], will["goal_met"]),
            (impact["no_longer_eligible"], was["no_longer_eligible"], will["no_longer_eligible"]),
            *((impact["steps"][s], was["steps"][s], will["steps"][s]) for s in was["steps"]),
        ]
        for movement, current, proposed_count in pairs:
            assert (movement["current"], movement["proposed"]) == (current, proposed_count), pid
            assert movement["proposed"] - movement["current"] == (
                movement["newly"] - movement["no_longer"]
            )
    loyalty = report["playbooks"]["loyalty_reward"]["entry"]
    referral = report["playbooks"]["referral_ask"]["entry"]
    welcome = report["playbooks"]["welcome_series"]["entry"]
    assert loyalty["newly"] > 0 and loyalty["no_longer"] == 0
    assert referral["no_longer"] > 0 and referral["newly"] == 0
    assert welcome["no_longer"] > 0 and welcome["newly"] == 0
    unchanged = report["playbooks"]["complaint_escalation"]["entry"]
    assert unchanged["newly"] == unchanged["no_longer"] == 0
    # The samples are real: each matches under the proposed rules and not the current.
    for customer in loyalty["newly_samples"][:2]:
        assert _matches(project / "current", customer, monkeypatch) is False
        assert _matches(proposed, customer, monkeypatch) is True


def _matches(rules: Path, customer: str, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(rules))
    code, output = cli("evaluate", "--customer", customer, "--json", "--now", NOW.isoformat())
    assert code == 0, output
    details = json.loads(output)["details"]
    return any(m["playbook"] == "loyalty_reward" for d in details for m in d["matches"])


def _fingerprint(url: str) -> list[Any]:
    """Every row count and the newest change of each table."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return [
                connection.execute(text(f"SELECT count(*) FROM {table}")).scalar()
                for table in ("customers", "events", "enrollments", "messages", "decisions")
            ] + [
                connection.execute(
                    text("SELECT count(*) FROM events WHERE evaluated_at IS NULL")
                ).scalar()
            ]
    finally:
        engine.dispose()


def _count(url: str, sql: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text(sql)).scalar() or 0)
    finally:
        engine.dispose()


def test_queued_messages_cancelled_and_journeys_stranded(project: Path, db_url: str) -> None:
    assert cli("seed", "--customers", "600", "--now", NOW.isoformat())[0] == 0
    late = datetime(2026, 3, 2, 22, 30, tzinfo=UTC)  # the day's loyalty SMS wait for 08:00
    assert cli("tick", "--now", late.isoformat())[0] == 0
    assert cli("tick", "--now", (late + timedelta(days=1)).isoformat())[0] == 0
    queued = _count(
        db_url,
        "SELECT count(*) FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "
        "WHERE m.status = 'queued' AND m.playbook = 'loyalty_reward' AND e.status = 'active'",
    )
    waiting = _count(
        db_url,
        "SELECT count(*) FROM enrollments WHERE status = 'active' "
        "AND playbook = 'referral_ask' AND step_id = 'reminder'",
    )
    assert queued > 0 and waiting > 0
    proposed = project / "proposed"
    edit(
        proposed / "loyalty_reward.yaml",
        "reentry: never\n",
        "reentry: never\nexit:\n  when: orders_count >= 1\n",
    )
    source = (proposed / "referral_ask.yaml").read_text()
    (proposed / "referral_ask.yaml").write_text(source[: source.index("  - id: reminder")])
    report = diff(project, late + timedelta(days=1, minutes=5), "--samples", "3")
    cancelled = [q for q in report["queued"] if q["effect"] == "cancelled"]
    assert [(q["playbook"], q["step"]) for q in cancelled] == [("loyalty_reward", "reward_sms")]
    assert cancelled[0]["count"] == queued
    assert cancelled[0]["reason"] == ("the journey exits (no longer eligible: orders_count >= 1)")
    assert len(cancelled[0]["samples"]) == min(3, queued)
    stranded = report["stranded"]
    assert [(s["playbook"], s["step"], s["removed"]) for s in stranded] == [
        ("referral_ask", "reminder", "step")
    ]
    assert stranded[0]["enrollments"] == waiting
    # The same in words.
    code, output = cli(
        "rules",
        "diff",
        str(proposed),
        "--against",
        str(project / "current"),
        "--now",
        (late + timedelta(days=1, minutes=5)).isoformat(),
    )
    assert code == 0, output
    assert (
        f"queued loyalty_reward/reward_sms: {queued} message{'s' if queued != 1 else ''} "
        "cancelled: the journey exits (no longer eligible: orders_count >= 1)"
    ) in output
    assert f"stranded: step referral_ask/reminder is removed: {waiting} active enrollment" in output
    assert "nothing was changed" in output


def test_a_changed_template_is_a_changed_queued_message(project: Path, db_url: str) -> None:
    assert cli("seed", "--customers", "300", "--now", NOW.isoformat())[0] == 0
    late = datetime(2026, 3, 2, 22, 30, tzinfo=UTC)
    assert cli("tick", "--now", late.isoformat())[0] == 0
    assert cli("tick", "--now", (late + timedelta(days=1)).isoformat())[0] == 0
    queued = _count(
        db_url,
        "SELECT count(*) FROM messages WHERE status = 'queued' AND playbook = 'loyalty_reward'",
    )
    assert queued > 0
    edit(
        project / "proposed" / "loyalty_reward.yaml",
        "template: loyalty_reward_sms",
        "template: last_chance",
    )
    report = diff(project, late + timedelta(days=1, minutes=5))
    changed = [q for q in report["queued"] if q["effect"] == "changed"]
    assert len(changed) == 1 and changed[0]["count"] == queued
    assert changed[0]["reason"] == (
        "the step now sends sms last_chance (was sms loyalty_reward_sms); "
        "this message goes as queued (sms loyalty_reward_sms)"
    )


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git checkout of a project whose rules are committed."""
    repo = tmp_path / "shop"
    shutil.copytree(FIXTURE_RULES, repo / "rules")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "rules"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "rules"], check=True)
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", f"sqlite:///{tmp_path / 'shop.db'}")
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(repo / "rules"))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    monkeypatch.setenv("COLUMNS", "300")
    assert cli("seed", "--customers", "200", "--now", NOW.isoformat())[0] == 0
    return repo


def test_against_a_git_revision_compares_with_the_committed_rules(checkout: Path) -> None:
    rules = checkout / "rules"
    before = hashlib.sha256((rules / "loyalty_reward.yaml").read_bytes()).hexdigest()
    code, output = cli("rules", "diff", "--json", "--now", NOW.isoformat())
    assert code == 0, output
    same = json.loads(output)
    assert same["current_version"] == same["proposed_version"]
    edit(rules / "loyalty_reward.yaml", "orders_count >= 5", "orders_count >= 2")
    code, output = cli("rules", "diff", "--against", "HEAD", "--json", "--now", NOW.isoformat())
    assert code == 0, output
    report = json.loads(output)
    assert report["against"] == "HEAD"
    assert report["current_version"] == same["current_version"]
    assert report["playbooks"]["loyalty_reward"]["entry"]["newly"] > 0
    assert hashlib.sha256((rules / "loyalty_reward.yaml").read_bytes()).hexdigest() != before
    status = subprocess.run(
        ["git", "-C", str(checkout), "status", "--porcelain"], capture_output=True, text=True
    )
    assert status.stdout.strip() == "M rules/loyalty_reward.yaml"  # nothing else was written


def test_an_unknown_revision_or_no_checkout_is_a_clear_error(
    checkout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, output = cli("rules", "diff", "--against", "no-such-branch")
    assert code == 1
    assert "cannot read the rules of 'no-such-branch': no such directory, and no such git " in (
        output.replace("\n", " ")
    )
    assert "Traceback" not in output
    outside = tmp_path / "plain"
    shutil.copytree(FIXTURE_RULES, outside / "rules")
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(outside / "rules"))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    code, output = cli("rules", "diff")
    assert code == 1
    assert "cannot read the rules of 'HEAD': no such directory, and" in output
    assert "is not in a git checkout" in output.replace("\n", " ")


def test_proposed_rules_with_mistakes_are_reported_not_compared(project: Path) -> None:
    assert cli("seed", "--customers", "50", "--now", NOW.isoformat())[0] == 0
    edit(project / "proposed" / "loyalty_reward.yaml", "orders_count >= 5", "order_count >= 5")
    code, output = cli(
        "rules", "diff", str(project / "proposed"), "--against", str(project / "current")
    )
    assert code == 1
    assert "loyalty_reward.yaml:7:" in output and "did you mean 'orders_count'?" in output
    assert "run `lifecycle rules check` and fix them first" in output

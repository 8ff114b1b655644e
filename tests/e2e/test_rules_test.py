"""`lifecycle rules test`: playbook tests written in YAML, run through the real CLI on the
fixture playbooks (each case on a scratch database of its own, on a fake clock)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

runner = CliRunner()

LOYAL = """\
cases:
  - name: the fifth order earns the reward, and the SMS waits for the morning
    start: 2026-03-02T21:30:00Z
    run_for: 3d
    customer:
      id: loyal-1
      email: fay@example.com
      phone: "+447700900124"
      timezone: Europe/London
      email_opt_in: true
      sms_opt_in: {sms}
    history:
      - {{at: 2026-01-05T12:00:00Z, type: order_placed, properties: {{amount_cents: 2000}}}}
      - {{at: 2026-01-19T12:00:00Z, type: order_placed, properties: {{amount_cents: 2000}}}}
      - {{at: 2026-02-02T12:00:00Z, type: order_placed, properties: {{amount_cents: 2000}}}}
      - {{at: 2026-02-16T12:00:00Z, type: order_placed, properties: {{amount_cents: 2000}}}}
    events:
      - {{at: +0m, type: order_placed, properties: {{amount_cents: 2000}}}}
    expect:
      - {{template: loyalty_reward, channel: email, at: "2026-03-02 21:30"}}
      - {{template: loyalty_reward_sms, channel: sms, at: "{sms_at}"}}
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    rules = tmp_path / "rules"
    shutil.copytree(FIXTURE_RULES, rules)
    (rules / "tests").mkdir()
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", f"sqlite:///{tmp_path / 'never-made.db'}")
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(rules))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    monkeypatch.setenv("COLUMNS", "300")
    return tmp_path


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_a_passing_case_says_ok_and_exits_0(project: Path) -> None:
    path = project / "rules" / "tests" / "loyalty.yaml"
    path.write_text(LOYAL.format(sms="true", sms_at="2026-03-04 08:00"))
    code, output = cli("rules", "test")
    assert code == 0, output
    assert f"ok    {path}:2: the fifth order earns the reward" in output
    assert "1 case in 1 file: 1 passed, 0 failed" in output
    assert not (project / "never-made.db").exists()  # a scratch database per case only


def test_a_wrong_time_fails_with_a_diff_naming_file_case_and_decision(project: Path) -> None:
    path = project / "rules" / "tests" / "loyalty.yaml"
    path.write_text(LOYAL.format(sms="true", sms_at="2026-03-03 21:30"))
    code, output = cli("rules", "test", str(path))
    assert code == 1, output
    lines = [line.strip() for line in output.splitlines()]
    assert (
        f"FAIL  {path}:2: the fifth order earns the reward, and the SMS waits for the morning"
        in lines
    )
    at = lines.index(
        "- expected sms loyalty_reward_sms at 2026-03-03 21:30 (Europe/London) (line 21)"
    )
    assert lines[at + 1] == "+ sent     sms loyalty_reward_sms at 2026-03-04 08:00"
    # The decision that explains it: the sending window held the SMS until 08:00.
    why = lines[at + 2 : at + 5]
    assert any(
        w.startswith("why: loyalty_reward/reward_sms deferred at 2026-03-03 21:30: ")
        and "08:00" in w
        for w in why
    ), why
    assert "1 case in 1 file: 0 passed, 1 failed" in output


def test_a_message_not_sent_is_explained_by_its_step_decision(project: Path) -> None:
    path = project / "rules" / "tests" / "loyalty.yaml"
    path.write_text(LOYAL.format(sms="false", sms_at="2026-03-04 08:00"))
    code, output = cli("rules", "test", str(project / "rules"))
    assert code == 1, output
    lines = [line.strip() for line in output.splitlines()]
    at = lines.index(
        "- expected sms loyalty_reward_sms at 2026-03-04 08:00 (Europe/London) (line 21)"
    )
    assert lines[at + 1] == "+ sent     nothing like it"
    assert lines[at + 2].startswith("why: loyalty_reward/reward_sms skipped at 2026-03-03 21:30:")
    assert "sms_opt_in" in lines[at + 2]


def test_unexpected_and_forbidden_messages_are_listed(project: Path) -> None:
    path = project / "rules" / "tests" / "welcome.yaml"
    path.write_text(
        """\
cases:
  - name: a sign-up gets nothing (wrong on purpose)
    start: 2026-03-02T09:00:00Z
    run_for: 1d
    customer: {email: ann@example.com, email_opt_in: true}
    events:
      - {at: +0m, type: signed_up}
    never:
      - {template: welcome}
"""
    )
    code, output = cli("rules", "test", str(path))
    assert code == 1, output
    lines = [line.strip() for line in output.splitlines()]
    assert "+ sent     email welcome at 2026-03-02 09:00, which the case does not expect" in lines
    assert "+ sent     email welcome at 2026-03-02 09:00, which `never` forbids (line 9)" in lines
    assert any(
        line.startswith("why: welcome_series/welcome queued at 2026-03-02 09:00") for line in lines
    )


def test_a_playbook_never_entered_says_which_condition_was_false(project: Path) -> None:
    path = project / "rules" / "tests" / "welcome.yaml"
    path.write_text(
        """\
cases:
  - name: a sign-up without consent still gets the welcome (wrong on purpose)
    start: 2026-03-02T09:00:00Z
    run_for: 1d
    customer: {email: ann@example.com, email_opt_in: false}
    events:
      - {at: +0m, type: signed_up}
    expect:
      - {template: welcome}
"""
    )
    code, output = cli("rules", "test", str(path))
    assert code == 1, output
    assert "- expected email welcome (UTC) (line 9)" not in output  # any channel
    assert "- expected any channel welcome (UTC) (line 9)" in output
    assert "why: welcome_series was never entered:" in output
    assert "email_opt_in" in output


def test_an_expected_case_priority_is_checked(project: Path) -> None:
    path = project / "rules" / "tests" / "complaint.yaml"
    path.write_text(
        """\
cases:
  - name: a severe complaint (expected low, on purpose)
    start: 2026-03-02T12:00:00Z
    run_for: 1d
    customer: {id: unhappy-1, email: kim@example.com}
    events:
      - {at: +0m, type: complaint, properties: {reason: Charged twice, severity: 3}}
    expect:
      - {template: complaint_apology, channel: email, at: "2026-03-02 12:00"}
    escalated: low
"""
    )
    code, output = cli("rules", "test", str(path))
    assert code == 1, output
    assert "- expected a case of priority low" in output
    assert "+ got      high" in output


def test_a_malformed_test_file_gives_every_mistake_at_its_line(project: Path) -> None:
    tests = project / "rules" / "tests"
    (tests / "broken.yaml").write_text("cases:\n  - name: [unclosed\n")
    (tests / "mistakes.yaml").write_text(
        """\
cases:
  - name: a case of the wrong shape
    start: 2026-03-02T09:00:00Z
    expect:
      - {template: welcome, channel: fax}
  - name: every other kind of mistake
    start: 2026-03-02 09:00
    run_for: 3dd
    customer:
      emial: ann@example.com
      timezone: Mars/Olympus
    history:
      - {at: 2026-03-05T00:00:00Z, type: order_placed}
    events:
      - {at: +1d, type: signup}
      - {at: +1d, type: order_placed, properties: {amount_cents: lots}}
    expect:
      - {template: welcom, channel: email, at: tomorrow, when: soon}
    escalated: severe
"""
    )
    code, output = cli("rules", "test", str(tests))
    assert code == 1, output
    assert "Traceback" not in output
    found = output.splitlines()
    broken, mistakes = str(tests / "broken.yaml"), str(tests / "mistakes.yaml")
    expected_prefixes = [
        f"{broken}:3:1: not valid YAML",
        f"{mistakes}:5:38: expect.0.channel: Input should be 'email' or 'sms'",
        f"{mistakes}:7:12: 2026-03-02 09:00 is not a moment with a UTC offset",
        f"{mistakes}:8:14: bad duration '3dd'",
        f"{mistakes}:10:7: customer: unknown key 'emial' (did you mean 'email'?)",
        f"{mistakes}:11:17: customer.timezone: Value error, 'Mars/Olympus' is not an IANA",
        f"{mistakes}:15:25: type: unknown event type 'signup' (did you mean 'signed_up'?)",
        f"{mistakes}:16:66: properties.amount_cents: expected money",
        f"{mistakes}:18:20: no playbook sends template 'welcom' on email (did you mean 'welcome'?)",
        f"{mistakes}:18:48: tomorrow is not a local time like 2026-03-02 09:00",
        f"{mistakes}:18:58: unknown key 'when'; allowed: template, channel, at",
        f"{mistakes}:19:16: escalated: 'severe' is not a priority",
    ]
    for prefix in expected_prefixes:
        assert any(line.startswith(prefix) for line in found), (prefix, output)
    assert "problems in the test files" in output


def test_a_history_event_after_the_start_is_refused_at_its_line(project: Path) -> None:
    path = project / "rules" / "tests" / "history.yaml"
    path.write_text(
        """\
cases:
  - name: history in the future
    start: 2026-03-02T09:00:00Z
    history:
      - {at: 2026-03-05T00:00:00Z, type: order_placed}
    events:
      - {at: 2026-04-30T00:00:00Z, type: site_visit}
"""
    )
    code, output = cli("rules", "test", str(path))
    assert code == 1, output
    assert f"{path}:5:14: a history event happens before the case's start" in output
    assert f"{path}:7:14: happens outside the run (2026-03-02T09:00Z for 14d)" in output


def test_no_test_files_is_an_error_not_a_pass(project: Path) -> None:
    code, output = cli("rules", "test")
    assert code == 1
    assert "no test files (*.yaml)" in output
    code, output = cli("rules", "test", str(project / "nowhere"))
    assert code == 1
    assert "no such file or directory" in output


def test_the_tests_directory_is_not_read_as_playbooks(project: Path) -> None:
    (project / "rules" / "tests" / "loyalty.yaml").write_text(
        LOYAL.format(sms="true", sms_at="2026-03-04 08:00")
    )
    code, output = cli("rules", "check", "--no-database")
    assert code == 0, output
    assert "5 playbooks ok" in output


def test_rules_with_problems_are_reported_before_any_case_runs(project: Path) -> None:
    (project / "rules" / "tests" / "loyalty.yaml").write_text(
        LOYAL.format(sms="true", sms_at="2026-03-04 08:00")
    )
    path = project / "rules" / "loyalty_reward.yaml"
    path.write_text(path.read_text().replace("orders_count >= 5", "order_count >= 5"))
    code, output = cli("rules", "test")
    assert code == 1
    assert f"{path}:7:" in output and "did you mean 'orders_count'?" in output
    assert "run `lifecycle rules check` and fix them first" in output
    assert "FAIL" not in output and "ok " not in output

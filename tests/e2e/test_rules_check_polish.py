"""`lifecycle rules check` as a real process: the send_window key (and its deprecated old
name), every syntax error of a condition, did-you-mean for event types, and the case
priority by complaint severity."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.cli import rules_check
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(FIXTURE_RULES, target)
    return target


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def line_col(path: Path, needle: str) -> tuple[int, int]:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number, line.index(needle) + 1
    raise AssertionError(needle)


def test_the_old_quiet_hours_key_still_works_with_a_warning_and_exit_0(rules: Path) -> None:
    policies = rules / "policies.yaml"
    edit(policies, "\nsend_window:", "\nquiet_hours:")
    welcome = rules / "welcome_series.yaml"
    edit(welcome, "reentry: never", 'reentry: never\nquiet_hours: {email: "09:00-18:00"}')
    result = rules_check(rules, FIXTURE_TEMPLATES)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    deprecated = (
        "warning: quiet_hours is deprecated: it holds the hours when sending is allowed, so it "
        "is now called send_window; rename the key (the meaning is the same)"
    )
    line, column = line_col(policies, "quiet_hours:")
    assert f"{policies}:{line}:{column}: {deprecated}" in lines
    line, column = line_col(welcome, "quiet_hours:")
    assert f"{welcome}:{line}:{column}: {deprecated}" in lines
    assert any(ln.startswith("5 playbooks ok") and ln.endswith(", 2 warnings") for ln in lines)


def test_send_window_and_quiet_hours_together_are_a_mistake(rules: Path) -> None:
    policies = rules / "policies.yaml"
    edit(policies, "\nsend_window:", '\nquiet_hours: {sms: "09:00-20:00"}\nsend_window:')
    result = rules_check(rules, FIXTURE_TEMPLATES)
    assert result.returncode == 1
    line, column = line_col(policies, "quiet_hours:")
    assert result.stdout.splitlines() == [
        f"{policies}:{line}:{column}: both send_window and quiet_hours are given: quiet_hours "
        "is the old name of send_window; keep send_window only"
    ]
    assert result.stderr.strip() == "1 problem found"


def test_every_syntax_error_of_a_condition_is_reported_at_its_column(rules: Path) -> None:
    loyalty = rules / "loyalty_reward.yaml"
    text = "(orders_count >= 5 or total_spend_cents >= $500) and email_opt_in"
    broken = "(orders_count >= or total_spend_cents => $500) && email_opt_in"
    edit(loyalty, text, broken)
    welcome = rules / "welcome_series.yaml"
    edit(welcome, "on: signed_up", "on: signup")
    result = rules_check(rules, FIXTURE_TEMPLATES)
    assert result.returncode == 1
    line, start = line_col(loyalty, broken)
    on_line, on_column = line_col(welcome, "signup")
    assert result.stdout.splitlines() == [
        f"{loyalty}:{line}:{start + broken.index('or ')}: expected a fact, a value or '(', "
        "found 'or'",
        f"{loyalty}:{line}:{start + broken.index('=>')}: write '>=' for 'at least'",
        f"{loyalty}:{line}:{start + broken.index('&&')}: write 'and' instead of '&&'",
        f"{welcome}:{on_line}:{on_column}: unknown event type 'signup' (did you mean "
        "'signed_up'?); declare it in catalog.yaml",
    ]
    assert result.stderr.strip() == "4 problems found"

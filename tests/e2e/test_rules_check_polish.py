"""`lifecycle rules check` as a real process: the send_window key (and its deprecated old
name), every syntax error of a condition, did-you-mean for event types, and the case
priority by complaint severity."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.cli import rules_check
from tests.support.edits import edit, line_col
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(FIXTURE_RULES, target)
    return target


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


def test_the_priority_by_severity_map_is_checked(rules: Path) -> None:
    path = rules / "complaint_escalation.yaml"
    edit(path, "by: event.severity", "by: event.severerity")
    edit(path, "map: {1: low, 2: normal, 3: high}", "map: {1: low, two: normal, 3: hihg}")
    edit(path, "otherwise: high", "otherwise: soon")
    result = rules_check(rules, FIXTURE_TEMPLATES)
    assert result.returncode == 1
    at = {needle: line_col(path, needle) for needle in ("event.severerity", "two:", "hihg", "soon")}
    assert result.stdout.splitlines() == [
        f"{path}:{at['event.severerity'][0]}:{at['event.severerity'][1]}: unknown fact "
        "'event.severerity' (did you mean 'event.severity'?)",
        f"{path}:{at['hihg'][0]}:{at['hihg'][1]}: unknown priority 'hihg' (did you mean "
        "'high'?); write one of urgent, high, normal, low",
        f"{path}:{at['soon'][0]}:{at['soon'][1]}: unknown priority 'soon'; write one of "
        "urgent, high, normal, low",
    ]
    # With the fact right, a key that is not a value of it is found too.
    edit(path, "by: event.severerity", "by: event.severity")
    lines = rules_check(rules, FIXTURE_TEMPLATES).stdout.splitlines()
    two = f"{path}:{at['two:'][0]}:{at['two:'][1]}"
    assert f"{two}: 'two' is not a value of 'event.severity': write a whole number" in lines


def test_an_event_property_chooses_a_priority_only_where_the_event_is_known(
    rules: Path,
) -> None:
    path = rules / "complaint_escalation.yaml"
    edit(path, "  - id: open_case\n", "  - id: open_case\n    wait: 1h\n")
    edit(path, "otherwise: high", "otherwise: normal")
    result = rules_check(rules, FIXTURE_TEMPLATES)
    line, column = line_col(path, "event.severity")
    assert result.stdout.splitlines() == [
        f"{path}:{line}:{column}: 'event.severity' is only known while the playbook is "
        "entered on an event: use it in a step that runs then (entered with enter.on, no "
        "wait before the step)"
    ]


def test_a_playbook_names_a_declared_topic_and_only_marketing_has_one(rules: Path) -> None:
    loyalty = rules / "loyalty_reward.yaml"
    edit(loyalty, "topic: offers", "topic: ofers")
    complaint = rules / "complaint_escalation.yaml"
    complaint.write_text(complaint.read_text() + "topic: offers\n")
    catalog = rules / "catalog.yaml"
    edit(catalog, "topics:\n", "topics:\n  Big-News:\n    description: shouting\n")
    result = rules_check(rules, FIXTURE_TEMPLATES)
    assert result.returncode == 1
    at = {
        path: line_col(path, needle)
        for path, needle in ((loyalty, "ofers"), (complaint, "offers"), (catalog, "Big-News"))
    }
    assert result.stdout.splitlines() == [
        f"{catalog}:{at[catalog][0]}:{at[catalog][1]}: topic 'Big-News': write a name of "
        "lower-case letters, digits and _, like product_news",
        f"{complaint}:{at[complaint][0]}:{at[complaint][1]}: a transactional playbook has no "
        "topic: its messages go whatever the customer's topics say; remove topic, or make the "
        "playbook kind: marketing",
        f"{loyalty}:{at[loyalty][0]}:{at[loyalty][1]}: unknown topic 'ofers' (did you mean "
        "'offers'?); declare it under topics: in catalog.yaml (declared: newsletter, offers, "
        "product_news)",
    ]

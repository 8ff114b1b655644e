"""The impact preview's decisions, on plain data: what each version matches, and the fate
of a queued message or an active journey (engine.usecases.rules_diff)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.evaluation.model import Subject
from engine.playbooks.loader import load_rules
from engine.playbooks.model import RuleSet, enter_rule, exit_rule, goal_rule
from engine.usecases.rules_diff import (
    Movement,
    QueuedRow,
    cancelled_by,
    send_change,
    starts,
    stranding,
)
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

CONSENTED = {"has_email": True, "email_opt_in": True, "topic.offers": True}


@pytest.fixture(scope="module")
def current() -> RuleSet:
    return load_rules(FIXTURE_RULES, FIXTURE_TEMPLATES)


def changed(tmp_path: Path, name: str, old: str, new: str) -> RuleSet:
    shutil.copytree(FIXTURE_RULES, tmp_path / "rules")
    path = tmp_path / "rules" / name
    source = path.read_text()
    assert old in source
    path.write_text(source.replace(old, new))
    return load_rules(tmp_path / "rules", FIXTURE_TEMPLATES)


def row(playbook: str, step: str, *, active: bool = True, template: str = "t") -> QueuedRow:
    return QueuedRow("m1", "c1", playbook, step, "email", template, "marketing", 50, 7, active)


def test_a_sweep_starts_only_playbooks_without_an_event_trigger(current: RuleSet) -> None:
    sweep = Subject("c1", {})
    signup = Subject("c1", {}, event_id="e1", event_type="signed_up")
    fired = frozenset({enter_rule("loyalty_reward"), enter_rule("welcome_series")})
    assert starts(current, "loyalty_reward", sweep, fired)
    assert not starts(current, "welcome_series", sweep, fired)
    assert starts(current, "welcome_series", signup, fired)
    assert not starts(current, "loyalty_reward", signup, fired)
    assert not starts(current, "no_such_playbook", sweep, fired)


def test_a_movement_counts_both_sides_and_samples_who_moved() -> None:
    movement = Movement()
    for customer, was, will in [("a", True, True), ("b", False, True), ("c", True, False)]:
        movement.count(was, will, customer, samples=5)
    movement.count(False, True, "d", samples=1)
    assert (movement.current, movement.proposed) == (2, 3)
    assert (movement.newly, movement.no_longer) == (2, 1)
    assert movement.newly_samples == ["b"] and movement.no_longer_samples == ["c"]


def test_an_exit_that_holds_cancels_what_an_active_journey_queued(current: RuleSet) -> None:
    message = row("referral_ask", "reminder")
    fired = frozenset({exit_rule("referral_ask")})
    assert cancelled_by(current, message, fired, CONSENTED) == (
        "the journey exits (no longer eligible: open_complaints > 0)"
    )
    assert cancelled_by(current, message, frozenset(), CONSENTED) is None
    ended = row("referral_ask", "reminder", active=False)
    assert cancelled_by(current, ended, fired, CONSENTED) is None  # nothing left to exit


def test_a_condition_goal_that_holds_cancels_too(tmp_path: Path) -> None:
    rules = changed(
        tmp_path, "loyalty_reward.yaml", "reentry: never\n", "reentry: never\ngoal:\n  when: vip\n"
    )
    fired = frozenset({goal_rule("loyalty_reward")})
    assert cancelled_by(rules, row("loyalty_reward", "reward_sms"), fired, CONSENTED) == (
        "the journey converts (goal reached: vip)"
    )


def test_consent_at_send_time_follows_the_topic_of_the_rules(current: RuleSet) -> None:
    message = row("referral_ask", "ask")
    left = {**CONSENTED, "topic.offers": False}
    assert cancelled_by(current, message, frozenset(), left) == (
        "at send time: not subscribed to the offers topic (opted out, or never opted in)"
    )
    removed = RuleSet(
        playbooks={k: v for k, v in current.playbooks.items() if k != "referral_ask"},
        catalog=current.catalog,
        policies=current.policies,
        version="x",
        roster=current.roster,
    )
    # The playbook is gone: its journey is cancelled, and the message with it.
    assert cancelled_by(removed, message, frozenset(), left) == (
        "the journey is cancelled (its playbook was removed)"
    )
    assert stranding(removed, "referral_ask", "reminder") == "playbook"
    # A message of no journey (a case's apology, say) goes without a topic.
    orphan = QueuedRow(
        "m2", "c1", "referral_ask", "ask", "email", "t", "marketing", 50, None, False
    )
    assert cancelled_by(removed, orphan, frozenset(), left) is None


def test_a_removed_step_strands_the_journeys_waiting_for_it(tmp_path: Path) -> None:
    source = (FIXTURE_RULES / "referral_ask.yaml").read_text()
    rules = changed(tmp_path, "referral_ask.yaml", source[source.index("  - id: reminder") :], "")
    assert stranding(rules, "referral_ask", "reminder") == "step"
    assert stranding(rules, "referral_ask", "ask") is None
    assert stranding(rules, "referral_ask", None) is None  # completing: every step done


def test_a_step_sending_another_template_changes_its_queued_messages(
    current: RuleSet, tmp_path: Path
) -> None:
    proposed = changed(
        tmp_path, "referral_ask.yaml", "template: referral_reminder", "template: referral_ask"
    )
    message = row("referral_ask", "reminder", template="referral_reminder")
    assert send_change(current, proposed, message) == (
        "the step now sends email referral_ask (was email referral_reminder); "
        "this message goes as queued (email referral_reminder)"
    )
    assert send_change(current, current, message) is None

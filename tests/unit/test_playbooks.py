"""Rule files: the shipped ones load; every kind of mistake is reported at its place."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from engine.errors import RulesInvalid
from engine.playbooks import loader
from engine.playbooks.loader import load_rules
from engine.playbooks.model import enter_rule, exit_rule, goal_rule, step_rule
from tests.support.edits import edit, line_col
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = FIXTURE_TEMPLATES


def test_shipped_rules_load(rules_dir: Path) -> None:
    rules = load_rules(rules_dir, TEMPLATES)
    assert set(rules.playbooks) == {
        "welcome_series",
        "re_engagement",
        "loyalty_reward",
        "referral_ask",
        "complaint_escalation",
    }
    welcome = rules.playbooks["welcome_series"]
    assert [s.id for s in welcome.steps] == ["welcome", "tips", "first_order_offer"]
    assert [s.wait for s in welcome.steps] == [timedelta(0), timedelta(days=2), timedelta(days=3)]
    assert welcome.reentry is None
    assert rules.playbooks["re_engagement"].reentry == timedelta(days=90)
    assert welcome.enter.source == 'event == "signed_up" and (email_opt_in)'
    conditions = rules.conditions()
    assert enter_rule("welcome_series") in conditions
    assert goal_rule("welcome_series") in conditions
    assert exit_rule("referral_ask") in conditions
    assert step_rule("welcome_series", "first_order_offer") in conditions
    assert len(rules.version) == 12
    assert rules.roster.on_duty(1) is not None and rules.roster.on_duty(1).name == "Priya Shah"
    assert rules.roster.on_duty(2).tier == 2


@pytest.fixture
def rules_copy(tmp_path: Path, rules_dir: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(rules_dir, target)
    return target


def problems_of(directory: Path) -> list[str]:
    with pytest.raises(RulesInvalid) as caught:
        load_rules(directory, TEMPLATES)
    return [str(p) for p in caught.value.problems]


def test_misspelled_fact_is_located_with_a_suggestion(rules_copy: Path) -> None:
    path = rules_copy / "welcome_series.yaml"
    edit(path, "when: orders_count >= 1", "when: order_count >= 1")
    line, column = line_col(path, "order_count >= 1")
    assert problems_of(rules_copy) == [
        f"{path}:{line}:{column}: unknown fact 'order_count' (did you mean 'orders_count'?)"
    ]


def test_bad_duration_is_located(rules_copy: Path) -> None:
    path = rules_copy / "welcome_series.yaml"
    edit(path, "wait: 2d", "wait: 2 days")
    line, column = line_col(path, "2 days")
    (problem,) = problems_of(rules_copy)
    assert problem.startswith(f"{path}:{line}:{column}: bad duration '2 days'")


def test_every_mistake_is_reported_at_once(rules_copy: Path) -> None:
    welcome = rules_copy / "welcome_series.yaml"
    edit(welcome, "template: getting_started", "template: getting_startd")
    edit(welcome, "id: tips", "id: welcome")
    edit(welcome, "wait: 3d", "wiat: 3d")
    loyalty = rules_copy / "loyalty_reward.yaml"
    edit(loyalty, "orders_count >= 5", 'orders_count >= "5"')
    edit(loyalty, "channel: email", "channel: emial")
    problems = problems_of(rules_copy)
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "unknown email template 'getting_startd' (did you mean 'getting_started'?)" in text
    assert "duplicate step id 'welcome' (also step 1)" in text
    assert "unknown key 'wiat' (did you mean 'wait'?)" in text
    assert "unknown channel 'emial' (did you mean 'email'?)" in text
    assert any(
        "loyalty_reward.yaml" in p and "'orders_count'" in p and "text" in p for p in problems
    ), text


def test_yaml_syntax_error_is_located(rules_copy: Path) -> None:
    path = rules_copy / "referral_ask.yaml"
    edit(path, "priority: 50", "priority: [50")
    (problem,) = problems_of(rules_copy)
    assert problem.startswith(f"{path}:") and "not valid YAML" in problem


def test_event_facts_only_on_entry(rules_copy: Path) -> None:
    path = rules_copy / "welcome_series.yaml"
    edit(path, "when: orders_count >= 1", 'when: event == "order_placed"')
    (problem,) = problems_of(rules_copy)
    assert "'event' is only known when the playbook is entered on an event" in problem


def test_unknown_event_type_suggests(rules_copy: Path) -> None:
    path = rules_copy / "welcome_series.yaml"
    edit(path, "on: signed_up", "on: signup")
    (problem,) = problems_of(rules_copy)
    assert "unknown event type 'signup' (did you mean 'signed_up'?)" in problem


def test_template_that_does_not_render_is_reported(rules_copy: Path, tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    (templates / "email" / "welcome.subject").write_text("Hello {{ customer.frist_name }}\n")
    with pytest.raises(RulesInvalid) as caught:
        load_rules(rules_copy, templates)
    problems = [str(p) for p in caught.value.problems]
    (problem,) = [p for p in problems if "template does not render" in p]
    assert "frist_name" in problem
    # ...and the French variant, which kept first_name, now differs from its default.
    assert any("the fr variant does not use customer.frist_name" in p for p in problems)


def test_sms_over_the_segment_limit_is_reported(rules_copy: Path, tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    (templates / "sms" / "last_chance.txt").write_text("Dernière chance ✨ " * 12 + "\n")
    with pytest.raises(RulesInvalid) as caught:
        load_rules(rules_copy, templates)
    (problem,) = [str(p) for p in caught.value.problems]
    assert (
        "SMS 'last_chance' is" in problem
        and "UCS-2" in problem
        and "the playbook allows 2" in problem
    )


def test_bad_reentry_and_priority(rules_copy: Path) -> None:
    edit(rules_copy / "re_engagement.yaml", "reentry: after 90d", "reentry: sometimes")
    edit(rules_copy / "complaint_escalation.yaml", "3: high}", "3: hihg}")
    text = "\n".join(problems_of(rules_copy))
    assert "bad reentry 'sometimes': write never or after 90d" in text
    assert "unknown priority 'hihg' (did you mean 'high'?)" in text


def test_catalog_mistakes(rules_copy: Path) -> None:
    edit(
        rules_copy / "catalog.yaml",
        "type: string\n    description: Subscription",
        "type: text\n    description: Subscription",
    )
    text = "\n".join(problems_of(rules_copy))
    assert "catalog.yaml" in text and "attributes.plan.type" in text


def test_alias_bomb_is_refused_not_expanded(rules_copy: Path) -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for n in range(1, 9):
        previous = f"*a{n - 1}"
        lines.append(f"a{n}: &a{n} [{', '.join([previous] * 10)}]")
    path = rules_copy / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    (problem,) = problems_of(rules_copy)
    assert problem == f"{path}:1:1: too large: more than 100,000 values once aliases are expanded"


def test_a_problem_is_reported_on_one_line_even_when_a_key_holds_a_line_break(
    rules_copy: Path,
) -> None:
    """Found by the rule-file fuzzer: an attribute named "\\n" split its problem over two
    lines, which editors and grep cannot read as path:line:col."""
    edit(rules_copy / "catalog.yaml", "attributes:\n", 'attributes:\n  "\\n":\n')
    problems = problems_of(rules_copy)
    assert problems and all("\n" not in p for p in problems)
    expected = r"attributes.\n: Input should be a valid dictionary or instance of AttributeSpec"
    assert any(p.endswith(expected) for p in problems), problems


def test_a_playbook_that_escalates_with_no_roster_is_a_problem_at_its_step(
    rules_copy: Path,
) -> None:
    (rules_copy / "support_roster.yaml").unlink()
    assert problems_of(rules_copy) == [
        f"{rules_copy}/complaint_escalation.yaml:15:7: step 'open_case' of complaint_escalation "
        f"escalates, but there is no support roster {rules_copy}/support_roster.yaml: nobody "
        "would be notified of its cases; list the support leads there (or point "
        "LIFECYCLE_ROSTER_FILE at the roster)"
    ]


def test_an_empty_roster_is_a_problem_in_the_roster(rules_copy: Path) -> None:
    (rules_copy / "support_roster.yaml").write_text("# nobody yet\nleads: []\n")
    assert problems_of(rules_copy) == [
        f"{rules_copy}/support_roster.yaml:2:8: no support leads: nobody would be notified of "
        "the cases that complaint_escalation opens; list at least one lead of tier 1 on duty"
    ]
    (rules_copy / "support_roster.yaml").write_text(
        "leads:\n  - {name: Tom, email: tom@example.com, tier: 1, on_duty: false}\n"
    )
    assert problems_of(rules_copy) == [
        f"{rules_copy}/support_roster.yaml:2:3: nobody of tier 1 is on duty"
    ]


def test_without_an_escalating_playbook_no_roster_is_needed(rules_copy: Path) -> None:
    (rules_copy / "support_roster.yaml").unlink()
    (rules_copy / "complaint_escalation.yaml").unlink()
    rules = load_rules(rules_copy, TEMPLATES)
    assert rules.roster.leads == () and "complaint_escalation" not in rules.playbooks


def test_the_roster_file_is_the_one_handed_in(rules_copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "leads.yaml"
    elsewhere.write_text("leads:\n  - {name: Zoe Field, email: zoe@example.com, tier: 1}\n")
    (rules_copy / "support_roster.yaml").unlink()
    rules = load_rules(rules_copy, TEMPLATES, roster_file=elsewhere)
    assert [lead.name for lead in rules.roster.leads] == ["Zoe Field"]
    inside = rules_copy / "team.yaml"  # in the rules directory: not read as a playbook
    inside.write_text(elsewhere.read_text())
    assert load_rules(rules_copy, TEMPLATES, roster_file=inside).roster.leads[0].name == "Zoe Field"
    # Without it, team.yaml is read as a playbook (and fails), and nobody is notified.
    assert any(p.startswith(f"{rules_copy}/team.yaml:1:1: ") for p in problems_of(rules_copy))


def test_roster_emails_and_phones_are_checked_and_normalised_by_the_libraries(
    rules_copy: Path,
) -> None:
    """The roster uses the same validators as ingestion (email-validator, phonenumbers)."""
    (rules_copy / "support_roster.yaml").write_text(
        "leads:\n"
        "  - {name: Zoe, email: Zoe@Example.com, phone: +44 7700 900123, tier: 1}\n"
        "  - {name: Tom, email: tom@example, phone: '+44 7700 9001234567', tier: 2}\n"
    )
    assert problems_of(rules_copy) == [
        f"{rules_copy}/support_roster.yaml:3:24: 'tom@example' is not an email address: The "
        "part after the @-sign is not valid. It should have a period.",
        f"{rules_copy}/support_roster.yaml:3:44: '+44 7700 9001234567' is not a possible "
        "phone number: it is too long for its country",
    ]
    (rules_copy / "support_roster.yaml").write_text(
        "leads:\n  - {name: Zoe, email: Zoe@Example.com, phone: +44 7700 900123, tier: 1}\n"
    )
    [zoe] = load_rules(rules_copy, TEMPLATES).roster.leads
    assert (zoe.email, zoe.phone) == ("zoe@example.com", "+447700900123")


GRAPH = """playbook: graph
stage: test
description: A journey with every kind of mistake a graph can have.
enter: {when: email_opt_in}
holdout: 110%
steps:
  - id: start
    send: {channel: email, template: welcome}
    next: nowhere
  - id: loop_a
    branch:
      cases:
        - {when: orders_count >= 1, goto: loop_b}
      otherwise: end
  - id: loop_b
    send: {channel: email, template: welcome}
    next: loop_a
  - id: pick
    split:
      - {arm: holdout, weight: 1, goto: end}
      - {arm: b, weight: 0, goto: end}
  - id: await
    wait_for: {event: order_placd, within: 3d, then: end, otherwise: start}
"""


def test_a_journey_graph_is_checked_as_a_whole_every_problem_at_once(rules_copy: Path) -> None:
    path = rules_copy / "graph.yaml"
    path.write_text(GRAPH)
    problems = [p for p in problems_of(rules_copy) if "graph.yaml" in p]
    messages = [p.split(": ", 1)[1] for p in problems]
    assert "share '110%' must be more than 0% and less than 100%" in messages
    assert "'holdout' names the control groups; pick another" in messages
    assert "a weight is a whole number, 1 or more" in messages
    assert (
        "unknown event type 'order_placd' (did you mean 'order_placed'?); declare it in catalog.yaml"
        in messages
    )
    assert any(p.endswith(":9:11: no step 'nowhere' in this playbook") for p in problems), problems


def test_unreachable_steps_and_cycles_that_never_wait_are_refused(rules_copy: Path) -> None:
    path = rules_copy / "graph.yaml"
    path.write_text(
        GRAPH.replace("holdout: 110%\n", "")
        .replace("next: nowhere", "next: end")
        .replace("arm: holdout", "arm: a")
        .replace("weight: 0", "weight: 1")
        .replace("order_placd", "order_placed")
    )
    problems = [p for p in problems_of(rules_copy) if "graph.yaml" in p]
    assert problems == [
        f"{path}:9:9: step 'loop_a' is never reached from the first step",
        f"{path}:9:9: these steps loop without waiting: loop_a -> loop_b -> loop_a "
        "(give one of them a wait)",
        f"{path}:14:9: step 'loop_b' is never reached from the first step",
        f"{path}:17:9: step 'pick' is never reached from the first step",
        f"{path}:21:9: step 'await' is never reached from the first step",
    ]


def test_a_file_saved_while_the_rules_load_is_read_whole_under_its_own_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalog is read before the playbooks: a save in between once gave the old catalog
    under the new version, so a reload said "version X" and still refused the new event."""
    rules_dir = tmp_path / "rules"
    shutil.copytree(FIXTURE_RULES, rules_dir)
    catalog = rules_dir / "catalog.yaml"
    saved = catalog.read_text().replace(
        "events:\n", "events:\n  newsletter_clicked:\n    description: A click.\n"
    )
    policies = loader.load_policies

    def save_midway(directory: Path, problems: list[object]) -> object:
        if catalog.read_text() != saved:
            catalog.write_text(saved)  # the marketer saves after the catalog was parsed
        return policies(directory, problems)  # type: ignore[arg-type]

    monkeypatch.setattr(loader, "load_policies", save_midway)
    rules = load_rules(rules_dir, TEMPLATES)
    monkeypatch.undo()
    assert "newsletter_clicked" in rules.catalog.event_types
    assert rules.version == load_rules(rules_dir, TEMPLATES).version

"""The stage model: the first stage that holds wins, a change starts the stage at ``now``;
``stages.yaml`` is checked like a playbook (every mistake at its ``path:line:col``), and
playbooks that compare a stage fact with text name a stage that exists."""

from __future__ import annotations

import pickle
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.errors import RulesInvalid
from engine.playbooks.loader import load_rules
from engine.stages.model import Recorded, StageChange
from tests.support.edits import edit, line_col
from tests.support.paths import ROOT

STAGES = ROOT / "tests" / "fixtures" / "stages"
TEMPLATES = STAGES / "templates"
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
def rules_copy(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(STAGES / "rules", target)
    return target


def problems_of(directory: Path) -> list[str]:
    with pytest.raises(RulesInvalid) as caught:
        load_rules(directory, TEMPLATES)
    return [str(p) for p in caught.value.problems]


def model():  # type: ignore[no-untyped-def]
    stages = load_rules(STAGES / "rules", TEMPLATES).stages
    assert stages is not None
    return stages


def facts(**values: object) -> dict[str, object]:
    base: dict[str, object] = {
        "orders_count": 0,
        "days_since_last_activity": 0,
        "days_since_signup": 0,
    }
    return {**base, **values}


def test_the_first_stage_that_holds_wins_and_the_last_takes_everyone_else() -> None:
    stages = model()
    assert stages.names == ("churned", "at_risk", "loyal", "active", "prospect")
    assert stages.funnel == ("prospect", "active", "loyal", "at_risk", "churned")
    assert stages.classify(facts()) == "prospect"
    assert stages.classify(facts(orders_count=1)) == "active"
    assert stages.classify(facts(orders_count=5)) == "loyal"
    # A loyal customer quiet for 60 days is at risk (checked before loyal), then churned.
    assert stages.classify(facts(orders_count=5, days_since_last_activity=60)) == "at_risk"
    assert stages.classify(facts(orders_count=5, days_since_last_activity=180)) == "churned"
    # An unknown fact makes its comparison false, as everywhere in the language.
    assert stages.classify({"orders_count": None}) == "prospect"
    assert stages.label("at_risk") == "At risk" and stages.label("loyal") == "Loyal"


def test_a_change_starts_the_stage_now_and_no_change_keeps_its_start() -> None:
    stages = model()
    first = stages.assign(facts(), Recorded(), NOW)
    assert first.change == StageChange(None, "prospect")
    assert first.facts(NOW) == {"stage": "prospect", "days_in_stage": 0, "previous_stage": None}
    later = NOW + timedelta(days=9, hours=5)
    kept = stages.assign(facts(), Recorded("prospect", NOW, None), later)
    assert kept.change is None
    assert kept.facts(later)["days_in_stage"] == 9
    moved = stages.assign(facts(orders_count=1), Recorded("prospect", NOW, None), later)
    assert moved.change == StageChange("prospect", "active")
    assert moved.facts(later) == {
        "stage": "active",
        "days_in_stage": 0,
        "previous_stage": "prospect",
    }


def test_the_model_crosses_to_worker_processes() -> None:
    stages = model()
    copy = pickle.loads(pickle.dumps(stages))
    assert copy.classify(facts(orders_count=5)) == "loyal"


def test_without_stages_yaml_there_is_no_model_and_stage_facts_are_refused(
    rules_copy: Path,
) -> None:
    (rules_copy / "stages.yaml").unlink()
    path = rules_copy / "win_back.yaml"
    line, column = line_col(path, 'stage == "at_risk"')
    assert problems_of(rules_copy)[0] == (
        f"{path}:{line}:{column}: 'stage' needs a stage model: add stages.yaml to the rules "
        "directory"
    )
    edit(path, 'stage == "at_risk" and days_in_stage == 0 and previous_stage != "churned" and ', "")
    assert load_rules(rules_copy, TEMPLATES).stages is None


def test_a_playbook_naming_a_stage_that_does_not_exist_is_told_the_stages(
    rules_copy: Path,
) -> None:
    path = rules_copy / "win_back.yaml"
    edit(path, 'stage == "at_risk"', 'stage == "at_rsk"')
    line, column = line_col(path, '"at_rsk"')
    assert problems_of(rules_copy) == [
        f"{path}:{line}:{column}: unknown stage 'at_rsk' (did you mean 'at_risk'?); the stages "
        "are churned, at_risk, loyal, active, prospect"
    ]


def test_every_mistake_in_stages_yaml_is_reported_at_its_place(rules_copy: Path) -> None:
    path = rules_copy / "stages.yaml"
    edit(path, "when: days_since_last_activity >= 180", "when: days_since_last_activty >= 180")
    edit(path, "when: orders_count >= 3", "when: orders_count >= ")
    edit(
        path,
        "  - stage: active\n    when: orders_count >= 1",
        '  - stage: Active\n    when: stage == "loyal"',
    )
    edit(path, "  - stage: prospect", "  - stage: prospect\n    when: orders_count == 0")
    edit(path, "funnel: [prospect, active,", "funnel: [prospekt, active,")
    unknown = line_col(path, "days_since_last_activty")
    syntax = next(
        (n, 1) for n, text in enumerate(path.read_text().splitlines(), 1) if text.endswith(">= ")
    )
    bad_name = line_col(path, "Active")
    uses_stage = line_col(path, 'stage == "loyal"')
    catch_all = line_col(path, "orders_count == 0")
    funnel = line_col(path, "prospekt")
    problems = problems_of(rules_copy)
    assert (
        f"{path}:{unknown[0]}:{unknown[1]}: unknown fact 'days_since_last_activty' (did you mean 'days_since_last_activity'?)"
        in problems
    )
    assert any(p.startswith(f"{path}:{syntax[0]}:") for p in problems if "expected" in p), problems
    assert (
        f"{path}:{bad_name[0]}:{bad_name[1]}: stage 'Active': write a name of lower-case letters, digits and _, like at_risk"
        in problems
    )
    assert (
        f"{path}:{uses_stage[0]}:{uses_stage[1]}: 'stage' is decided by the stages themselves; a stage's when cannot use it"
        in problems
    )
    assert (
        f"{path}:{catch_all[0]}:{catch_all[1]}: the last stage ('prospect') is the catch-all: leave out its when, so that every customer has a stage"
        in problems
    )
    assert (
        f"{path}:{funnel[0]}:{funnel[1]}: unknown stage 'prospekt' (did you mean 'prospect'?)"
        in problems
    )


def test_a_catch_all_before_the_end_and_a_syntax_error_of_the_file(rules_copy: Path) -> None:
    path = rules_copy / "stages.yaml"
    edit(path, "    when: orders_count >= 3\n", "")
    line, column = line_col(path, "stage: loyal")
    assert problems_of(rules_copy) == [
        f"{path}:{line}:{column + len('stage: ')}: stage 'loyal' has no when: only the last "
        "stage is the catch-all (the stages after it could never match)"
    ]
    path.write_text("stages:\n  - stage: churned\n    when: [unclosed\n")
    (problem,) = problems_of(rules_copy)
    assert problem.startswith(f"{path}:")
    assert ":3:" in problem or ":4:" in problem


def test_the_planner_records_a_change_and_a_customer_with_nothing_else_needs_no_journey() -> None:
    from engine.evaluation.model import Evaluation, Subject
    from engine.journeys.effects import CustomerSnapshot, RecordStage
    from engine.journeys.plan import has_work, plan, stage_plans

    rules = load_rules(STAGES / "rules", TEMPLATES)
    change = StageChange("active", "at_risk")
    moved = Evaluation(Subject("ann", {"stage": "at_risk"}, stage_change=change), frozenset())
    still = Evaluation(Subject("bob", {"stage": "active"}), frozenset())
    snapshot = {"ann": CustomerSnapshot("ann"), "bob": CustomerSnapshot("bob")}
    assert not has_work(snapshot["ann"], [moved], rules, NOW)
    expected = RecordStage("ann", "active", "at_risk", NOW, rules.version)
    (ann, bob) = plan(snapshot, [moved, still], rules, NOW).customers
    assert ann.effects == (expected,) and ("stage", "active", "at_risk") in ann.tally
    assert bob.effects == ()
    (only,) = stage_plans([moved, still], rules, NOW).customers
    assert only.effects == (expected,) and only.tally == (("stage", "active", "at_risk"),)


def test_the_compiled_model_decides_as_the_reference_evaluator_does() -> None:
    # The stage model is compiled into one function for speed; the condition language's
    # own evaluator is the oracle, over every combination of a grid of values.
    import itertools

    from engine.language.conditions import evaluate

    stages = model()
    shipped = load_rules(ROOT / "rules", ROOT / "templates" / "messages").stages
    assert shipped is not None
    grid = {
        "orders_count": [None, 0, 1, 2, 3, 7],
        "days_since_last_activity": [None, 0, 59, 60, 179, 180, 400],
        "days_since_signup": [0, 29, 30, 500],
        "last_order_days_ago": [None, 10, 180],
        "nps_score": [None, 0, 8, 9, 10],
    }
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination, strict=True))
        for m in (stages, shipped):
            expected = next(
                s.name for s in m.stages if s.condition is None or evaluate(s.condition, values)
            )
            assert m.classify(values) == expected, values
    facts_ = facts(orders_count=1)
    change = stages.apply(facts_, "prospect", NOW - timedelta(days=3), None, NOW)
    assert change == StageChange("prospect", "active")
    assert (facts_["stage"], facts_["days_in_stage"], facts_["previous_stage"]) == (
        "active",
        0,
        "prospect",
    )

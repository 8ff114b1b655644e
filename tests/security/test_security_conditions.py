"""Conditions nested hundreds of levels deep are refused at their column, not by a
RecursionError that crashed `rules check`, `init` and `serve` (issue 10, point 7)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.errors import ConditionError
from engine.language import conditions
from tests.support.cli import rules_check
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

DEEP = {
    "parentheses": "(" * 300 + "email_opt_in" + ")" * 300,
    "not": "not " * 300 + "email_opt_in",
}


@pytest.mark.parametrize("kind", sorted(DEEP))
def test_the_parser_refuses_deep_nesting_at_the_level_past_the_limit(kind: str) -> None:
    with pytest.raises(ConditionError) as caught:
        conditions.parse(DEEP[kind])
    limit = conditions.MAX_DEPTH
    assert caught.value.message == f"nested too deeply (at most {limit} levels)"
    step = 1 if kind == "parentheses" else len("not ")
    assert caught.value.offset == limit * step


def test_nesting_up_to_the_limit_still_parses() -> None:
    depth = conditions.MAX_DEPTH
    assert conditions.parse("(" * depth + "email_opt_in" + ")" * depth)
    assert conditions.parse("not " * depth + "email_opt_in")


def deep_rules(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    rules = tmp_path / "rules"
    shutil.copytree(FIXTURE_RULES, rules)
    path = rules / "welcome_series.yaml"
    path.write_text(path.read_text().replace("when: email_opt_in", f"when: {DEEP[kind]}", 1))
    return rules, path


@pytest.mark.parametrize("kind", sorted(DEEP))
def test_rules_check_reports_deep_nesting_as_a_real_process(tmp_path: Path, kind: str) -> None:
    rules, path = deep_rules(tmp_path, kind)
    line = next(
        number
        for number, text in enumerate(path.read_text().splitlines(), start=1)
        if DEEP[kind] in text
    )
    column = path.read_text().splitlines()[line - 1].index(DEEP[kind]) + 1
    offset = conditions.MAX_DEPTH * (1 if kind == "parentheses" else 4)
    result = rules_check(rules, FIXTURE_TEMPLATES)
    assert result.returncode == 1
    expected = (
        f"{path}:{line}:{column + offset}: nested too deeply "
        f"(at most {conditions.MAX_DEPTH} levels)"
    )
    assert expected in result.stdout.splitlines(), result.stdout
    assert "RecursionError" not in result.stderr + result.stdout


def test_init_refuses_deep_nesting_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules, path = deep_rules(tmp_path, "not")
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", f"sqlite:///{tmp_path / 'init.db'}")
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(rules))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    monkeypatch.setenv("COLUMNS", "300")
    result = CliRunner().invoke(app, ["init"])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"nested too deeply (at most {conditions.MAX_DEPTH} levels)" in result.output
    assert str(path) in result.output


# A condition as wide as this passed `rules check` and `init`, then every `tick` (and
# `run`, `serve`) stopped with a RuleEngineError traceback: durable_rules' network cannot
# hang 600 different tests from one node. It is refused where it is written instead.
WIDE = " or ".join(f"orders_count >= {i}" for i in range(600))


def test_rules_check_refuses_a_condition_too_wide_for_durable_rules_at_its_place(
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(FIXTURE_RULES, rules)
    path = rules / "welcome_series.yaml"
    path.write_text(path.read_text().replace("when: email_opt_in", f"when: {WIDE}", 1))
    (line,) = [
        number for number, text in enumerate(path.read_text().splitlines(), start=1) if WIDE in text
    ]
    column = path.read_text().splitlines()[line - 1].index(WIDE) + 1
    result = rules_check(rules, FIXTURE_TEMPLATES)
    assert result.returncode == 1, result.stdout
    assert (
        f"{path}:{line}:{column}: durable_rules cannot take this condition: 600 different "
        "tests hang from one node of its network (at most 480; durable_rules loops forever "
        "at 512): shorten the longest 'in' lists"
    ) in result.stdout.splitlines(), result.stdout
    assert "Traceback" not in result.stderr + result.stdout

"""`lifecycle rules test` and `rules diff`: a change to the rules, tried before it ships.

``rules test`` runs the playbook tests a marketer writes next to the rules
(engine.usecases.playbook_tests); ``rules diff`` previews what a change would do to the
customers in the database (engine.usecases.rules_diff). Both change nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from engine.cli.common import (
    err,
    fail,
    out,
    read_settings,
)
from engine.cli.rules import rules_app
from engine.errors import LifecycleError, PlaybookTestsInvalid, RulesInvalid
from engine.playbooks.loader import load_rules
from engine.playbooks.model import RuleSet
from engine.usecases.playbook_tests import (
    TESTS_DIR,
    TestOutcome,
    load_tests,
    run_test,
    scratch,
    test_files,
)
from engine.wording import plural


@rules_app.command("test")
def rules_test(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="A rules directory (its tests/ are run), a directory of test files, or one "
            "test file (default: LIFECYCLE_RULES_DIR)."
        ),
    ] = None,
    rules: Annotated[
        Path | None,
        typer.Option(
            help="The rules to test (default: the directory that holds tests/, else "
            "LIFECYCLE_RULES_DIR)."
        ),
    ] = None,
    templates: Annotated[
        Path | None, typer.Option(help="Templates directory (default: LIFECYCLE_TEMPLATES_DIR).")
    ] = None,
) -> None:
    """Run the playbook tests (rules/tests/*.yaml): each case's customer and events on a
    fake clock, on a scratch database; print a diff of expected and sent messages, with
    the decision that explains each line, for every failing case; exit 1 if one fails."""
    settings = read_settings()
    target = path if path is not None else settings.rules_dir
    if not target.exists():
        raise fail(f"{target}: no such file or directory")
    rules_dir = rules or _rules_dir_of(target, settings.rules_dir)
    files = test_files(target)
    if not files:
        raise fail(f"{target}: no test files (*.yaml); write them in {rules_dir / TESTS_DIR}/")
    ruleset = _load(rules_dir, templates or settings.templates_dir, settings.roster_file)
    try:
        tests = load_tests(files, ruleset)
    except PlaybookTestsInvalid as exc:
        for problem in exc.problems:
            out.print(str(problem), markup=False, soft_wrap=True)
        err.print(f"{plural(len(exc.problems), 'problem')} in the test files", markup=False)
        raise typer.Exit(1) from exc
    started = time.perf_counter()
    outcomes: list[TestOutcome] = []
    try:
        with scratch() as where:
            for test in tests:
                outcome = run_test(test, ruleset, settings, where)
                outcomes.append(outcome)
                _print_outcome(outcome)
    except LifecycleError as exc:
        raise fail(str(exc)) from exc
    failed = sum(1 for o in outcomes if not o.passed)
    out.print(
        f"{plural(len(outcomes), 'case')} in {plural(len(files), 'file')}: "
        f"{len(outcomes) - failed} passed, {failed} failed "
        f"({time.perf_counter() - started:.1f}s; rules version {ruleset.version})",
        markup=False,
        soft_wrap=True,
    )
    if failed:
        raise typer.Exit(1)


def _rules_dir_of(target: Path, default: Path) -> Path:
    """The rules a test path belongs to: the directory holding its ``tests/``."""
    directory = target if target.is_dir() else target.parent
    if (directory / TESTS_DIR).is_dir():
        return directory
    if directory.name == TESTS_DIR:
        return directory.parent
    return default


def _load(directory: Path, templates: Path, roster: Path | None) -> RuleSet:
    try:
        return load_rules(directory, templates, roster_file=roster)
    except RulesInvalid as exc:
        for problem in exc.problems:
            out.print(str(problem), markup=False, soft_wrap=True)
        err.print(
            f"{plural(len(exc.problems), 'problem')} in the rules of {directory}: "
            "run `lifecycle rules check` and fix them first",
            markup=False,
        )
        raise typer.Exit(1) from exc


def _print_outcome(outcome: TestOutcome) -> None:
    test = outcome.test
    if outcome.passed:
        out.print(f"ok    {test.where}: {test.name}", markup=False, soft_wrap=True)
        return
    out.print(f"FAIL  {test.where}: {test.name}", markup=False, soft_wrap=True)
    for line in outcome.diff:
        out.print(f"      {line}", markup=False, soft_wrap=True)
    if outcome.sent:
        out.print("      sent, in order:", markup=False)
        for message in outcome.sent:
            out.print(
                f"        {message.describe()} ({message.playbook}/{message.step_id})",
                markup=False,
                soft_wrap=True,
            )

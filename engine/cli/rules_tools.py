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
    NowOption,
    err,
    fail,
    load_app,
    moment_of,
    out,
    print_json,
    read_settings,
)
from engine.cli.rules import rules_app
from engine.errors import LifecycleError, PlaybookTestsInvalid, RulesInvalid
from engine.playbooks.loader import load_rules
from engine.playbooks.model import RuleSet
from engine.playbooks.revisions import rules_at
from engine.usecases.playbook_tests import (
    TESTS_DIR,
    TestOutcome,
    load_tests,
    run_test,
    scratch,
    test_files,
)
from engine.usecases.rules_diff import Movement, RulesDiff, rules_diff
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


def _load(
    directory: Path, templates: Path, roster: Path | None, *, shown: str | None = None
) -> RuleSet:
    """The rules of ``directory``; exits 1 with every problem (``shown``: the name the
    user gave them, for a revision's temporary copy)."""
    try:
        return load_rules(directory, templates, roster_file=roster)
    except RulesInvalid as exc:
        for problem in exc.problems:
            out.print(str(problem), markup=False, soft_wrap=True)
        err.print(
            f"{plural(len(exc.problems), 'problem')} in the rules of {shown or directory}: "
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


@rules_app.command("diff")
def rules_diff_command(
    directory: Annotated[
        Path | None,
        typer.Argument(help="The proposed rules (default: LIFECYCLE_RULES_DIR)."),
    ] = None,
    against: Annotated[
        str,
        typer.Option(
            help="The current rules: a directory, or a git revision of the rules directory "
            "(HEAD: the last commit)."
        ),
    ] = "HEAD",
    templates: Annotated[
        Path | None, typer.Option(help="Templates directory (default: LIFECYCLE_TEMPLATES_DIR).")
    ] = None,
    samples: Annotated[int, typer.Option(min=0, help="Sample customer ids per line.")] = 5,
    json_output: Annotated[bool, typer.Option("--json")] = False,
    now: NowOption = None,
) -> None:
    """What the proposed rules would change for the customers in the database: per
    playbook and step who would newly match (as `evaluate` counts) and who no longer, the
    queued messages that would be cancelled or change, and the active journeys a removed
    step strands. Read-only."""
    settings = read_settings()
    proposed_dir = directory or settings.rules_dir
    templates_dir = templates or settings.templates_dir
    application = load_app(settings)
    try:
        proposed = _load(proposed_dir, templates_dir, settings.roster_file)
        with rules_at(against, proposed_dir) as current_dir:
            current = _load(current_dir, templates_dir, settings.roster_file, shown=against)
        moment = moment_of(application, now)
        report = rules_diff(
            application.db,
            current,
            proposed,
            moment,
            batch_size=settings.batch_size,
            engine=settings.engine,
            samples=samples,
        )
    except LifecycleError as exc:
        raise fail(str(exc)) from exc
    finally:
        application.db.dispose()
    if json_output:
        print_json({"proposed": str(proposed_dir), "against": against, **report.as_dict()})
        return
    _print_diff(report, str(proposed_dir), against)


def _print_diff(report: RulesDiff, proposed: str, against: str) -> None:
    say = _say
    say(
        f"rules diff: {proposed} (version {report.proposed_version}) against {against} "
        f"(version {report.current_version}), at {report.at:%Y-%m-%d %H:%M} UTC"
    )
    say(
        f"evaluated {plural(report.customers, 'customer')} and "
        f"{plural(report.pending_events, 'pending event')} under both, "
        f"{plural(report.queued_messages, 'queued message')}, "
        f"{plural(report.active_enrollments, 'active enrollment')}"
    )
    unchanged = []
    for pid, impact in sorted(report.playbooks.items()):
        moved = [(f"step {step}", m) for step, m in impact.steps.items() if m.changed]
        moved += [
            (label, m)
            for label, m in (("goal met", impact.goal), ("no longer eligible", impact.exit))
            if m.changed
        ]
        if not impact.entry.changed and not moved and impact.change == "kept":
            unchanged.append(pid)
            continue
        label = "" if impact.change == "kept" else f" ({impact.change})"
        say(f"{pid}{label}: matched {_movement(impact.entry, impact.counted_in)}")
        _samples(impact.entry, "  ")
        for part, movement in moved:
            counted = impact.counted_in if part.startswith("step") else "customers"
            say(f"  {part}: {_movement(movement, counted)}")
            _samples(movement, "    ")
    if unchanged:
        say(f"unchanged: {', '.join(unchanged)}")
    for queued in report.queued:
        say(
            f"queued {queued.playbook}/{queued.step_id}: {plural(queued.count, 'message')} "
            f"{queued.effect}: {queued.reason} (e.g. {', '.join(queued.samples)})"
        )
    for stranded in report.stranded:
        where = (
            f"playbook {stranded.playbook} is removed"
            if stranded.removed == "playbook"
            else f"step {stranded.playbook}/{stranded.step_id} is removed"
        )
        say(
            f"stranded: {where}: {plural(stranded.count, 'active enrollment')} end (cancelled) "
            f"at the next tick, and {plural(stranded.queued, 'queued message')} with them "
            f"(e.g. {', '.join(stranded.samples)})"
        )
    if not report.queued:
        say("queued messages: none change")
    if not report.stranded:
        say("stranded journeys: none")
    say(f"{report.seconds:.1f}s; nothing was changed")


def _say(line: str) -> None:
    out.print(line, markup=False, soft_wrap=True)


def _movement(movement: Movement, counted_in: str) -> str:
    return (
        f"{movement.current:,} → {movement.proposed:,} {counted_in} "
        f"(+{movement.newly:,} newly, -{movement.no_longer:,} no longer)"
    )


def _samples(movement: Movement, indent: str) -> None:
    if movement.newly_samples:
        _say(f"{indent}newly:     {', '.join(movement.newly_samples)}")
    if movement.no_longer_samples:
        _say(f"{indent}no longer: {', '.join(movement.no_longer_samples)}")

"""`lifecycle new`, `init`, `rules check` and `facts`: the rule files and what they may use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from engine.cli.common import (
    app,
    err,
    fail,
    load_app,
    out,
    read_settings,
    rules_of,
    settings_rules,
)
from engine.data.db import existing_database
from engine.data.uow import reading
from engine.delivery.templates import TemplateStore
from engine.errors import LifecycleError, RulesInvalid
from engine.playbooks.loader import RESERVED_FILES, ROSTER_FILE, STAGES_FILE, load_rules
from engine.playbooks.model import RuleSet
from engine.usecases.stranded import stranded_enrollments
from engine.wording import plural

rules_app = typer.Typer(no_args_is_help=True, help="Check the rule files.")
app.add_typer(rules_app, name="rules")


@app.command()
def new(
    directory: Annotated[Path, typer.Argument(help="The new project's directory.")],
) -> None:
    """Start a project in DIR: the example playbooks (rules/) and their templates
    (templates/messages/); nothing is overwritten."""
    from engine.usecases.new_project import write_new_project

    try:
        written = write_new_project(directory)
    except LifecycleError as exc:
        raise fail(str(exc)) from exc
    playbooks = sorted(
        p.stem for p in written if p.parent.name == "rules" and p.name not in RESERVED_FILES
    )
    out.print(
        f"wrote {plural(len(written), 'file')} into {directory}: rules/ "
        f"({plural(len(playbooks), 'playbook')}: "
        f"{', '.join(playbooks)}; the fact catalog, policies, stages and support roster) and "
        "templates/messages/",
        markup=False,
        soft_wrap=True,
    )
    out.print(
        f"next: cd {directory} && lifecycle init && lifecycle rules check && lifecycle serve",
        markup=False,
        soft_wrap=True,
    )


@app.command()
def init() -> None:
    """Create or upgrade the database, and check the rules."""
    application = load_app(create=True)
    rules = rules_of(application)
    settings = application.settings
    out.print(f"database ready: {settings.database_url}")
    for warning in rules.warnings:
        out.print(str(warning), markup=False, soft_wrap=True)
    out.print(
        f"rules ok: {plural(len(rules.playbooks), 'playbook')}, version {rules.version}"
        f"{_warning_count(rules.warnings)}"
    )
    out.print(
        _roster_line(rules, settings.roster_file or settings.rules_dir / ROSTER_FILE),
        markup=False,
        soft_wrap=True,
    )
    out.print(engine_line(settings.engine), markup=False)  # prose: wrapped


def _variants_line(rules: RuleSet, templates: TemplateStore) -> str | None:
    """The locale variants of the templates the playbooks send (each rendered by the check)."""
    used = sorted(
        {
            (step.send.channel, step.send.template)
            for playbook in rules.playbooks.values()
            for step in playbook.steps
            if step.send is not None
        }
    )
    found = [
        f"{channel}/{name} ({', '.join(locales)})"
        for channel, name in used
        if (locales := templates.locales(channel, name))
    ]
    return f"locale variants: {'; '.join(found)}" if found else None


def _warning_count(warnings: tuple[object, ...]) -> str:
    count = len(warnings)
    return f", {count} warning{'s' if count != 1 else ''}" if count else ""


def engine_line(engine: str) -> str:
    """Which evaluator the engine setting means on this Python, said plainly."""
    from engine.evaluation.evaluators import durable_unavailable

    unavailable = durable_unavailable() if engine == "durable" else None
    if unavailable is not None:
        return f"evaluation: {unavailable}"
    if engine == "durable":
        return "evaluation: durable_rules"
    return "evaluation: the reference evaluator (LIFECYCLE_ENGINE=reference)"


def _roster_line(rules: RuleSet, path: Path) -> str:
    """Who hears of complaint cases (the loader refuses rules that escalate to nobody)."""
    leads = rules.roster.leads
    if not leads:
        return f"support roster: none at {path} (no playbook escalates, so none is needed)"
    first = rules.roster.on_duty(1)
    on_duty = f"; on duty at tier 1: {first.name}" if first is not None else ""
    return f"support roster: {path}, {plural(len(leads), 'lead')}{on_duty}"


@rules_app.command("check")
def rules_check(
    directory: Annotated[
        Path | None, typer.Argument(help="Rules directory (default: LIFECYCLE_RULES_DIR).")
    ] = None,
    templates: Annotated[
        Path | None, typer.Option(help="Templates directory (default: LIFECYCLE_TEMPLATES_DIR).")
    ] = None,
    database: Annotated[
        bool,
        typer.Option(
            help="Warn of active journeys these rules would strand (when the database exists)."
        ),
    ] = True,
) -> None:
    """Validate every rule file; print each problem as path:line:col and exit 1 if any.

    Given the database (LIFECYCLE_DATABASE_URL, when it exists), it also warns of the
    active journeys whose playbook or next step the rules no longer have. Warnings
    (path:line:col: warning: ..., like a deprecated key) are printed too and alone exit 0.

    The support roster is LIFECYCLE_ROSTER_FILE, or support_roster.yaml in the rules
    directory; a playbook that escalates with no support lead to notify is a problem.
    """
    settings = read_settings()
    try:
        rules = load_rules(
            directory or settings.rules_dir,
            templates or settings.templates_dir,
            roster_file=settings.roster_file,
        )
    except RulesInvalid as exc:
        for problem in sorted([*exc.problems, *exc.warnings]):
            out.print(str(problem), markup=False, soft_wrap=True)
        err.print(
            f"{plural(len(exc.problems), 'problem')} found{_warning_count(exc.warnings)}",
            markup=False,
        )
        raise typer.Exit(1) from exc
    for warning in rules.warnings:
        out.print(str(warning), markup=False, soft_wrap=True)
    out.print(
        f"{plural(len(rules.playbooks), 'playbook')} ok ({', '.join(sorted(rules.playbooks))}); "
        f"{plural(len(rules.catalog.facts), 'fact')}; rules version {rules.version}"
        f"{_warning_count(rules.warnings)}",
        markup=False,
        soft_wrap=True,
    )
    out.print(_stages_line(rules), markup=False, soft_wrap=True)
    roster = settings.roster_file or (directory or settings.rules_dir) / ROSTER_FILE
    out.print(_roster_line(rules, roster), markup=False, soft_wrap=True)
    variants = _variants_line(rules, TemplateStore(templates or settings.templates_dir))
    if variants:
        out.print(variants, markup=False, soft_wrap=True)
    out.print(engine_line(settings.engine), markup=False)  # prose: wrapped
    if database:
        _warn_of_stranded_journeys(settings.database_url, rules)


def _stages_line(rules: RuleSet) -> str:
    if rules.stages is None:
        return f"stages: none ({STAGES_FILE} is not there, so no stage is recorded)"
    return (
        f"stages: {plural(len(rules.stages.stages), 'stage')} in {rules.stages.source} "
        f"(checked in this order: {', '.join(rules.stages.names)})"
    )


def _warn_of_stranded_journeys(url: str, rules: RuleSet) -> None:
    """Given a database, say which active journeys these rules would end."""
    db = existing_database(url)
    if db is None:
        return  # no database yet: nothing can be stranded
    try:
        with reading(db) as session:
            stranded = stranded_enrollments(session, rules)
    finally:
        db.dispose()
    for entry in stranded:
        err.print(f"warning: {entry}", markup=False, soft_wrap=True)


@app.command()
def facts(json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List every fact conditions may use: built-in, attributes and event properties."""
    rules = settings_rules()
    specs = sorted(rules.catalog.facts.values(), key=lambda s: (s.source, s.name))
    if json_output:
        rows = [
            {
                "name": s.name,
                "type": str(s.type),
                "source": str(s.source),
                "description": s.description,
            }
            for s in specs
        ]
        out.print_json(json.dumps(rows))
        return
    table = Table(title="Fact catalog", box=box.SIMPLE_HEAD)
    table.add_column("fact", no_wrap=True)
    for column in ("type", "source"):
        table.add_column(column, no_wrap=True)
    table.add_column("description")
    for spec in specs:
        table.add_row(spec.name, str(spec.type), str(spec.source), spec.description)
    out.print(table)
    out.print(f"event types: {', '.join(sorted(rules.catalog.event_types))}")

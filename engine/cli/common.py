"""What every command shares: the root Typer app, the consoles, and the error exits."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.bootstrap import App, bootstrap, check_startup
from engine.clock import as_utc
from engine.data.db import make_engine, schema_problem
from engine.errors import ConfigurationError, DatabaseNotReady, RulesInvalid
from engine.playbooks.loader import load_rules
from engine.playbooks.model import RuleSet
from engine.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="The lifecycle command line.")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def parse_moment(text: str) -> datetime:
    """A moment given on the command line (``--now``, ``--start``), in UTC.

    ISO 8601 with an offset (``2026-03-02T09:00:00Z``, ``...+01:00``). One without an
    offset is taken as UTC, and says so on stderr: a person at a terminal means a local
    moment as often as a UTC one, and a silent guess would move every time by hours.
    """
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not an ISO 8601 moment like 2026-03-02T09:00:00Z"
        ) from None
    if moment.tzinfo is None:
        err.print(
            f"warning: {text} has no UTC offset, so it is taken as UTC; write "
            f"{moment.isoformat()}Z (or +01:00...) to say which",
            markup=False,
            soft_wrap=True,
        )
    return as_utc(moment)


NowOption = Annotated[
    datetime | None,
    typer.Option(
        "--now",
        parser=parse_moment,
        metavar="MOMENT",
        help="Pretend it is this moment: ISO 8601 with an offset, like 2026-03-02T09:00:00Z "
        "(without one it is taken as UTC, with a warning).",
    ),
]


def print_json(payload: Any) -> None:
    """Machine output: plain JSON on stdout, never wrapped or coloured by Rich."""
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


log = logging.getLogger("lifecycle")


def read_settings() -> Settings:
    """The settings from the environment (and .env); a bad value exits 1 naming its variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"LIFECYCLE_{'_'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
            for error in exc.errors()
        )
        raise fail(f"bad setting: {problems}") from None


def load_app(settings: Settings | None = None, *, create: bool = False) -> App:
    """The app over the configured database; a setting that cannot work exits 1.

    Only the commands that set a project up (``init``, ``seed``, ``import``) pass
    ``create``: they create the database, or bring its schema up to date. Every other
    command finds a database ready, or exits 1 pointing to ``lifecycle init``, and never
    creates one (a mistyped LIFECYCLE_DATABASE_URL must not leave an empty database
    behind, nor look like a project with no customers).
    """
    settings = settings or read_settings()
    try:
        if create:
            return bootstrap(settings)
        engine = make_engine(settings.database_url)
        problem = schema_problem(engine)
        if problem is not None:
            engine.dispose()
            shown = engine.url.render_as_string(hide_password=True)
            raise DatabaseNotReady(shown, problem)
        return bootstrap(settings, db=engine, migrate=False)
    except ConfigurationError as exc:
        raise fail(str(exc)) from exc


def start_app(
    command: str,
    *,
    log_level: int = logging.WARNING,
    settings: Settings | None = None,
    migrate: bool = False,
) -> App:
    """The app for a command that sends or serves: the start-up check first (a refusal
    exits 1 naming each variable), then its warnings, once, in the log. ``migrate`` (a
    worker asked to) brings the schema up to date instead of requiring it."""
    settings = settings or read_settings()
    try:
        warnings = check_startup(settings, command)
    except ConfigurationError as exc:
        raise fail(str(exc)) from exc
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The Twilio SDK logs every request's headers at INFO: one line a message, no news.
    logging.getLogger("twilio.http_client").setLevel(max(log_level, logging.WARNING))
    for warning in warnings:
        log.warning(warning)
    return load_app(settings, create=migrate)


def moment_of(application: App, now: datetime | None) -> datetime:
    return as_utc(now) if now is not None else application.clock()


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def rules_of(application: App) -> RuleSet:
    try:
        return application.rules
    except RulesInvalid as exc:
        raise _rules_problems(exc) from exc


def settings_rules() -> RuleSet:
    """The rules the settings point at, for a command that needs no database (``facts``):
    the same directories and roster as every other command."""
    settings = read_settings()
    try:
        return load_rules(
            settings.rules_dir, settings.templates_dir, roster_file=settings.roster_file
        )
    except RulesInvalid as exc:
        raise _rules_problems(exc) from exc


def _rules_problems(exc: RulesInvalid) -> typer.Exit:
    for problem in exc.problems:
        err.print(str(problem), markup=False, soft_wrap=True)
    return typer.Exit(1)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal,
    )

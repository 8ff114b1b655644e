"""What every command shares: the root Typer app, the consoles, and the error exits."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from engine.bootstrap import App, bootstrap, check_startup
from engine.clock import as_utc
from engine.data.db import make_engine, schema_problem
from engine.errors import (
    ConfigurationError,
    DatabaseNotReady,
    DatabaseUnavailable,
    LifecycleError,
    RulesInvalid,
)
from engine.playbooks.loader import load_rules
from engine.playbooks.model import RuleSet
from engine.settings import Settings


class LifecycleTyper(typer.Typer):
    """The root app. A command turns the errors it expects into words itself; this is the
    net under all of them, so that whatever else reaches the top (a worker process that
    died, a database server that went away mid-command) still ends as one ``error:``
    line naming what failed, and exit 1, never a traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except DBAPIError as exc:
            error = database_unavailable(os.environ.get("LIFECYCLE_DATABASE_URL"), exc)
            raise SystemExit(fail(str(error)).exit_code) from None
        except LifecycleError as exc:
            raise SystemExit(fail(str(exc)).exit_code) from None


app = LifecycleTyper(no_args_is_help=True, add_completion=False, help="The lifecycle command line.")

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
    try:
        utc = as_utc(moment)
    except OverflowError:
        utc = None  # 0001-01-01T00:00+05:00: a moment UTC cannot hold
    if utc is None or not MOMENT_RANGE[0] <= utc < MOMENT_RANGE[1]:
        raise typer.BadParameter(
            f"{text.strip()} is out of range: give a moment from {MOMENT_RANGE[0].year} "
            f"to {MOMENT_RANGE[1].year - 1} (UTC)"
        )
    return utc


# The moments a command may pretend it is: far from the ends of what datetime holds, so
# that the engine's look-backs, waits and a simulation's days never step past them.
MOMENT_RANGE = (datetime(1900, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC))


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


def database_unavailable(url: str | None, exc: DBAPIError) -> DatabaseUnavailable:
    """The driver's own first line, under the URL it concerns (password hidden)."""
    url = url or str(Settings.model_fields["database_url"].default)
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL at all: shown as typed
        shown = url
    text = str(exc.orig or exc).strip()
    return DatabaseUnavailable(shown, text.splitlines()[0] if text else type(exc).__name__)


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
            try:
                return bootstrap(settings)
            except DBAPIError as exc:  # a directory that is not there, a server that refuses
                raise database_unavailable(settings.database_url, exc) from exc
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

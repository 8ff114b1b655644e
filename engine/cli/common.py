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
from engine.errors import ConfigurationError, RulesInvalid
from engine.playbooks.model import RuleSet
from engine.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="The lifecycle command line.")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

NowOption = Annotated[
    datetime | None,
    typer.Option("--now", help="Pretend it is this moment (ISO 8601, UTC if no offset)."),
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


def load_app(settings: Settings | None = None) -> App:
    """The app over the configured database (migrated); a setting that cannot work exits 1."""
    try:
        return bootstrap(settings or read_settings())
    except ConfigurationError as exc:
        raise fail(str(exc)) from exc


def start_app(command: str, *, log_level: int = logging.WARNING) -> App:
    """The app for a command that sends or serves: the start-up check first (a refusal
    exits 1 naming each variable), then its warnings, once, in the log."""
    settings = read_settings()
    try:
        warnings = check_startup(settings, command)
    except ConfigurationError as exc:
        raise fail(str(exc)) from exc
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for warning in warnings:
        log.warning(warning)
    return load_app(settings)


def moment_of(application: App, now: datetime | None) -> datetime:
    return as_utc(now) if now is not None else application.clock()


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def rules_of(application: App) -> RuleSet:
    try:
        return application.rules
    except RulesInvalid as exc:
        for problem in exc.problems:
            err.print(str(problem), markup=False, soft_wrap=True)
        raise typer.Exit(1) from exc


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

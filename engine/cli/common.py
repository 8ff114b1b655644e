"""What every command shares: the root Typer app, the consoles, and the error exits."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.bootstrap import App, bootstrap
from engine.clock import as_utc
from engine.errors import RulesInvalid
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


def load_app() -> App:
    return bootstrap(Settings())


def moment_of(application: App, now: datetime | None) -> datetime:
    return as_utc(now) if now is not None else application.clock()


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", markup=True, soft_wrap=True)
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

"""`lifecycle seed` and `lifecycle import`: customers and events in."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from engine.cli.common import (
    NowOption,
    app,
    err,
    fail,
    load_app,
    moment_of,
    out,
    progress,
    rules_of,
)
from engine.errors import LifecycleError

SEED_IN_PROCESSES_FROM = 20_000

import_app = typer.Typer(no_args_is_help=True, help="Import customers or events (CSV or JSONL).")
app.add_typer(import_app, name="import")


@app.command()
def seed(
    customers: Annotated[
        int, typer.Option("--customers", min=1, help="How many customers.")
    ] = 1000,
    random_seed: Annotated[int, typer.Option("--seed")] = 7,
    workers: Annotated[
        int | None,
        typer.Option(help="Processes that generate and store (default: one per core)."),
    ] = None,
    now: NowOption = None,
) -> None:
    """Create synthetic customers with realistic histories (every playbook gets matches)."""
    from engine.data.seed import seed as run_seed

    application = load_app(create=True)
    moment = moment_of(application, now)
    with progress() as bar:
        task = bar.add_task("seeding customers", total=customers)
        report = run_seed(
            application.db,
            customers,
            moment,
            seed=random_seed,
            # Starting processes costs more than it saves on small seeds.
            workers=workers
            if workers is not None
            else (application.workers() if customers >= SEED_IN_PROCESSES_FROM else 0),
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    out.print(report.summary())


def _import(kind: str, file: Path, now: datetime | None, history: bool = False) -> None:
    from engine.data import importing

    application = load_app(create=True)
    rules = rules_of(application)
    moment = moment_of(application, now)
    options: dict[str, Any] = {"limits": application.input_limits}
    if history:
        options["history"] = True
    if kind == "customers":
        options["phone_region"] = application.phone_region
        options["erased"] = application.erased_addresses
    run = importing.import_customers if kind == "customers" else importing.import_events
    try:
        with progress() as bar:
            task = bar.add_task(f"importing {kind}", total=None)
            report = run(
                application.db,
                file,
                rules.catalog,
                moment,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                **options,
            )
    except LifecycleError as exc:
        raise fail(str(exc)) from exc
    for error in report.errors:
        err.print(str(error), markup=False, soft_wrap=True)
    out.print(report.summary(), markup=False)
    if report.errors:
        raise typer.Exit(1)


@import_app.command("customers")
def import_customers(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    now: NowOption = None,
) -> None:
    """Import customers; bad rows are reported (row number and reason), good rows kept."""
    _import("customers", file, now)


@import_app.command("events")
def import_events(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    history: Annotated[
        bool,
        typer.Option(
            "--history",
            help="Past events: update the facts but start no journey (no welcome for old sign-ups).",
        ),
    ] = False,
    now: NowOption = None,
) -> None:
    """Import events, idempotent by event id; bad rows are reported, good rows kept."""
    _import("events", file, now, history)

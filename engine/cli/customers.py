"""`lifecycle customers export ID` and `customers erase ID`: GDPR access and erasure."""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from engine.cli.common import app, fail, load_app, out, print_json
from engine.data.uow import reading, unit_of_work
from engine.errors import LifecycleError
from engine.usecases.gdpr import erase_customer, export_customer

customers_app = typer.Typer(
    no_args_is_help=True, help="A person's data: export everything held, or erase it (GDPR)."
)
app.add_typer(customers_app, name="customers")

CustomerArgument = Annotated[str, typer.Argument(metavar="ID", help="The customer id.")]


@customers_app.command("export")
def export(
    customer_id: CustomerArgument,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the JSON here (default: stdout).")
    ] = None,
) -> None:
    """Everything held about the customer, as JSON: the customer, events, journeys,
    messages, decisions, cases and the suppressions of their addresses."""
    application = load_app()
    with reading(application.db) as session:
        try:
            found = export_customer(session, customer_id, application.clock())
        except LifecycleError as exc:
            raise fail(str(exc)) from exc
    if output is None:
        print_json(found)
        return
    output.write_text(json.dumps(found, indent=2) + "\n", encoding="utf-8")
    rows = sum(len(v) for v in found.values() if isinstance(v, list))
    out.print(f"wrote the data of {customer_id} ({rows:,} rows) to {output}", markup=False)


@customers_app.command("erase")
def erase(
    customer_id: CustomerArgument,
    yes: Annotated[
        bool, typer.Option("--yes", help="Do not ask for confirmation (scripts).")
    ] = False,
) -> None:
    """Remove the customer's personal data for good, keeping counts, the suppression of
    their addresses and an audit of the erasure. It cannot be undone."""
    application = load_app()
    if not yes:
        if not sys.stdin.isatty():
            raise fail("erasing cannot be undone: add --yes to erase without a question")
        typer.confirm(f"Erase the personal data of {customer_id} for good?", abort=True)
    actor = getpass.getuser()
    try:
        with unit_of_work(application.db) as session:
            audit = erase_customer(
                session, customer_id, actor, application.erased_addresses, application.clock()
            )
    except LifecycleError as exc:
        raise fail(str(exc)) from exc
    done = ", ".join(f"{name} {count}" for name, count in audit.counts.items())
    out.print(
        f"erased the personal data of {customer_id} (audit {audit.id}, by {actor}): {done}",
        markup=False,
        soft_wrap=True,
    )

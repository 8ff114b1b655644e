"""`lifecycle explain`: why a customer matches a playbook or not, and their journeys."""

from __future__ import annotations

from typing import Annotated

import typer

from engine.cli.common import (
    NowOption,
    app,
    fail,
    load_app,
    moment_of,
    out,
    print_json,
    rules_of,
)
from engine.data.uow import reading
from engine.errors import LifecycleError
from engine.usecases.explain import explain_customer
from engine.wording import plural


@app.command()
def explain(
    customer_id: Annotated[str, typer.Argument(metavar="CUSTOMER")],
    json_output: Annotated[bool, typer.Option("--json")] = False,
    now: NowOption = None,
) -> None:
    """Per playbook: does the customer match, and if not, which part is false and why."""
    application = load_app()
    rules = rules_of(application)
    moment = moment_of(application, now)
    with reading(application.db) as session:
        try:
            found = explain_customer(session, rules, customer_id, moment)
        except LifecycleError as exc:
            raise fail(str(exc)) from exc
    report, timeline = found["playbooks"], found["timeline"]
    if json_output:
        print_json(found)
        return
    out.print(f"[bold]{customer_id}[/bold] at {moment:%Y-%m-%d %H:%M} UTC")
    for entry in report:
        colour = {
            "on the journey": "green",
            "would enter": "green",
            "re-entry not allowed": "yellow",
        }
        mark = f"[{colour.get(entry['state'], 'red')}]{entry['state']}[/]"
        out.print(f"\n[bold]{entry['playbook']}[/bold]: {mark}")
        for note in (entry["event"], entry["journey"]):
            if note:
                out.print(f"  {note}", markup=False)
        for check in entry["checks"]:
            state = "true " if check["holds"] else "false"
            out.print(f"  {check['part']:<22} {state}  {check['condition']}", markup=False)
            if not check["holds"] and check["why"]:
                out.print(f"  {'':<22}        {check['why']}", markup=False)
    out.print(f"\n[bold]Timeline[/bold] ({plural(len(timeline), 'decision')})")
    for row in timeline:
        until = f" (until {row['until'][:16]})" if row["until"] else ""
        step_note = f" {row['step']}" if row["step"] else ""
        out.print(
            f"  {row['at'][:16]}  {row['playbook']}{step_note}: {row['outcome']} — {row['reason']}{until}",
            markup=False,
        )

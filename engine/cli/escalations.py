"""`lifecycle escalations`: work the complaint queue."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

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
from engine.data.uow import reading, unit_of_work
from engine.errors import LifecycleError

escalations_app = typer.Typer(no_args_is_help=True, help="Work the complaint escalation queue.")
app.add_typer(escalations_app, name="escalations")


def _case_record(case: Any, now: datetime) -> dict[str, Any]:
    return {
        "id": case.id,
        "customer": case.customer_id,
        "status": str(case.status),
        "priority": case.priority,
        "queue": case.queue,
        "owner": case.owner,
        "reason": case.reason,
        "opened_at": case.opened_at.isoformat(),
        "sla_due_at": case.sla_due_at.isoformat(),
        "overdue": case.status != "resolved" and case.sla_due_at <= now,
    }


@escalations_app.command("list")
def escalations_list(
    status: Annotated[
        str | None,
        typer.Option(help="open, acknowledged, resolved, reopened (default: all not resolved)"),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json")] = False,
    now: NowOption = None,
) -> None:
    """Cases by SLA urgency: overdue first, then the soonest deadline."""
    from engine.escalations.cases import queue

    application = load_app()
    moment = moment_of(application, now)
    with reading(application.db) as session:
        try:
            cases = queue(session, status)
        except LifecycleError as exc:
            raise fail(str(exc)) from exc
        records = [_case_record(c, moment) for c in cases]
    if json_output:
        print_json(records)
        return
    # Readable at 80 columns: ids and times are never cut; the reason wraps.
    table = Table(title=f"Escalations ({status or 'not resolved'})", box=box.SIMPLE_HEAD)
    table.add_column("case", no_wrap=True, justify="right")
    table.add_column("customer\nowner")
    table.add_column("status\npriority", no_wrap=True)
    table.add_column("SLA due (UTC)", no_wrap=True)
    table.add_column("reason")
    for r in records:
        due = r["sla_due_at"][:16].replace("T", " ") + ("\nOVERDUE" if r["overdue"] else "")
        table.add_row(
            str(r["id"]),
            f"{r['customer']}\n{r['owner'] or '-'}",
            f"{r['status']}\n{r['priority']}",
            due,
            r["reason"],
        )
    out.print(table)


@escalations_app.command("show")
def escalations_show(
    case_id: Annotated[int, typer.Argument(metavar="ID")],
    json_output: Annotated[bool, typer.Option("--json")] = False,
    now: NowOption = None,
) -> None:
    """A case with its full history."""
    from engine.escalations.cases import get_case, history

    application = load_app()
    moment = moment_of(application, now)
    with reading(application.db) as session:
        try:
            case = get_case(session, case_id)
        except LifecycleError as exc:
            raise fail(str(exc)) from exc
        record = _case_record(case, moment)
        record["history"] = [
            {"at": n.at.isoformat(), "actor": n.actor, "action": n.action, "note": n.note}
            for n in history(session, case_id)
        ]
    if json_output:
        print_json(record)
        return
    for key in (
        "id",
        "customer",
        "status",
        "priority",
        "queue",
        "owner",
        "reason",
        "opened_at",
        "sla_due_at",
        "overdue",
    ):
        out.print(f"{key:>10}: {record[key]}", markup=False)
    out.print("   history:")
    for note in record["history"]:
        out.print(
            f"  {note['at'][:16]}  {note['actor']:<20} {note['action']:<12} {note['note']}",
            markup=False,
        )


def _case_action(case_id: int, action: str, *args: Any, now: datetime | None = None) -> None:
    import getpass

    from engine.escalations import cases as escalations

    application = load_app()
    moment = moment_of(application, now)
    actor = getpass.getuser()
    roster = rules_of(application).roster if action == "assign" else None
    try:
        with unit_of_work(application.db) as session:
            if action == "ack":
                case = escalations.acknowledge(session, case_id, actor, moment)
            elif action == "assign":
                assert roster is not None
                lead = roster.find(args[0])
                if lead is None:
                    names = ", ".join(lead.name for lead in roster.leads)
                    raise fail(f"no support lead named {args[0]!r}; the roster has: {names}")
                case = escalations.assign(session, case_id, lead.name, actor, moment)
            else:
                case = escalations.resolve(session, case_id, args[0], actor, moment)
    except LifecycleError as exc:
        raise fail(str(exc)) from exc
    out.print(
        f"case {case_id} is {case.status}" + (f", owned by {case.owner}" if case.owner else ""),
        markup=False,
    )


@escalations_app.command("ack")
def escalations_ack(
    case_id: Annotated[int, typer.Argument(metavar="ID")], now: NowOption = None
) -> None:
    """Acknowledge a case (you become its owner if it has none)."""
    _case_action(case_id, "ack", now=now)


@escalations_app.command("assign")
def escalations_assign(
    case_id: Annotated[int, typer.Argument(metavar="ID")],
    who: Annotated[str, typer.Argument(metavar="WHO")],
    now: NowOption = None,
) -> None:
    """Assign a case to a support lead of the roster (by name or email)."""
    _case_action(case_id, "assign", who, now=now)


@escalations_app.command("resolve")
def escalations_resolve(
    case_id: Annotated[int, typer.Argument(metavar="ID")],
    note: Annotated[str, typer.Option("--note", help="What was done.")],
    now: NowOption = None,
) -> None:
    """Resolve a case with a note; the customer's marketing resumes."""
    _case_action(case_id, "resolve", note, now=now)

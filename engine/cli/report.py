"""`lifecycle report`: what the playbooks brought, by arm, with uplift against a holdout."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from engine.cli.common import app, load_app, out, parse_moment, print_json, rules_of
from engine.clock import as_utc
from engine.data.uow import reading
from engine.usecases.playbook_report import (
    MIN_SAMPLE,
    ArmResult,
    as_json,
    data_span,
    playbook_results,
)

report_app = typer.Typer(no_args_is_help=True, help="Reports on journeys and their results.")
app.add_typer(report_app, name="report")


@report_app.command("playbooks")
def report_playbooks(
    since: Annotated[
        datetime | None,
        typer.Option(
            parser=parse_moment,
            metavar="MOMENT",
            help="Entries from this moment (default: the first entry on record).",
        ),
    ] = None,
    until: Annotated[
        datetime | None,
        typer.Option(
            parser=parse_moment,
            metavar="MOMENT",
            help="Entries before this moment (default: now).",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Per playbook and arm: enrolled, sent, delivered, opened, clicked, converted, the
    conversion rate, and the uplift against the holdout with its 95% interval."""
    application = load_app()
    rules = rules_of(application)
    with reading(application.db) as session:
        first, _ = data_span(session)
        start = as_utc(since) if since else (first or application.clock())
        end = as_utc(until) if until else application.clock() + timedelta(seconds=1)
        results = playbook_results(session, rules, start, end)
    if json_output:
        print_json(
            {"since": start.isoformat(), "until": end.isoformat(), "playbooks": as_json(results)}
        )
        return
    out.print(f"Entries from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC", markup=False)
    for result in results:
        # Counts in the table, the uplift under it: readable at 80 columns.
        table = Table(
            title=f"{result.playbook}" + (f" — goal: {result.goal}" if result.goal else ""),
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        columns = ("arm", "enrolled", "sent", "delivered", "opened", "clicked", "converted", "rate")
        for column in columns:
            table.add_column(column, justify="left" if column == "arm" else "right", no_wrap=True)
        if not result.arms:
            table.add_row("-", "0", "0", "0", "0", "0", "0", "-")
        uplifts = []
        for arm in result.arms.values():
            table.add_row(
                arm.arm,
                f"{arm.enrolled:,}",
                f"{arm.sent:,}",
                f"{arm.delivered:,}",
                f"{arm.opened:,}",
                f"{arm.clicked:,}",
                f"{arm.converted:,}",
                _percent(arm.rate),
            )
            if uplift := _uplift(arm):
                uplifts.append(f"  uplift of {arm.arm} (95% CI): {uplift}")
        out.print(table)
        for line in uplifts if result.arms else ["  no entries"]:
            out.print(line, markup=False)
    out.print(
        f"Uplift: the arm's conversion rate minus the holdout's (else the global control "
        f"group's), 95% interval by Newcombe's hybrid score method; at least {MIN_SAMPLE} "
        "enrollments in each group.",
        markup=False,
    )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _uplift(arm: ArmResult) -> str:
    u = arm.uplift
    if u is None:
        return ""
    if u.difference is None or u.interval is None:
        return f"not enough data ({u.sample} vs {u.comparison_sample} {u.against})"
    return (
        f"{u.difference * 100:+.1f} pp [{u.interval.low * 100:+.1f}, {u.interval.high * 100:+.1f}]"
        f" vs {u.against}"
    )

"""`lifecycle report`: what the playbooks brought, by arm, with uplift against a holdout;
and the lifecycle KPIs (stages, transitions, retention, churn, orders, CLV, NPS)."""

from __future__ import annotations

import csv
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from engine.cli.common import app, fail, load_app, out, parse_moment, print_json, rules_of
from engine.clock import as_utc
from engine.data.uow import reading
from engine.usecases import lifecycle_report as kpis
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


@report_app.command("lifecycle")
def report_lifecycle(
    since: Annotated[
        datetime | None,
        typer.Option(
            parser=parse_moment,
            metavar="MOMENT",
            help="From this moment (default: the first sign-up on record).",
        ),
    ] = None,
    until: Annotated[
        datetime | None,
        typer.Option(
            parser=parse_moment, metavar="MOMENT", help="Before this moment (default: now)."
        ),
    ] = None,
    within: Annotated[
        int,
        typer.Option(
            min=1, max=3650, help="Days an onboarding step may take (sign-up → first order)."
        ),
    ] = kpis.DEFAULT_WITHIN_DAYS,
    json_output: Annotated[bool, typer.Option("--json")] = False,
    csv_dir: Annotated[
        Path | None,
        typer.Option("--csv", metavar="DIR", help="Also write each table as a CSV file in DIR."),
    ] = None,
) -> None:
    """The lifecycle KPIs: customers per stage, transitions between stages, retention and
    churn per sign-up cohort, repeat purchase, order value, CLV and NPS (definitions: the
    README, "Lifecycle KPIs")."""
    application = load_app()
    rules = rules_of(application)
    with reading(application.db) as session:
        first = kpis.default_since(session)
        start = as_utc(since) if since else (first or application.clock())
        end = as_utc(until) if until else application.clock() + timedelta(seconds=1)
        if start >= end:
            raise fail(f"--since ({start.isoformat()}) must be before --until ({end.isoformat()})")
        report = kpis.lifecycle_report(session, rules.stages, start, end, within_days=within)
    if csv_dir is not None:
        _write_csv(csv_dir, kpis.csv_tables(report))
    if json_output:
        print_json(kpis.as_json(report))
        return
    _print_lifecycle(report, rules.stages is None)
    if csv_dir is not None:
        out.print(f"CSV files written to {csv_dir}", markup=False)


def _write_csv(directory: Path, tables: dict[str, list[list[object]]]) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, rows in tables.items():
            with (directory / name).open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows(rows)
    except OSError as exc:
        raise fail(f"cannot write the CSV files to {directory}: {exc.strerror or exc}") from exc


def _money(cents: float | None) -> str:
    return "-" if cents is None else f"{cents / 100:,.2f}"


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _table(title: str, columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    return table


def _print_lifecycle(report: kpis.LifecycleReport, no_model: bool) -> None:
    out.print(
        f"From {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC", markup=False
    )
    if no_model:
        out.print("No stage model (rules/stages.yaml): no stages are recorded.", markup=False)
    stages = _table(
        f"Customers per stage now ({report.customers:,})", ["stage", "customers", "share"]
    )
    for s in report.stages:
        stages.add_row(
            s.label,
            f"{s.customers:,}",
            _percent(s.customers / report.customers if report.customers else None),
        )
    out.print(stages)
    froms, tos = report.transition_stages()
    matrix = _table("Stage transitions in the period (from ↓, to →)", ["from", *tos])
    for f in froms:
        matrix.add_row(f, *(f"{report.transitions.get((f, t), 0):,}" for t in tos))
    out.print(matrix if froms else "No stage transitions in the period.")
    months = max((len(c.retained) for c in report.cohorts), default=0)
    shown = min(months, 13)
    cohorts = _table(
        "Retention by sign-up cohort (month since sign-up)",
        ["cohort", "customers", *(f"m{k}" for k in range(shown))],
    )
    for c in report.cohorts[-24:]:
        cohorts.add_row(
            c.month,
            f"{c.size:,}",
            *("-" if r is None else f"{r:.0%}" for r in c.retention[:shown]),
            *([""] * (shown - len(c.retention[:shown]))),
        )
    out.print(cohorts if report.cohorts else "No sign-ups in the period.")
    o, p = report.orders, report.predictive
    total_size = sum(c.size for c in report.cohorts)
    total_revenue = sum(c.revenue_cents for c in report.cohorts)
    lines = [
        f"Orders: {o.orders:,} by {o.buyers:,} customers; average order value "
        f"{_money(o.average_order_value_cents)}; {_number(o.orders_per_customer)} orders per "
        f"customer; repeat-purchase rate {_percent(o.repeat_purchase_rate)}",
        f"Historic CLV (revenue to date per customer of the period's cohorts): "
        f"{_money(total_revenue / total_size if total_size else None)}",
        "Predictive CLV: "
        + (
            f"{_money(p.clv_cents)} = AOV {_money(p.average_order_value_cents)} × "
            f"{_number(p.frequency, 3)} orders per active customer-month × "
            f"{_number(p.lifetime_months, 1)} months (monthly churn {_percent(p.monthly_churn)}, "
            f"{p.first} to {p.last})"
            if p.note is None
            else f"- ({p.note})"
        ),
        f"NPS: {_number(report.nps.score, 1)} from {report.nps.answers:,} answers "
        f"({report.nps.promoters:,} promoters, {report.nps.passives:,} passives, "
        f"{report.nps.detractors:,} detractors)",
    ]
    for line in lines:
        out.print(line, markup=False)
    by_stage = _table("NPS by stage (the customer's stage now)", ["stage", "answers", "nps"])
    for stage, n in sorted(report.nps_by_stage.items()):
        by_stage.add_row(report.labels.get(stage, stage), f"{n.answers:,}", _number(n.score, 1))
    if report.nps_by_stage:
        out.print(by_stage)
    steps = _table("Onboarding", ["step", "within", "of", "converted", "rate"])
    for step in report.onboarding:
        steps.add_row(
            step.step,
            f"{step.within_days}d",
            f"{step.eligible:,}",
            f"{step.converted:,}",
            _percent(step.rate),
        )
    out.print(steps)

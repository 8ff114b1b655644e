"""`lifecycle tick`, `run`, `dispatch`, `simulate` and `serve`: the engine at work."""

from __future__ import annotations

import time
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table
from sqlalchemy import make_url

from engine.bootstrap import simulation_app
from engine.cli.common import (
    NowOption,
    app,
    err,
    fail,
    moment_of,
    out,
    parse_moment,
    print_json,
    read_settings,
    rules_of,
    start_app,
)
from engine.clock import as_utc
from engine.errors import LifecycleError
from engine.wording import listing, plural


@app.command()
def tick(
    full: Annotated[
        bool, typer.Option("--full", help="Evaluate every customer, not only the changed.")
    ] = False,
    now: NowOption = None,
) -> None:
    """Run one evaluation tick, one SLA check, one dispatch and housekeeping, then stop."""
    from engine.runners.housekeeping import housekeeping_tick
    from engine.runners.ticks import dispatch_tick, evaluation_tick, record_tick, sla_tick

    application = start_app("tick")
    rules = rules_of(application)
    moment = moment_of(application, now)
    started = time.perf_counter()
    report = evaluation_tick(application, moment, full=full, rules=rules)
    notified = sla_tick(application, moment, rules=rules)
    sent = dispatch_tick(application, moment, rules=rules)
    pruned = housekeeping_tick(application, moment)
    for kind in ("full_sweep" if report.full else "evaluate", "sla", "dispatch"):
        record_tick(application, kind, moment)
    j = report.journeys
    out.print(
        f"evaluated {plural(report.customers, 'customer')}: {j.total('enrolled')} enrolled, "
        f"{j.total('queued')} queued, {j.total('deferred')} deferred, "
        f"{j.total('skipped')} skipped, {j.total('converted')} reached their goal, "
        f"{j.total('exited')} no longer eligible, "
        f"{plural(j.total('stage'), 'stage change')}; "
        f"{plural(notified, 'SLA notification')}; dispatched {sent.total_sent} "
        f"({sent.retried} to retry, {sent.failed} failed); pruned "
        f"{plural(pruned.receipts, 'webhook receipt')} in {time.perf_counter() - started:.2f}s",
        markup=False,
    )


class RunnerChoice(StrEnum):
    inline = "inline"
    dramatiq = "dramatiq"


@app.command()
def run(
    runner: Annotated[
        RunnerChoice | None,
        typer.Option(
            "--runner",
            help="inline: the work runs in this process; dramatiq: this process holds the "
            "scheduler lock, plans and enqueues, and `lifecycle worker` processes do the "
            "work (default: LIFECYCLE_RUNNER).",
        ),
    ] = None,
) -> None:
    """Start the scheduler: evaluation, dispatch and SLA ticks until SIGINT or SIGTERM."""
    import logging

    from scheduler import LifecycleScheduler

    settings = read_settings()
    if runner is not None:
        settings = settings.model_copy(update={"runner": runner.value})
    application = start_app("run", log_level=logging.INFO, settings=settings)
    rules_of(application)
    shown = _shown(settings.database_url)
    if settings.runner == "dramatiq":
        from engine.runners.distributed import Actors, DramatiqRunner, make_broker
        from engine.runners.leader import Leadership

        try:
            broker = make_broker(settings.broker_url)
            leadership = Leadership(application.db)
        except LifecycleError as exc:
            raise fail(str(exc)) from exc
        out.print(
            f"lifecycle scheduler (dramatiq runner, broker {_shown(settings.broker_url or '')}) "
            f"on {shown}; it plans and enqueues once it holds the scheduler lock; Ctrl-C stops it",
            markup=False,
        )
        scheduler = LifecycleScheduler(
            application,
            runner=DramatiqRunner(application, Actors(broker, None, settings.queue_prefix)),
            leadership=leadership,
        )
        scheduler.run_forever()
        broker.close()
        if scheduler.lost_leadership:
            raise fail("the scheduler lock was lost; stopped so that a standby plans alone")
    else:
        out.print(f"lifecycle scheduler running on {shown}; Ctrl-C stops it", markup=False)
        LifecycleScheduler(application).run_forever()
    out.print("stopped cleanly")


class Activity(StrEnum):
    none = "none"
    synthetic = "synthetic"


@app.command()
def simulate(
    days: Annotated[int, typer.Option("--days", min=1, max=366)] = 30,
    start: Annotated[
        datetime | None,
        typer.Option(
            "--start",
            parser=parse_moment,
            metavar="MOMENT",
            help="Simulated start, ISO 8601 like 2026-03-02T09:00:00Z (default: now).",
        ),
    ] = None,
    customer: Annotated[
        str | None, typer.Option("--customer", help="Also print this customer's timeline.")
    ] = None,
    activity: Annotated[
        Activity,
        typer.Option(
            "--activity",
            help="none: only the clock moves over the data as it is; synthetic: also "
            "generated sign-ups, visits, orders, NPS answers and complaints.",
        ),
    ] = Activity.none,
    work_db: Annotated[
        Path | None,
        typer.Option(
            "--work-db",
            help="Keep the simulated copy in this new SQLite file (default: discarded).",
        ),
    ] = None,
    outbox: Annotated[
        Path | None,
        typer.Option("--outbox", help="Keep the rendered messages here (default: discarded)."),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option(
            "--experiment",
            help="A known truth for a playbook's report: PLAYBOOK:BASE[,ARM=+LIFT...], e.g. "
            "re_engagement:0.05,b=+0.05 (after its first message, a customer orders within "
            "the goal's window with the base rate plus the lift of their arm).",
        ),
    ] = None,
    random_seed: Annotated[int, typer.Option("--seed")] = 11,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run the real engine on a fake clock over N days, on a copy of the database.

    The configured database is never changed (SQLite: a backup copy; PostgreSQL: a scratch
    schema, dropped at the end) and nothing is sent: every message goes to a console
    channel, whatever the channel settings say.
    """
    from engine.usecases.simulate import Experiment
    from engine.usecases.simulate import simulate as run_simulation

    settings = read_settings()
    try:
        truth = Experiment.parse(experiment) if experiment else None
    except LifecycleError as exc:
        raise fail(str(exc)) from exc
    if not json_output:
        err.print(
            f"simulating on a copy of {_shown(settings.database_url)}; it is not changed and "
            "nothing is sent",
            markup=False,
            soft_wrap=True,
        )
    try:
        with simulation_app(settings, work_db=work_db, outbox=outbox) as application:
            rules_of(application)
            moment = as_utc(start) if start is not None else application.clock()
            started = time.perf_counter()
            report = run_simulation(
                application,
                moment,
                days,
                seed=random_seed,
                customer=customer,
                activity=activity is Activity.synthetic,
                experiment=truth,
            )
            elapsed = time.perf_counter() - started
    except LifecycleError as exc:
        raise fail(str(exc)) from exc
    if json_output:
        print_json({**report.as_dict(), "seconds": round(elapsed, 2)})
        return
    _print_simulation(report, elapsed, outbox, work_db)


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _print_simulation(
    report: Any, elapsed: float, outbox: Path | None, work_db: Path | None
) -> None:
    data = report.as_dict()
    if report.activity:
        events = listing(f"{n:,} {kind}" for kind, n in sorted(report.events.items()))
        happened = (
            f"{plural(report.new_customers, 'new customer')}; events: {events}; "
            f"{plural(report.cases_resolved, 'case')} resolved by the simulated lead"
        )
    else:
        happened = "no synthetic activity (add it with --activity synthetic)"
    out.print(
        f"Simulated {report.hours} hours from {report.start:%Y-%m-%d %H:%M} to {report.end:%Y-%m-%d %H:%M} UTC "
        f"in {elapsed:.1f}s: {happened}",
        markup=False,
    )
    # Totals in the table (narrow: readable at 80 columns), the breakdowns below it.
    table = Table(title="Per playbook over the simulation", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("playbook", no_wrap=True)
    for column in ("enrolled", "sent", "deferred", "skipped", "goal", "completed"):
        table.add_column(column, justify="right")
    details = []
    for pid, tally in data["playbooks"].items():
        table.add_row(
            pid,
            str(tally["enrolled"]),
            *(str(sum(tally[key].values())) for key in ("sent", "deferred", "skipped")),
            str(tally["exited_on_goal"]),
            str(tally["completed"]),
        )
        parts = [
            f"{key} {listing(f'{k} {v}' for k, v in sorted(tally[key].items()))}"
            for key in ("sent", "deferred", "skipped")
            if tally[key]
        ]
        if parts:
            details.append(f"  {pid}: {'; '.join(parts)}")
    out.print(table)
    for line in details:
        out.print(line, markup=False)
    if report.timeline:
        out.print(f"\nTimeline of the customer ({plural(len(report.timeline), 'decision')}):")
        for row in report.timeline:
            until = f" until {row['until'][:16]}" if row["until"] else ""
            out.print(
                f"  {row['at'][:16]}  {row['playbook']:<22} {row['step'] or '':<18} {row['outcome']:<9} {row['reason']}{until}",
                markup=False,
            )
    if report.experiment is not None:
        _print_experiment(report.experiment)
    if outbox is not None:
        out.print(f"Rendered messages are under {outbox}/", markup=False)
    else:
        out.print("Rendered messages were discarded (keep them with --outbox DIR)", markup=False)
    if work_db is not None:
        out.print(f"The simulated database is kept in {work_db}", markup=False)


def _print_experiment(outcome: Any) -> None:
    table = Table(title=f"Experiment on {outcome.playbook}: the report next to the truth")
    for column in ("arm", "enrolled", "converted", "rate", "true rate", "uplift (95% CI)"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    table.add_column("true uplift", justify="right")
    table.add_column("covered", justify="left")
    for arm in outcome.arms:
        uplift = arm.result.uplift
        if uplift is None:
            estimate = "(comparison group)"
        elif uplift.interval is None:
            estimate = "not enough data"
        else:
            estimate = f"{uplift.difference:+.1%} [{uplift.interval.low:+.1%}, {uplift.interval.high:+.1%}]"
        table.add_row(
            arm.result.arm,
            f"{arm.result.enrolled:,}",
            f"{arm.result.converted:,}",
            "-" if arm.result.rate is None else f"{arm.result.rate:.1%}",
            f"{arm.true_rate:.1%}",
            estimate,
            "" if arm.true_uplift is None else f"{arm.true_uplift:+.1%}",
            {True: "yes", False: "NO", None: ""}[arm.covered],
        )
    out.print(table)


@app.command()
def dispatch(now: NowOption = None) -> None:
    """Send every due outbox message once (the scheduler does this every few seconds)."""
    from engine.runners.ticks import dispatch_tick

    application = start_app("dispatch")
    report = dispatch_tick(application, moment_of(application, now), rules=rules_of(application))
    out.print(
        f"claimed {report.claimed}; sent {report.total_sent} ({listing(f'{k} {v}' for k, v in report.sent.items())}); "
        f"{report.retried} to retry; {report.failed} failed; {report.cancelled} cancelled; "
        f"{report.requeued_after_crash} requeued and {report.marked_ambiguous} marked ambiguous after a crash; "
        f"{report.settled} settled with the provider, {report.settled_requeued} found never received "
        f"(queued again), {report.still_ambiguous} still ambiguous",
        markup=False,
    )


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
) -> None:
    """Serve the ingest API, the provider webhooks and the support console; the rule files
    are reloaded every LIFECYCLE_RULES_RELOAD_S seconds (the last good rules stay)."""
    import logging

    import uvicorn

    from engine.web.app import create_app

    application = start_app("serve", log_level=logging.INFO)
    rules_of(application)
    every = application.settings.rules_reload_s
    uvicorn.run(
        create_app(application, reload_rules_every=every),
        host=host,
        port=port,
        log_level="info",
    )

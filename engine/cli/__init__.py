"""The ``lifecycle`` command line. Every command builds the app through engine.bootstrap."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypedDict

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import select
from sqlmodel import Session, col

from engine.bootstrap import App, bootstrap
from engine.clock import as_utc
from engine.data.facts import subjects_for
from engine.data.models import Customer, Event
from engine.errors import LifecycleError, RulesInvalid
from engine.evaluation.runs import Summary, evaluate_batches, subject_batches
from engine.language import conditions
from engine.playbooks.loader import load_rules
from engine.playbooks.model import RuleSet
from engine.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
rules_app = typer.Typer(no_args_is_help=True, help="Check the rule files.")
import_app = typer.Typer(no_args_is_help=True, help="Import customers or events (CSV or JSONL).")
app.add_typer(rules_app, name="rules")
app.add_typer(import_app, name="import")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

NowOption = Annotated[
    datetime | None,
    typer.Option("--now", help="Pretend it is this moment (ISO 8601, UTC if no offset)."),
]


class _Check(TypedDict):
    """One part of a playbook (enter, exit, a step guard) as `explain` reports it."""

    part: str
    condition: str
    holds: bool
    why: str


class _PlaybookExplanation(TypedDict):
    """One playbook in the `explain` report."""

    playbook: str
    matches: bool
    event: str | None
    journey: str | None
    checks: list[_Check]


class _MessageRecord(TypedDict):
    """One outbox message as `messages` lists it."""

    id: str
    customer: str | None
    playbook: str | None
    step: str | None
    channel: str
    status: str
    due_at: str
    attempts: int
    provider_id: str | None
    last_error: str | None


def _print_json(payload: Any) -> None:
    """Machine output: plain JSON on stdout, never wrapped or coloured by Rich."""
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def _app() -> App:
    return bootstrap(Settings())


def _now(application: App, now: datetime | None) -> datetime:
    return as_utc(now) if now is not None else application.clock()


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def _rules(application: App) -> RuleSet:
    try:
        return application.rules
    except RulesInvalid as exc:
        for problem in exc.problems:
            err.print(str(problem), markup=False, soft_wrap=True)
        raise typer.Exit(1) from exc


@app.command()
def init() -> None:
    """Create or upgrade the database, and check the rules."""
    application = _app()
    rules = _rules(application)
    out.print(f"database ready: {application.settings.database_url}")
    out.print(f"rules ok: {len(rules.playbooks)} playbooks, version {rules.version}")


@rules_app.command("check")
def rules_check(
    directory: Annotated[Path, typer.Argument(help="Rules directory.")] = Path("rules"),
    templates: Annotated[Path, typer.Option(help="Templates directory.")] = Path(
        "templates/messages"
    ),
) -> None:
    """Validate every rule file; print each problem as path:line:col and exit 1 if any."""
    try:
        rules = load_rules(directory, templates)
    except RulesInvalid as exc:
        for problem in exc.problems:
            out.print(str(problem), markup=False, soft_wrap=True)
        count = len(exc.problems)
        err.print(f"{count} problem{'s' if count != 1 else ''} found", markup=False)
        raise typer.Exit(1) from exc
    out.print(
        f"{len(rules.playbooks)} playbooks ok ({', '.join(sorted(rules.playbooks))}); "
        f"{len(rules.catalog.facts)} facts; rules version {rules.version}",
        markup=False,
    )


@app.command()
def facts(json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List every fact conditions may use: built-in, attributes and event properties."""
    rules = _rules(_app())
    specs = sorted(rules.catalog.facts.values(), key=lambda s: (s.source, s.name))
    if json_output:
        rows = [
            {
                "name": s.name,
                "type": str(s.type),
                "source": str(s.source),
                "description": s.description,
            }
            for s in specs
        ]
        out.print_json(json.dumps(rows))
        return
    table = Table(title="Fact catalog")
    for column in ("fact", "type", "source", "description"):
        table.add_column(column)
    for spec in specs:
        table.add_row(spec.name, str(spec.type), str(spec.source), spec.description)
    out.print(table)
    out.print(f"event types: {', '.join(sorted(rules.catalog.event_types))}")


@app.command()
def seed(
    customers: Annotated[
        int, typer.Option("--customers", min=1, help="How many customers.")
    ] = 1000,
    random_seed: Annotated[int, typer.Option("--seed")] = 7,
    now: NowOption = None,
) -> None:
    """Create synthetic customers with realistic histories (every playbook gets matches)."""
    from engine.data.seed import seed as run_seed

    application = _app()
    moment = _now(application, now)
    with _progress() as progress:
        task = progress.add_task("seeding customers", total=customers)
        report = run_seed(
            application.db,
            customers,
            moment,
            seed=random_seed,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    out.print(report.summary())


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal,
    )


def _import(kind: str, file: Path, now: datetime | None, history: bool = False) -> None:
    from engine.data import importing

    application = _app()
    rules = _rules(application)
    moment = _now(application, now)
    options: dict[str, Any] = {"history": True} if history else {}
    run = importing.import_customers if kind == "customers" else importing.import_events
    try:
        with _progress() as progress:
            task = progress.add_task(f"importing {kind}", total=None)
            report = run(
                application.db,
                file,
                rules.catalog,
                moment,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
                **options,
            )
    except LifecycleError as exc:
        raise _fail(str(exc)) from exc
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


@app.command()
def evaluate(
    customer: Annotated[
        list[str] | None, typer.Option("--customer", help="Only this customer (repeatable).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report only; change nothing.")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json")] = False,
    engine: Annotated[str, typer.Option(help="durable or reference")] = "durable",
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (0: in this process).")
    ] = None,
    now: NowOption = None,
) -> None:
    """Evaluate customers against every playbook: which playbooks and steps each matches."""
    application = _app()
    rules = _rules(application)
    moment = _now(application, now)
    count = workers if workers is not None else (0 if customer else application.workers())
    started = time.perf_counter()
    batches = subject_batches(
        application.db,
        rules,
        moment,
        batch_size=application.settings.batch_size,
        customer_ids=customer,
    )
    summary = Summary()
    details: list[dict[str, Any]] = []
    try:
        for evaluations in evaluate_batches(rules, batches, workers=count, engine=engine):
            for evaluation in evaluations:
                summary.add(rules, evaluation)
                if customer:
                    details.append(_detail(rules, evaluation))
    except LifecycleError as exc:
        raise _fail(str(exc)) from exc
    elapsed = time.perf_counter() - started
    if not dry_run:
        _mark_events_evaluated(application, customer, moment)
    _print_summary(rules, summary, details, elapsed, json_output, dry_run)


def _mark_events_evaluated(application: App, customer: list[str] | None, moment: datetime) -> None:
    from sqlalchemy import update

    statement = update(Event).where(col(Event.evaluated_at).is_(None))
    if customer:
        statement = statement.where(col(Event.customer_id).in_(customer))
    with Session(application.db) as session:
        session.execute(statement.values(evaluated_at=moment))
        session.commit()


def _detail(rules: RuleSet, evaluation: Any) -> dict[str, Any]:
    subject = evaluation.subject
    return {
        "customer": subject.customer_id,
        "event": subject.event_id,
        "event_type": subject.event_type,
        "matches": [
            {"playbook": m.playbook, "steps": list(m.steps), "exit_goal_met": m.exited}
            for m in evaluation.entered(rules)
        ],
    }


def _print_summary(
    rules: RuleSet,
    summary: Summary,
    details: list[dict[str, Any]],
    elapsed: float,
    json_output: bool,
    dry_run: bool,
) -> None:
    if json_output:
        payload = {
            "customers": summary.customers,
            "subjects": summary.subjects,
            "seconds": round(elapsed, 3),
            "dry_run": dry_run,
            "playbooks": {
                pid: {
                    "matched": summary.entered.get(pid, 0),
                    "exit_goal_met": summary.exited.get(pid, 0),
                    "steps": {s.id: summary.steps.get(pid, {}).get(s.id, 0) for s in pb.steps},
                }
                for pid, pb in sorted(rules.playbooks.items())
            },
        }
        if details:
            payload["details"] = details
        _print_json(payload)
        return
    for detail in details:
        label = detail["customer"] + (
            f" (event {detail['event_type']} {detail['event']})" if detail["event"] else ""
        )
        if not detail["matches"]:
            out.print(f"{label}: matches no playbook", markup=False)
        for match in detail["matches"]:
            out.print(
                f"{label}: {match['playbook']} steps {', '.join(match['steps']) or '-'}",
                markup=False,
            )
    table = Table(
        title=f"Evaluation of {summary.customers} customers ({summary.subjects - summary.customers} pending events)"
    )
    for column in ("playbook", "stage", "matched", "steps matched", "exit goal met"):
        table.add_column(
            column, justify="right" if column in ("matched", "exit goal met") else "left"
        )
    for pid, playbook in sorted(rules.playbooks.items()):
        steps = summary.steps.get(pid, {})
        table.add_row(
            pid,
            playbook.stage,
            str(summary.entered.get(pid, 0)),
            ", ".join(f"{s.id} {steps.get(s.id, 0)}" for s in playbook.steps),
            str(summary.exited.get(pid, 0)),
        )
    out.print(table)
    rate = summary.subjects / elapsed if elapsed > 0 else 0.0
    out.print(
        f"{summary.subjects} evaluations in {elapsed:.2f}s ({rate:,.0f}/s){' (dry run)' if dry_run else ''}"
    )


@app.command()
def explain(
    customer_id: Annotated[str, typer.Argument(metavar="CUSTOMER")],
    json_output: Annotated[bool, typer.Option("--json")] = False,
    now: NowOption = None,
) -> None:
    """Per playbook: does the customer match, and if not, which part is false and why."""
    application = _app()
    rules = _rules(application)
    moment = _now(application, now)
    with Session(application.db) as session:
        if session.get(Customer, customer_id) is None:
            raise _fail(f"no customer with id {customer_id!r}")
        pending = _pending_events(session, customer_id)
        journeys = _journeys(session, customer_id)
        report: list[_PlaybookExplanation] = []
        base = subjects_for(session, [customer_id], rules.catalog, moment)[0]
        for pid, playbook in sorted(rules.playbooks.items()):
            facts = base.facts
            event_note = None
            if playbook.enter_on:
                event = pending.get(playbook.enter_on)
                if event is None:
                    event_note = f"waits for a new {playbook.enter_on!r} event; none is pending"
                else:
                    facts = subjects_for(
                        session, [customer_id], rules.catalog, moment, [event], include_sweep=False
                    )[0].facts
                    event_note = f"pending {playbook.enter_on!r} event {event.id} of {event.occurred_at:%Y-%m-%d %H:%M}"
            parts = {"enter": playbook.enter}
            if playbook.exit is not None:
                parts["exit"] = playbook.exit
            for step in playbook.steps:
                if step.when is not None:
                    parts[f"step {step.id}"] = step.when
            checks: list[_Check] = []
            for label, condition in parts.items():
                explanation = conditions.explain(condition, facts)
                checks.append(
                    {
                        "part": label,
                        "condition": condition.source,
                        "holds": explanation.matched,
                        "why": explanation.summary,
                    }
                )
            report.append(
                {
                    "playbook": pid,
                    "matches": checks[0]["holds"],
                    "event": event_note,
                    "journey": _journey_note(playbook, journeys.get(pid, []), moment),
                    "checks": checks,
                }
            )
        timeline = _timeline(session, customer_id)
    if json_output:
        payload = {
            "customer": customer_id,
            "at": moment.isoformat(),
            "playbooks": report,
            "timeline": timeline,
        }
        _print_json(payload)
        return
    out.print(f"[bold]{customer_id}[/bold] at {moment:%Y-%m-%d %H:%M} UTC")
    for entry in report:
        mark = "[green]matches[/green]" if entry["matches"] else "[red]does not match[/red]"
        out.print(f"\n[bold]{entry['playbook']}[/bold]: {mark}")
        for note in (entry["event"], entry["journey"]):
            if note:
                out.print(f"  {note}", markup=False)
        for check in entry["checks"]:
            state = "true " if check["holds"] else "false"
            out.print(f"  {check['part']:<22} {state}  {check['condition']}", markup=False)
            if not check["holds"] and check["why"]:
                out.print(f"  {'':<22}        {check['why']}", markup=False)
    out.print(f"\n[bold]Timeline[/bold] ({len(timeline)} decisions)")
    for row in timeline:
        until = f" (until {row['until'][:16]})" if row["until"] else ""
        step_note = f" {row['step']}" if row["step"] else ""
        out.print(
            f"  {row['at'][:16]}  {row['playbook']}{step_note}: {row['outcome']} — {row['reason']}{until}",
            markup=False,
        )


def _timeline(session: Session, customer_id: str) -> list[dict[str, Any]]:
    """Every decision about the customer, oldest first: the answer to "why"."""
    from engine.data.models import Decision

    statement = (
        select(Decision)
        .where(col(Decision.customer_id) == customer_id)
        .order_by(col(Decision.at), col(Decision.id))
    )
    return [
        {
            "at": d.at.isoformat(),
            "playbook": d.playbook,
            "step": d.step_id,
            "outcome": d.outcome,
            "reason": d.reason,
            "until": d.until.isoformat() if d.until else None,
            "message_id": d.message_id,
            "rules_version": d.rules_version,
        }
        for d in session.scalars(statement)
    ]


def _pending_events(session: Session, customer_id: str) -> dict[str, Event]:
    """The newest not-yet-evaluated event of each type: what could still trigger an entry."""
    statement = (
        select(Event)
        .where(col(Event.customer_id) == customer_id, col(Event.evaluated_at).is_(None))
        .order_by(col(Event.occurred_at))
    )
    return {event.type: event for event in session.scalars(statement)}


def _journeys(session: Session, customer_id: str) -> dict[str, list[Any]]:
    from engine.data.models import Enrollment

    statement = (
        select(Enrollment)
        .where(col(Enrollment.customer_id) == customer_id)
        .order_by(col(Enrollment.entered_at))
    )
    found: dict[str, list[Any]] = {}
    for enrollment in session.scalars(statement):
        found.setdefault(enrollment.playbook, []).append(enrollment)
    return found


def _journey_note(playbook: Any, enrollments: list[Any], now: datetime) -> str | None:
    """Where the customer stands on this journey, and whether re-entry is allowed."""
    if not enrollments:
        return None
    last = enrollments[-1]
    if last.status == "active":
        step = playbook.steps[last.next_step].id if last.next_step < len(playbook.steps) else "-"
        due = f" due {last.next_due_at:%Y-%m-%d %H:%M}" if last.next_due_at else ""
        held = f"; held: {last.hold_reason}" if last.hold_reason else ""
        return (
            f"on this journey since {last.entered_at:%Y-%m-%d %H:%M}; next step {step}{due}{held}"
        )
    ended = f"last journey {last.status} {last.ended_at:%Y-%m-%d %H:%M} ({last.end_reason})"
    if playbook.reentry is None:
        return f"{ended}; re-entry: never"
    allowed = last.entered_at + playbook.reentry
    when = "now" if allowed <= now else f"from {allowed:%Y-%m-%d %H:%M}"
    return f"{ended}; re-entry allowed {when}"


# ---------------------------------------------------------------- journeys, sending, scheduler


@app.command()
def tick(
    full: Annotated[
        bool, typer.Option("--full", help="Evaluate every customer, not only the changed.")
    ] = False,
    now: NowOption = None,
) -> None:
    """Run one evaluation tick, one SLA check and one dispatch, then stop."""
    from engine.runners.ticks import dispatch_tick, evaluation_tick, sla_tick

    application = _app()
    rules = _rules(application)
    moment = _now(application, now)
    started = time.perf_counter()
    report = evaluation_tick(application, moment, full=full, rules=rules)
    notified = sla_tick(application, moment, rules=rules)
    sent = dispatch_tick(application, moment, rules=rules)
    j = report.journeys
    out.print(
        f"evaluated {report.customers} customers: {sum(j.enrolled.values())} enrolled, "
        f"{sum(j.queued.values())} queued, {sum(j.deferred.values())} deferred, "
        f"{sum(j.skipped.values())} skipped, {sum(j.exited.values())} exited on goal; "
        f"{notified} SLA notifications; dispatched {sent.total_sent} "
        f"({sent.retried} to retry, {sent.failed} failed) in {time.perf_counter() - started:.2f}s",
        markup=False,
    )


@app.command()
def run() -> None:
    """Start the scheduler: evaluation, dispatch and SLA ticks until SIGINT or SIGTERM."""
    import logging

    from scheduler import LifecycleScheduler

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    application = _app()
    _rules(application)
    out.print(
        f"lifecycle scheduler running on {application.settings.database_url}; Ctrl-C stops it"
    )
    LifecycleScheduler(application).run_forever()
    out.print("stopped cleanly")


@app.command()
def simulate(
    days: Annotated[int, typer.Option("--days", min=1, max=366)] = 30,
    start: Annotated[
        datetime | None, typer.Option("--start", help="Simulated start (default: now).")
    ] = None,
    customer: Annotated[
        str | None, typer.Option("--customer", help="Also print this customer's timeline.")
    ] = None,
    random_seed: Annotated[int, typer.Option("--seed")] = 11,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run the real engine on a fake clock over N days of simulated activity."""
    from engine.usecases.simulate import simulate as run_simulation

    settings = Settings()
    application = bootstrap(settings)
    if settings.email_channel == "console" and settings.sms_channel == "console":
        from channels.console import ConsoleChannel

        quiet = ConsoleChannel(Path(settings.outbox_dir), stream=None)
        application.channels = {"email": quiet, "sms": quiet}
    _rules(application)
    moment = as_utc(start) if start is not None else application.clock()
    started = time.perf_counter()
    report = run_simulation(application, moment, days, seed=random_seed, customer=customer)
    elapsed = time.perf_counter() - started
    if json_output:
        _print_json({**report.as_dict(), "seconds": round(elapsed, 2)})
        return
    _print_simulation(report, elapsed, application.settings.outbox_dir)


def _print_simulation(report: Any, elapsed: float, outbox: Path) -> None:
    data = report.as_dict()
    out.print(
        f"Simulated {report.hours} hours from {report.start:%Y-%m-%d %H:%M} to {report.end:%Y-%m-%d %H:%M} UTC "
        f"in {elapsed:.1f}s: {report.new_customers} new customers, "
        + ", ".join(f"{n} {k}" for k, n in sorted(report.events.items()))
        + f"; {report.cases_resolved} cases resolved by the simulated lead",
        markup=False,
    )
    table = Table(title="Per playbook over the simulation")
    for column in (
        "playbook",
        "enrolled",
        "sent",
        "deferred",
        "skipped (why)",
        "exited on goal",
        "completed",
    ):
        table.add_column(column)
    for pid, tally in data["playbooks"].items():
        table.add_row(
            pid,
            str(tally["enrolled"]),
            ", ".join(f"{k} {v}" for k, v in sorted(tally["sent"].items())) or "0",
            ", ".join(f"{k} {v}" for k, v in sorted(tally["deferred"].items())) or "0",
            "\n".join(f"{k} {v}" for k, v in sorted(tally["skipped"].items())) or "0",
            str(tally["exited_on_goal"]),
            str(tally["completed"]),
        )
    out.print(table)
    if report.timeline:
        out.print(f"\nTimeline of the customer ({len(report.timeline)} decisions):")
        for row in report.timeline:
            until = f" until {row['until'][:16]}" if row["until"] else ""
            out.print(
                f"  {row['at'][:16]}  {row['playbook']:<22} {row['step'] or '':<18} {row['outcome']:<9} {row['reason']}{until}",
                markup=False,
            )
    out.print(f"Rendered messages are under {outbox}/")


@app.command()
def dispatch(now: NowOption = None) -> None:
    """Send every due outbox message once (the scheduler does this every few seconds)."""
    from engine.runners.ticks import dispatch_tick

    application = _app()
    report = dispatch_tick(application, _now(application, now), rules=_rules(application))
    out.print(
        f"claimed {report.claimed}; sent {report.total_sent} ({', '.join(f'{k} {v}' for k, v in report.sent.items()) or 'none'}); "
        f"{report.retried} to retry; {report.failed} failed; {report.cancelled} cancelled; "
        f"{report.requeued_after_crash} requeued and {report.marked_ambiguous} marked ambiguous after a crash",
        markup=False,
    )


messages_app = typer.Typer(no_args_is_help=True, help="Inspect and retry outbox messages.")
app.add_typer(messages_app, name="messages")


@messages_app.command("list")
def messages_list(
    status: Annotated[
        str | None,
        typer.Option(
            help="queued, sending, sent, delivered, failed, bounced, cancelled, ambiguous"
        ),
    ] = None,
    customer: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option()] = 50,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List outbox messages, newest first."""
    from engine.data.models import Message

    application = _app()
    statement = select(Message).order_by(col(Message.created_at).desc()).limit(limit)
    if status:
        statement = statement.where(col(Message.status) == status)
    if customer:
        statement = statement.where(col(Message.customer_id) == customer)
    with Session(application.db) as session:
        rows = list(session.scalars(statement))
    records: list[_MessageRecord] = [
        {
            "id": m.id,
            "customer": m.customer_id,
            "playbook": m.playbook,
            "step": m.step_id,
            "channel": m.channel,
            "status": str(m.status),
            "due_at": m.due_at.isoformat(),
            "attempts": m.attempts,
            "provider_id": m.provider_id,
            "last_error": m.last_error,
        }
        for m in rows
    ]
    if json_output:
        _print_json(records)
        return
    table = Table()
    for column in ("id", "customer", "playbook/step", "channel", "status", "due", "tries", "note"):
        table.add_column(column)
    for r in records:
        table.add_row(
            r["id"][:8],
            r["customer"] or "",
            f"{r['playbook']}/{r['step']}",
            r["channel"],
            r["status"],
            r["due_at"][:16],
            str(r["attempts"]),
            r["last_error"] or "",
        )
    out.print(table)


@messages_app.command("retry")
def messages_retry(
    message_id: Annotated[str, typer.Argument(metavar="ID")], now: NowOption = None
) -> None:
    """Queue an ambiguous or failed message again (you accept it may arrive twice)."""
    from engine.data.models import Message, MessageStatus
    from engine.errors import IllegalTransition, NotFound

    application = _app()
    moment = _now(application, now)
    with Session(application.db) as session:
        message = session.get(Message, message_id)
        try:
            if message is None:
                raise NotFound("message", message_id)
            if message.status not in (MessageStatus.AMBIGUOUS, MessageStatus.FAILED):
                raise IllegalTransition("message", message_id, message.status, "retry")
        except LifecycleError as exc:
            raise _fail(str(exc)) from exc
        previous = message.status
        message.status = MessageStatus.QUEUED
        message.due_at = moment
        message.attempts = 0
        message.last_error = f"retried by hand (was {previous})"
        message.updated_at = moment
        session.commit()
    out.print(f"message {message_id} queued again")


@app.command()
def preview(
    template: Annotated[
        str, typer.Argument(help="Template name, e.g. welcome or sms/last_chance.")
    ],
    customer: Annotated[
        str, typer.Option("--customer", help="Render with this customer's real facts.")
    ],
    channel: Annotated[
        str | None, typer.Option(help="email or sms (default: guessed from the template).")
    ] = None,
    now: NowOption = None,
) -> None:
    """Render a template with a customer's real facts, exactly as dispatch would."""
    from engine.delivery.dispatch import DispatchConfig, unsubscribe_token
    from engine.delivery.sms_segments import segments
    from engine.delivery.templates import RenderedEmail
    from engine.errors import TemplateError

    application = _app()
    rules = _rules(application)
    moment = _now(application, now)
    if "/" in template:
        channel, template = template.split("/", 1)
    if channel is None:
        channel = "email" if template in application.templates.names("email") else "sms"
    with Session(application.db) as session:
        row = session.get(Customer, customer)
        if row is None:
            raise _fail(f"no customer with id {customer!r}")
        facts = subjects_for(session, [customer], rules.catalog, moment)[0].facts
    config = DispatchConfig(
        public_base_url=application.settings.public_base_url,
        secret_key=application.settings.secret_key.get_secret_value(),
    )
    token = unsubscribe_token(config.secret_key, customer, channel, "preview")
    context = {
        "customer": {
            "id": row.id,
            "first_name": row.first_name,
            "email": row.email,
            "phone": row.phone,
            "locale": row.locale,
            "timezone": row.timezone,
        },
        "facts": facts,
        "event": {},
        "unsubscribe_url": f"{config.public_base_url}/u/{token}",
        "brand": rules.policies.brand,
        "message_id": "preview",
    }
    try:
        rendered = application.templates.render(channel, template, context)
    except TemplateError as exc:
        raise _fail(str(exc)) from exc
    if isinstance(rendered, RenderedEmail):
        out.print(
            f"To: {row.email}\nSubject: {rendered.subject}\n\n{rendered.text}\n\n--- HTML ---\n{rendered.html}",
            markup=False,
        )
    else:
        counted = segments(rendered.body)
        out.print(
            f"To: {row.phone}\n{rendered.body}\n\n({counted.encoding}, {counted.characters} characters, {counted.segments} segment(s))",
            markup=False,
        )


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
) -> None:
    """Serve the ingest API, the provider webhooks and the support console."""
    import uvicorn

    from engine.web.app import create_app

    application = _app()
    _rules(application)
    uvicorn.run(create_app(application), host=host, port=port, log_level="info")


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

    application = _app()
    moment = _now(application, now)
    with Session(application.db) as session:
        try:
            cases = queue(session, status)
        except LifecycleError as exc:
            raise _fail(str(exc)) from exc
        records = [_case_record(c, moment) for c in cases]
    if json_output:
        _print_json(records)
        return
    table = Table(title=f"Escalations ({status or 'not resolved'})")
    for column in ("id", "customer", "status", "priority", "owner", "SLA due", "reason"):
        table.add_column(column)
    for r in records:
        due = r["sla_due_at"][:16] + (" OVERDUE" if r["overdue"] else "")
        table.add_row(
            str(r["id"]),
            r["customer"],
            r["status"],
            r["priority"],
            r["owner"] or "-",
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

    application = _app()
    moment = _now(application, now)
    with Session(application.db) as session:
        try:
            case = get_case(session, case_id)
        except LifecycleError as exc:
            raise _fail(str(exc)) from exc
        record = _case_record(case, moment)
        record["history"] = [
            {"at": n.at.isoformat(), "actor": n.actor, "action": n.action, "note": n.note}
            for n in history(session, case_id)
        ]
    if json_output:
        _print_json(record)
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

    application = _app()
    moment = _now(application, now)
    actor = getpass.getuser()
    with Session(application.db, expire_on_commit=False) as session:
        try:
            if action == "ack":
                case = escalations.acknowledge(session, case_id, actor, moment)
            elif action == "assign":
                lead = _rules(application).roster.find(args[0])
                if lead is None:
                    names = ", ".join(lead.name for lead in _rules(application).roster.leads)
                    raise _fail(f"no support lead named {args[0]!r}; the roster has: {names}")
                case = escalations.assign(session, case_id, lead.name, actor, moment)
            else:
                case = escalations.resolve(session, case_id, args[0], actor, moment)
            session.commit()
        except LifecycleError as exc:
            raise _fail(str(exc)) from exc
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


def main() -> None:  # pragma: no cover - console script entry
    app()

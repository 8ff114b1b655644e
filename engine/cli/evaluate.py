"""`lifecycle evaluate`: which playbooks and steps each customer matches.

Read-only in every mode: it shows what a tick would evaluate and changes nothing. Only a
tick consumes pending events (an event marked evaluated here would never start its
journey: no welcome for that sign-up, no case for that complaint).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

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
from engine.cli.rules import engine_line
from engine.errors import LifecycleError
from engine.evaluation.evaluators import make_evaluator
from engine.evaluation.model import Summary
from engine.playbooks.model import RuleSet
from engine.runners.shards import Shard, run_shard, run_shards, shards_of_everyone
from engine.wording import plural


@app.command()
def evaluate(
    customer: Annotated[
        list[str] | None, typer.Option("--customer", help="Only this customer (repeatable).")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Accepted for older scripts; evaluate never changes anything anyway.",
            hidden=True,
        ),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json")] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="durable (the reference evaluator where durable_rules is not installed) "
            "or reference"
        ),
    ] = "durable",
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (0: in this process).")
    ] = None,
    now: NowOption = None,
) -> None:
    """Evaluate customers against every playbook: which playbooks and steps each matches.

    Read-only: pending events stay pending for the next tick, which starts their journeys.
    """
    application = load_app()
    rules = rules_of(application)
    moment = moment_of(application, now)
    count = workers if workers is not None else (0 if customer else application.workers())
    started = time.perf_counter()
    db, size = application.db, application.settings.batch_size
    details: list[dict[str, Any]] = []
    try:
        if customer:
            with make_evaluator(rules.conditions(), engine) as evaluator:
                shard = Shard(ids=tuple(customer))
                result = run_shard(db, rules, evaluator, shard, moment, write=False, keep=True)
            details = [_detail(rules, e) for e in result.evaluations]
        else:
            shards = shards_of_everyone(db, size)
            result = run_shards(
                db, rules, shards, moment, write=False, workers=count, engine=engine
            )
    except LifecycleError as exc:
        raise fail(str(exc)) from exc
    summary = result.summary
    elapsed = time.perf_counter() - started
    _print_summary(rules, summary, details, elapsed, json_output)
    if not json_output:
        out.print(engine_line(engine), markup=False)  # prose: wrapped to the terminal


def _detail(rules: RuleSet, evaluation: Any) -> dict[str, Any]:
    subject = evaluation.subject
    return {
        "customer": subject.customer_id,
        "event": subject.event_id,
        "event_type": subject.event_type,
        "matches": [
            {
                "playbook": m.playbook,
                "steps": list(m.steps),
                "goal_met": m.goal,
                "no_longer_eligible": m.exited,
            }
            for m in evaluation.entered(rules)
        ],
    }


def _print_summary(
    rules: RuleSet,
    summary: Summary,
    details: list[dict[str, Any]],
    elapsed: float,
    json_output: bool,
) -> None:
    if json_output:
        payload = {
            "customers": summary.customers,
            "pending_events": summary.pending_events,
            "subjects": summary.subjects,
            "seconds": round(elapsed, 3),
            "playbooks": {
                pid: {
                    "matched": summary.entered.get(pid, 0),
                    # what "matched" counts: customers, or pending events of enter.on's type
                    "matched_in": "customers" if pb.enter_on is None else "events",
                    "goal_met": summary.goals.get(pid, 0),
                    "no_longer_eligible": summary.exited.get(pid, 0),
                    "steps": {s.id: summary.steps.get(pid, {}).get(s.id, 0) for s in pb.steps},
                }
                for pid, pb in sorted(rules.playbooks.items())
            },
        }
        if details:
            payload["details"] = details
        print_json(payload)
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
        title=f"Evaluation of {plural(summary.customers, 'customer')} and "
        f"{plural(summary.pending_events, 'pending event')}",
        box=box.SIMPLE_HEAD,
    )
    # Ids stay whole (never cut or folded); the counts in words wrap between words.
    table.add_column("playbook (stage)", no_wrap=True)
    table.add_column("matched")
    table.add_column("steps matched", no_wrap=True)
    table.add_column("goal\nmet", justify="right")
    table.add_column("not\neligible", justify="right")
    for pid, playbook in sorted(rules.playbooks.items()):
        steps = summary.steps.get(pid, {})
        matched = summary.entered.get(pid, 0)
        table.add_row(
            Text.assemble(pid, (f"\n({playbook.stage})", "dim")),
            plural(matched, "customer")
            if playbook.enter_on is None
            else plural(matched, f"{playbook.enter_on} event"),
            "\n".join(f"{s.id} {steps.get(s.id, 0)}" for s in playbook.steps),
            str(summary.goals.get(pid, 0)),
            str(summary.exited.get(pid, 0)),
        )
    out.print(table)
    rate = summary.subjects / elapsed if elapsed > 0 else 0.0
    out.print(
        f"{plural(summary.subjects, 'evaluation')} in {elapsed:.2f}s ({rate:,.0f}/s); "
        "nothing was changed",
        soft_wrap=True,
    )

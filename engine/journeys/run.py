"""One batch of journeys: read a snapshot, plan, write; a lost race is planned again alone.

Reading and planning run in a read transaction, writing in a short write transaction of
its own, so evaluators in several processes overlap everything but their writes (SQLite
takes one writer at a time). What moved in between is caught by the store's guards.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import Engine, bindparam, text

from engine.data.uow import reading, unit_of_work
from engine.evaluation.model import Evaluation
from engine.journeys.effects import Plan
from engine.journeys.plan import JourneyReport, changes_stage, has_work, plan, stage_plans
from engine.journeys.store import Span, load_context, load_journeys, write
from engine.playbooks.model import RuleSet


def advance_journeys(
    db: Engine,
    rules: RuleSet,
    evaluations: Sequence[Evaluation],
    now: datetime,
    span: Span | None = None,
) -> JourneyReport:
    """Move the journeys of a batch's customers on; returns what was done. ``span``
    (after, upto): the batch is every customer with an id in that range."""
    ids = list(dict.fromkeys(e.subject.customer_id for e in evaluations))
    report = JourneyReport(customers=len(ids))
    lost = _plan_and_write(db, rules, evaluations, ids, now, report, span)
    report.lost_races += len(lost)
    for customer_id in lost:
        # Another evaluator moved this customer first: its work stands; plan again from
        # what it left, without the events it consumed. Lost twice: the next tick looks.
        mine = [e for e in evaluations if e.subject.customer_id == customer_id]
        _plan_and_write(db, rules, _still_pending(db, mine), [customer_id], now, report)
    return report


def _plan_and_write(
    db: Engine,
    rules: RuleSet,
    evaluations: Sequence[Evaluation],
    ids: Sequence[str],
    now: datetime,
    report: JourneyReport,
    span: Span | None = None,
) -> list[str]:
    by_customer: dict[str, list[Evaluation]] = {customer_id: [] for customer_id in ids}
    for evaluation in evaluations:
        by_customer[evaluation.subject.customer_id].append(evaluation)
    with reading(db) as session:
        snapshots = load_journeys(session, ids, span, now - _goal_window(rules))
        busy = [c for c in ids if has_work(snapshots[c], by_customer[c], rules, now)]
        # A customer whose stage changes and whose journeys cannot move is planned for
        # the stage alone (stage_plans): no more snapshot, no journey planner.
        busy_set = set(busy)
        staged = [c for c in ids if c not in busy_set and changes_stage(by_customer[c])]
        if not busy and not staged:
            return []
        if busy:
            snapshots.update(load_context(session, snapshots, busy, rules, now))
    decided = plan(
        {c: snapshots[c] for c in busy},
        [e for c in busy for e in by_customer[c]],
        rules,
        now,
    )
    if staged:
        only = stage_plans([e for c in staged for e in by_customer[c]], rules, now)
        decided = Plan(decided.customers + only.customers)
    with unit_of_work(db) as session:
        written = write(session, decided, rules, now)
    applied = decided.without(written.lost)
    for customer in applied.customers:
        report.add(customer)
    return written.lost


def _goal_window(rules: RuleSet) -> timedelta:
    """The longest attribution window of the playbooks' goals."""
    return max((p.goal_within for p in rules.playbooks.values()), default=timedelta(0))


def _still_pending(db: Engine, evaluations: Sequence[Evaluation]) -> list[Evaluation]:
    """The evaluations without the events another evaluator has consumed meanwhile."""
    event_ids = [e.subject.event_id for e in evaluations if e.subject.event_id is not None]
    if not event_ids:
        return list(evaluations)
    statement = text("SELECT id FROM events WHERE id IN :ids AND evaluated_at IS NULL").bindparams(
        bindparam("ids", expanding=True)
    )
    with reading(db) as session:
        pending = set(session.execute(statement, {"ids": event_ids}).scalars())
    return [e for e in evaluations if e.subject.event_id is None or e.subject.event_id in pending]

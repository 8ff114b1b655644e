"""The periodic work, each a plain function of the app and ``now``: evaluate, dispatch, SLA.

The scheduler, ``lifecycle simulate``, the CLI and a queue worker all call these same
functions. Due work lives in SQL, so a tick that was missed is caught up by the next one.

Incremental evaluation looks at customers changed since the watermark, customers with
pending events and customers with a journey step due. The watermark is moved to
``now - OVERLAP`` rather than ``now``: a change committed while a tick runs can carry a
``changed_at`` older than the tick's ``now``, and re-evaluating a customer twice is
harmless (entries, steps and messages are all idempotent), missing one is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from engine.bootstrap import App
from engine.clock import as_utc
from engine.data.models import EngineState
from engine.data.moments import session_moment
from engine.data.uow import reading, unit_of_work
from engine.delivery.dispatch import DispatchConfig, Dispatcher, DispatchReport
from engine.errors import ConfigurationError
from engine.escalations.notifications import check_sla
from engine.journeys.plan import JourneyReport
from engine.journeys.store import due_customer_ids
from engine.playbooks.model import RuleSet
from engine.runners.shards import run_shards, shards_of, shards_of_everyone
from engine.runners.tasks import shard_payload
from engine.runners.tickbook import LAST_TICK, PlannedTask, plan_tick

OVERLAP = timedelta(minutes=5)
WATERMARK = "evaluation_watermark"
IN_PROCESS_BELOW = 50_000  # fewer customers: evaluating in-process beats starting workers


@dataclass
class TickReport:
    started_at: datetime
    customers: int = 0
    journeys: JourneyReport = field(default_factory=JourneyReport)
    full: bool = False


def read_state(session: Session, name: str) -> str | None:
    row = session.get(EngineState, name)
    return row.value if row else None


def write_state(
    session: Session, name: str, value: str, now: datetime, *, forward_only: bool = False
) -> None:
    """Set a named value: one upsert, so two first writers of a name both succeed (the
    evaluation and full-sweep jobs of a fresh `lifecycle run` do just that).
    ``forward_only`` keeps the greater of the old and the new value (ISO times compare
    as text): a long full sweep that finishes after a later incremental tick must not
    move the watermark back."""
    table = EngineState.__table__  # type: ignore[attr-defined]
    dialect = session.get_bind().dialect.name
    statement: sqlite.Insert | postgresql.Insert
    if dialect == "sqlite":
        statement = sqlite.insert(table)
    elif dialect == "postgresql":
        statement = postgresql.insert(table)
    else:
        raise ConfigurationError("LIFECYCLE_DATABASE_URL", f"{dialect} is not supported")
    statement = statement.values(name=name, value=value, updated_at=now)
    excluded = statement.excluded
    new_value: Any = excluded.value
    if forward_only:
        new_value = case((excluded.value > table.c.value, excluded.value), else_=table.c.value)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["name"],
            set_={"value": new_value, "updated_at": excluded.updated_at},
        )
    )


def evaluation_tick(
    app: App,
    now: datetime,
    *,
    full: bool = False,
    workers: int | None = None,
    rules: RuleSet | None = None,
) -> TickReport:
    """Evaluate who needs it (or everyone, ``full``) and move their journeys on."""
    rules = rules or app.rules
    report = TickReport(started_at=now, full=full)
    with reading(app.db) as session:
        mark = read_state(session, WATERMARK)
        since = as_utc(datetime.fromisoformat(mark)) if mark else None
        full = full or since is None  # the first tick ever looks at everyone
        report.full = full
        ids = None if full else due_customer_ids(session, now, since)
    if ids is not None and not ids:
        _advance_watermark(app, now)
        return report
    if workers is None:
        # Starting worker processes costs about a second; an incremental tick's
        # evaluation is a small part of its time (facts and journeys dominate), so only
        # large runs fan out.
        small = ids is not None and len(ids) < IN_PROCESS_BELOW
        workers = 0 if small else app.workers()
    size = app.settings.batch_size
    shards = shards_of_everyone(app.db, size) if ids is None else shards_of(ids, size)
    result = run_shards(
        app.db, rules, shards, now, write=True, workers=workers, engine=app.settings.engine
    )
    report.journeys = result.journeys
    report.customers = result.customers
    _advance_watermark(app, now)
    return report


def _advance_watermark(app: App, now: datetime) -> None:
    with unit_of_work(app.db) as session:
        write_state(session, WATERMARK, (now - OVERLAP).isoformat(), now, forward_only=True)


def dispatch_config(app: App) -> DispatchConfig:
    settings = app.settings
    return DispatchConfig(
        lease=timedelta(seconds=settings.dispatch_lease_seconds),
        send_threads=settings.dispatch_send_threads,
        settle_grace=timedelta(seconds=settings.dispatch_settle_grace_seconds),
        settle_retry=timedelta(seconds=settings.dispatch_settle_retry_seconds),
        settle_per_tick=settings.dispatch_settle_per_tick,
        public_base_url=settings.public_base_url,
        unsubscribe_mailto=settings.unsubscribe_mailto,
        secret_key=settings.secret_key.get_secret_value(),
    )


def dispatch_tick(app: App, now: datetime, *, rules: RuleSet | None = None) -> DispatchReport:
    dispatcher = Dispatcher(
        app.db,
        rules or app.rules,
        app.templates,
        app.channels,
        dispatch_config(app),
        throttle=app.throttle,
    )
    try:
        return dispatcher.run_once(now)
    finally:
        dispatcher.close()


def sla_tick(app: App, now: datetime, *, rules: RuleSet | None = None) -> int:
    """Notify one tier up for cases past their SLA; returns how many notifications."""
    with unit_of_work(app.db) as session:
        queued = check_sla(session, rules or app.rules, now)
    return len(queued)


def watermark_writer(now: datetime) -> Any:
    """What the tick book calls, inside the transaction that completes a tick, to move the
    evaluation watermark (forward only) to the value the tick was planned with."""

    def write(session: Session, value: str) -> None:
        write_state(session, WATERMARK, value, now, forward_only=True)

    return write


def record_tick(app: App, kind: str, now: datetime) -> None:
    """Remember when a tick of this kind last ran (``lifecycle status`` shows it)."""
    with unit_of_work(app.db) as session:
        write_state(session, LAST_TICK + kind, now.isoformat(), now)


# ── the real-time path ───────────────────────────────────────────────────────────

REALTIME_LIMIT = 2000  # customers a real-time tick takes; more wait for the next one


def pending_customer_ids(session: Session, limit: int = REALTIME_LIMIT) -> list[str]:
    """Customers with events not yet evaluated, oldest event first (the partial index of
    pending events answers it)."""
    statement = text(
        "SELECT customer_id FROM events WHERE evaluated_at IS NULL "
        "GROUP BY customer_id ORDER BY MIN(received_at) LIMIT :limit"
    )
    return list(session.execute(statement, {"limit": limit}).scalars())


def realtime_tick(app: App, now: datetime, *, rules: RuleSet | None = None) -> TickReport:
    """Evaluate the customers whose events arrived since they were last evaluated, through
    the same shards and planner as every tick, in this process; the watermark is left to
    the evaluation ticks (they also look at changed customers and due steps)."""
    rules = rules or app.rules
    report = TickReport(started_at=now)
    with reading(app.db) as session:
        ids = pending_customer_ids(session)
    if not ids:
        return report
    shards = shards_of(ids, app.settings.batch_size)
    result = run_shards(
        app.db, rules, shards, now, write=True, workers=0, engine=app.settings.engine
    )
    report.journeys = result.journeys
    report.customers = result.customers
    return report


# ── planning for the distributed runner: the tasks of a tick ─────────────────────

REALTIME_SHARD = 25  # customers per real-time task: small, so every worker thread shares a burst
DISPATCH_TASKS_MAX = 16  # dispatch batches enqueued per dispatch tick


def plan_evaluation(
    app: App, now: datetime, *, full: bool, rules: RuleSet, planned_at: datetime
) -> list[PlannedTask]:
    """Record an evaluation tick and its shards; the watermark moves when the last shard
    is done (engine.runners.tickbook), or now when there is nothing to evaluate."""
    with reading(app.db) as session:
        mark = read_state(session, WATERMARK)
        since = as_utc(datetime.fromisoformat(mark)) if mark else None
        full = full or since is None
        ids = None if full else due_customer_ids(session, now, since)
    watermark = (now - OVERLAP).isoformat()
    if ids is not None and not ids:
        _advance_watermark(app, now)
        return []
    size = app.settings.batch_size
    shards = shards_of_everyone(app.db, size) if ids is None else shards_of(ids, size)
    payloads = [shard_payload(shard) for shard in shards]
    kind = "full_sweep" if full else "evaluate"
    return plan_tick(app.db, kind, now, rules.version, payloads, planned_at, watermark=watermark)


def plan_realtime(
    app: App,
    now: datetime,
    *,
    rules: RuleSet,
    planned_at: datetime,
    in_flight: set[str] | frozenset[str] = frozenset(),
) -> list[PlannedTask]:
    """A real-time tick for the customers with pending events, but those ``in_flight``
    (in a real-time task not done yet): a busy worker delays only its own task's
    customers, never the next second's."""
    with reading(app.db) as session:
        ids = [i for i in pending_customer_ids(session) if i not in in_flight]
    if not ids:
        return []
    payloads = [shard_payload(s) for s in shards_of(ids, REALTIME_SHARD)]
    return plan_tick(app.db, "realtime", now, rules.version, payloads, planned_at)


def plan_dispatch(
    app: App, now: datetime, *, rules: RuleSet, planned_at: datetime
) -> list[PlannedTask]:
    """Dispatch batches for what is due: one at least (it also recovers expired leases
    and settles ambiguous messages), one per batch due, at most DISPATCH_TASKS_MAX."""
    batch = DispatchConfig().batch_size
    with reading(app.db) as session:
        due = session.execute(
            text("SELECT COUNT(*) FROM messages WHERE status = 'queued' AND due_at <= :now"),
            {"now": session_moment(session, now)},
        ).scalar_one()
    count = max(1, min(DISPATCH_TASKS_MAX, -(-int(due) // batch)))
    payloads = [{"limit": batch} for _ in range(count)]
    return plan_tick(app.db, "dispatch", now, rules.version, payloads, planned_at)


def plan_sla(app: App, now: datetime, *, rules: RuleSet, planned_at: datetime) -> list[PlannedTask]:
    return plan_tick(app.db, "sla", now, rules.version, [{}], planned_at)

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

from sqlalchemy import case
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from engine.bootstrap import App
from engine.clock import as_utc
from engine.data.models import EngineState
from engine.data.uow import reading, unit_of_work
from engine.delivery.dispatch import DispatchConfig, Dispatcher, DispatchReport
from engine.errors import ConfigurationError
from engine.escalations.notifications import check_sla
from engine.journeys.plan import JourneyReport
from engine.journeys.store import due_customer_ids
from engine.playbooks.model import RuleSet
from engine.runners.shards import run_shards, shards_of, shards_of_everyone

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
        app.db, rules or app.rules, app.templates, app.channels, dispatch_config(app)
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

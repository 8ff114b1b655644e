"""The runner interface: what the scheduler's jobs call, and two implementations.

- ``InlineRunner`` does the work where it is called (SQLite, tests, ``simulate``, the
  embedded default): the tick functions of engine.runners.ticks.
- ``DramatiqRunner`` (engine.runners.distributed) only plans: it records each tick and
  its tasks in the tick book and enqueues them; ``lifecycle worker`` processes run them
  through engine.runners.tasks, which call the same shard, dispatch and SLA functions.

Each method gets the tick's ``now`` and returns a line for the log.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from engine.bootstrap import App
from engine.playbooks.model import RuleSet
from engine.runners.ticks import (
    dispatch_tick,
    evaluation_tick,
    realtime_tick,
    record_tick,
    sla_tick,
)


class Runner(Protocol):
    """Runs (or has run) the periodic work of one tick."""

    name: str

    def evaluate(self, now: datetime, rules: RuleSet, *, full: bool) -> str:
        """An incremental evaluation tick, or the full sweep (``full``)."""
        ...

    def realtime(self, now: datetime, rules: RuleSet) -> str | None:
        """Evaluate newly arrived events; None when there were none (nothing to log)."""
        ...

    def dispatch(self, now: datetime, rules: RuleSet) -> str | None: ...

    def sla(self, now: datetime, rules: RuleSet) -> str | None: ...

    def maintain(self, now: datetime) -> str | None:
        """Keep the runner's own books (the distributed runner re-enqueues lost tasks)."""
        ...


class InlineRunner:
    """Everything in this process, tick by tick."""

    name = "inline"

    def __init__(self, app: App) -> None:
        self.app = app

    def evaluate(self, now: datetime, rules: RuleSet, *, full: bool) -> str:
        report = evaluation_tick(self.app, now, full=full, rules=rules)
        record_tick(self.app, "full_sweep" if full else "evaluate", now)
        j = report.journeys
        what = "full sweep" if full else "evaluate"
        return (
            f"{what}: {report.customers} customers, {j.total('enrolled')} enrolled, "
            f"{j.total('queued')} queued"
        )

    def realtime(self, now: datetime, rules: RuleSet) -> str | None:
        report = realtime_tick(self.app, now, rules=rules)
        if not report.customers:
            return None
        record_tick(self.app, "realtime", now)
        j = report.journeys
        return (
            f"real-time: {report.customers} customers with new events, "
            f"{j.total('enrolled')} enrolled, {j.total('queued')} queued"
        )

    def dispatch(self, now: datetime, rules: RuleSet) -> str | None:
        report = dispatch_tick(self.app, now, rules=rules)
        record_tick(self.app, "dispatch", now)
        if not report.claimed:
            return None
        return (
            f"dispatch: {report.claimed} claimed, {report.total_sent} sent, "
            f"{report.retried} retried, {report.failed} failed"
        )

    def sla(self, now: datetime, rules: RuleSet) -> str | None:
        count = sla_tick(self.app, now, rules=rules)
        record_tick(self.app, "sla", now)
        return f"SLA: {count} breach notification(s) queued" if count else None

    def maintain(self, now: datetime) -> str | None:
        return None

"""The scheduler: APScheduler 3.x ticks that drive evaluation, dispatch and SLA checks.

Due work lives in SQL, never in per-customer scheduler jobs, so the jobs here are a
handful of fixed intervals held in memory. ``coalesce=True`` and an unlimited
``misfire_grace_time`` mean that after downtime each job runs once, late, and that one
run catches up everything (the tick functions work from the database's state, not from
how many ticks were missed). ``max_instances=1``: a slow tick is never overlapped by the
next one of the same kind.

Rule files are reloaded every ``LIFECYCLE_RULES_RELOAD_S`` seconds (30) through
engine.runners.reloading: a good change is logged with its version, a broken one with its
problems, and the last good rules stay in force. Housekeeping (engine.runners.housekeeping: old webhook
receipts, sessions and sign-in attempts) runs every hour.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType

from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from engine.bootstrap import App
from engine.runners.housekeeping import housekeeping_tick
from engine.runners.reloading import RulesReloader
from engine.runners.ticks import dispatch_tick, evaluation_tick, sla_tick

log = logging.getLogger("lifecycle.scheduler")


@dataclass(frozen=True)
class Intervals:
    evaluate: timedelta = timedelta(minutes=1)
    full_sweep: timedelta = timedelta(hours=6)
    dispatch: timedelta = timedelta(seconds=10)
    sla: timedelta = timedelta(minutes=1)
    rules_reload: timedelta = timedelta(seconds=30)
    housekeeping: timedelta = timedelta(hours=1)

    @classmethod
    def of(cls, app: App) -> Intervals:
        """The defaults, with the rules reload interval the settings ask for."""
        return cls(rules_reload=timedelta(seconds=app.settings.rules_reload_s))


class LifecycleScheduler:
    """Owns the APScheduler instance and the jobs; ``run_forever`` blocks until a signal."""

    def __init__(self, app: App, intervals: Intervals | None = None) -> None:
        self.app = app
        self.intervals = intervals or Intervals.of(app)
        self.reloader = RulesReloader(app, log)
        self.stopped = threading.Event()
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone="UTC",
        )
        self.scheduler.add_listener(self._on_error, EVENT_JOB_ERROR)
        self._add_jobs()

    def _add_jobs(self) -> None:
        i = self.intervals
        add = self.scheduler.add_job
        add(
            self.evaluate,
            "interval",
            seconds=i.evaluate.total_seconds(),
            id="evaluate",
            next_run_time=_soon(),
        )
        add(
            self.full_sweep,
            "interval",
            seconds=i.full_sweep.total_seconds(),
            id="full_sweep",
            next_run_time=_soon(),
        )
        add(
            self.dispatch,
            "interval",
            seconds=i.dispatch.total_seconds(),
            id="dispatch",
            next_run_time=_soon(),
        )
        add(self.sla, "interval", seconds=i.sla.total_seconds(), id="sla", next_run_time=_soon())
        add(
            self.reload_rules, "interval", seconds=i.rules_reload.total_seconds(), id="rules_reload"
        )
        add(
            self.housekeeping,
            "interval",
            seconds=i.housekeeping.total_seconds(),
            id="housekeeping",
            next_run_time=_soon(),
        )

    # Each job reads the clock once and hands ``now`` down.
    def evaluate(self) -> None:
        report = evaluation_tick(self.app, self.app.clock())
        log.info(
            "evaluate: %d customers, %d enrolled, %d queued",
            report.customers,
            report.journeys.total("enrolled"),
            report.journeys.total("queued"),
        )

    def full_sweep(self) -> None:
        report = evaluation_tick(self.app, self.app.clock(), full=True)
        log.info("full sweep: %d customers", report.customers)

    def dispatch(self) -> None:
        report = dispatch_tick(self.app, self.app.clock())
        if report.claimed:
            log.info(
                "dispatch: %d claimed, %d sent, %d retried, %d failed",
                report.claimed,
                report.total_sent,
                report.retried,
                report.failed,
            )

    def sla(self) -> None:
        count = sla_tick(self.app, self.app.clock())
        if count:
            log.warning("SLA: %d breach notification(s) queued", count)

    def housekeeping(self) -> None:
        report = housekeeping_tick(self.app, self.app.clock())
        if report.receipts or report.sessions or report.attempts:
            log.info(
                "housekeeping: pruned %d webhook receipts, %d sessions, %d sign-in attempts",
                report.receipts,
                report.sessions,
                report.attempts,
            )

    def reload_rules(self) -> None:
        self.reloader.reload()

    def _on_error(self, event: JobExecutionEvent) -> None:
        # A failed tick is loud and leaves its work in SQL; the next tick catches up.
        log.error("job %s failed: %s", event.job_id, event.exception, exc_info=event.exception)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.stopped.set()

    def run_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then let running ticks finish and stop."""

        def _signal(signum: int, _frame: FrameType | None) -> None:
            log.info(
                "received %s: stopping after the running ticks finish", signal.Signals(signum).name
            )
            self.stopped.set()

        previous = {s: signal.signal(s, _signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            self.stopped.wait()
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _soon():  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return datetime.now(UTC) + timedelta(seconds=1)

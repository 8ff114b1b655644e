"""The scheduler: APScheduler 3.x ticks that drive evaluation, dispatch and SLA checks.

Due work lives in SQL, never in per-customer scheduler jobs, so the jobs here are a
handful of fixed intervals held in memory. ``coalesce=True`` and an unlimited
``misfire_grace_time`` mean that after downtime each job runs once, late, and that one
run catches up everything (the tick functions work from the database's state, not from
how many ticks were missed). ``max_instances=1``: a slow tick is never overlapped by the
next one of the same kind.

The jobs call a runner (engine.runners.runner): the inline runner does the work in this
process; the dramatiq runner plans each tick into the tick book and enqueues its tasks
for `lifecycle worker` processes. With the dramatiq runner the scheduler first takes a
PostgreSQL advisory lock (engine.runners.leader): a second scheduler waits, and takes
over within seconds of the first one's death; one that loses its lock's session stops.

A real-time job every ``LIFECYCLE_REALTIME_S`` seconds (1) evaluates the customers whose
events arrived since: a welcome email is queued seconds after the sign-up, not at the
next minute's tick (which, with the full sweep, stays the safety net).

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
from engine.runners.leader import Leadership
from engine.runners.reloading import RulesReloader
from engine.runners.runner import InlineRunner, Runner

log = logging.getLogger("lifecycle.scheduler")


@dataclass(frozen=True)
class Intervals:
    evaluate: timedelta = timedelta(minutes=1)
    full_sweep: timedelta = timedelta(hours=6)
    dispatch: timedelta = timedelta(seconds=10)
    sla: timedelta = timedelta(minutes=1)
    rules_reload: timedelta = timedelta(seconds=30)
    housekeeping: timedelta = timedelta(hours=1)
    realtime: timedelta = timedelta(seconds=1)
    maintain: timedelta = timedelta(seconds=30)  # the distributed runner's tick book
    leadership: timedelta = timedelta(seconds=2)  # the scheduler lock's session checked

    @classmethod
    def of(cls, app: App) -> Intervals:
        """The defaults, with the intervals the settings ask for."""
        return cls(
            rules_reload=timedelta(seconds=app.settings.rules_reload_s),
            realtime=timedelta(seconds=app.settings.realtime_s),
        )


class LifecycleScheduler:
    """Owns the APScheduler instance and the jobs; ``run_forever`` blocks until a signal."""

    def __init__(
        self,
        app: App,
        intervals: Intervals | None = None,
        *,
        runner: Runner | None = None,
        leadership: Leadership | None = None,
    ) -> None:
        self.app = app
        self.intervals = intervals or Intervals.of(app)
        self.runner: Runner = runner or InlineRunner(app)
        self.leadership = leadership
        self.lost_leadership = False
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
        add(self.realtime, "interval", seconds=i.realtime.total_seconds(), id="realtime")
        add(self.maintain, "interval", seconds=i.maintain.total_seconds(), id="maintain")
        if self.leadership is not None:
            add(
                self.check_leadership,
                "interval",
                seconds=i.leadership.total_seconds(),
                id="leadership",
            )

    # Each job reads the clock once and hands ``now`` down.
    def evaluate(self) -> None:
        log.info("%s", self.runner.evaluate(self.app.clock(), self.app.rules, full=False))

    def full_sweep(self) -> None:
        log.info("%s", self.runner.evaluate(self.app.clock(), self.app.rules, full=True))

    def realtime(self) -> None:
        line = self.runner.realtime(self.app.clock(), self.app.rules)
        if line:
            log.info("%s", line)

    def dispatch(self) -> None:
        line = self.runner.dispatch(self.app.clock(), self.app.rules)
        if line:
            log.info("%s", line)

    def sla(self) -> None:
        line = self.runner.sla(self.app.clock(), self.app.rules)
        if line:
            log.warning("%s", line)

    def maintain(self) -> None:
        line = self.runner.maintain(self.app.clock())
        if line:
            log.info("%s", line)

    def check_leadership(self) -> None:
        """A lock whose session is gone may be another scheduler's by now: stop planning."""
        if self.leadership is not None and not self.leadership.alive():
            log.error("the scheduler lock was lost: stopping (a standby takes over)")
            self.lost_leadership = True
            self.stopped.set()

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
            if self.leadership is not None and not self.leadership.acquire(self.stopped):
                return  # stopped while waiting for the lock
            self.start()
            self.stopped.wait()
        finally:
            self.stop()
            if self.leadership is not None:
                self.leadership.release()
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _soon():  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return datetime.now(UTC) + timedelta(seconds=1)

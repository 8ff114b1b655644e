"""The tasks of a tick, as plain functions: an evaluation shard, a dispatch batch, an SLA
check. The Dramatiq actors (engine.runners.distributed) call ``run_task`` and nothing
else, and the work inside is the inline runner's: ``run_shard``, ``Dispatcher.run_once``,
``check_sla``.

``TaskContext`` is what a worker process builds once: the app (database engine, channels,
templates), the evaluators (one per thread and rules version, built on first use), and
the rules. A task names the rules version it was planned with; a worker runs it with
exactly those rules or refuses it (``RulesVersionMismatch``), after reading its rule
files once more in case they changed since it started.

Each task is started and finished through the tick book (engine.runners.tickbook): a
task already done is skipped, a task that ran before (its worker died) runs again and
is counted once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from engine.bootstrap import App
from engine.data.uow import unit_of_work
from engine.delivery.dispatch import Dispatcher
from engine.errors import RulesInvalid, RulesVersionMismatch
from engine.escalations.notifications import check_sla
from engine.evaluation.evaluators import Evaluator, make_evaluator
from engine.playbooks.model import RuleSet
from engine.runners.shards import Shard, run_shard
from engine.runners.tickbook import PlannedTask, finish_task, start_task

log = logging.getLogger("lifecycle.tasks")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class TaskContext:
    """Built once per worker process; shared by its threads."""

    app: App
    worker: str = field(default_factory=worker_name)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _local: threading.local = field(default_factory=threading.local)

    def rules_for(self, task: str, version: str) -> RuleSet:
        """The rules of ``version``, or RulesVersionMismatch: this worker's rules, read
        again from its files once when they differ (a deploy may have changed them)."""
        with self._lock:
            rules = self.app.rules
            if rules.version == version:
                return rules
            try:
                rules = self.app.reload_rules()
            except RulesInvalid as exc:
                log.error("rule files have problems; keeping version %s:\n%s", rules.version, exc)
            if rules.version == version:
                log.info("rules reloaded for %s: version %s", task, version)
                return rules
            raise RulesVersionMismatch(task, version, rules.version, self.worker)

    def evaluator(self, rules: RuleSet) -> Evaluator:
        """This thread's evaluator for these rules (durable_rules handles are not shared
        between threads); built once per rules version, the previous one closed."""
        cached: tuple[str, Evaluator] | None = getattr(self._local, "evaluator", None)
        if cached is not None and cached[0] == rules.version:
            return cached[1]
        if cached is not None:
            cached[1].close()
        evaluator = make_evaluator(rules.conditions(), self.app.settings.engine)
        self._local.evaluator = (rules.version, evaluator)
        return evaluator

    def close(self) -> None:
        cached = getattr(self._local, "evaluator", None)
        if cached is not None:
            cached[1].close()


# ── payloads: what crosses the queue (JSON) ───────────────────────────────────────


def shard_payload(shard: Shard) -> dict[str, Any]:
    if shard.ids is not None:
        return {"ids": list(shard.ids)}
    return {"after": shard.after, "upto": shard.upto}


def shard_of(payload: dict[str, Any]) -> Shard:
    if "ids" in payload:
        return Shard(ids=tuple(str(i) for i in payload["ids"]))
    return Shard(after=payload.get("after"), upto=payload.get("upto"))


# ── the handlers, one per kind of task ───────────────────────────────────────────


def _evaluate(ctx: TaskContext, task: PlannedTask, rules: RuleSet) -> dict[str, Any]:
    shard = shard_of(task.payload)
    result = run_shard(ctx.app.db, rules, ctx.evaluator(rules), shard, task.now, write=True)
    j = result.journeys
    return {
        "customers": result.customers,
        "enrolled": j.total("enrolled"),
        "queued": j.total("queued"),
        "lost_races": j.lost_races,
    }


def _dispatch(ctx: TaskContext, task: PlannedTask, rules: RuleSet) -> dict[str, Any]:
    from engine.runners.ticks import dispatch_config

    app = ctx.app
    dispatcher = Dispatcher(
        app.db,
        rules,
        app.templates,
        app.channels,
        dispatch_config(app),
        worker_id=ctx.worker,
        throttle=app.throttle,
    )
    try:
        # The tick's moment, like every tick function: due rows, quiet hours and backoff
        # are judged at it (leases keep to their own clock, engine.delivery.lease).
        report = dispatcher.run_once(task.now, limit=int(task.payload.get("limit", 200)))
    finally:
        dispatcher.close()
    return {
        "claimed": report.claimed,
        "sent": report.total_sent,
        "retried": report.retried,
        "failed": report.failed,
        "requeued_after_crash": report.requeued_after_crash,
        "marked_ambiguous": report.marked_ambiguous,
        "settled": report.settled,
    }


def _sla(ctx: TaskContext, task: PlannedTask, rules: RuleSet) -> dict[str, Any]:
    with unit_of_work(ctx.app.db) as session:
        queued = check_sla(session, rules, task.now)
    return {"notified": len(queued)}


Handler = Callable[[TaskContext, PlannedTask, RuleSet], dict[str, Any]]
HANDLERS: dict[str, Handler] = {
    "evaluate": _evaluate,
    "full_sweep": _evaluate,
    "realtime": _evaluate,
    "dispatch": _dispatch,
    "sla": _sla,
}


@dataclass(frozen=True)
class TaskOutcome:
    ran: bool  # False: it was done already (a redelivery), nothing ran
    completed_tick: bool = False
    result: dict[str, Any] = field(default_factory=dict)


def run_task(ctx: TaskContext, task: PlannedTask) -> TaskOutcome:
    """Run one task of a tick, once: refuse other rules, skip it when done, count it."""
    from engine.runners.ticks import watermark_writer

    label = f"{task.kind} task {task.tick_id[:8]}/{task.number}"
    rules = ctx.rules_for(label, task.rules_version)
    db = ctx.app.db
    if not start_task(db, task.tick_id, task.number, ctx.worker):
        log.info("%s: done already (delivered again); skipped", label)
        return TaskOutcome(ran=False)
    result = HANDLERS[task.kind](ctx, task, rules)
    finished = finish_task(
        db,
        task.tick_id,
        task.number,
        result,
        ctx.app.clock(),
        write_watermark=watermark_writer(ctx.app.clock()),
    )
    return TaskOutcome(ran=True, completed_tick=finished.completed_tick, result=result)


def task_message(task: PlannedTask) -> dict[str, Any]:
    """A task as the JSON its actor is sent."""
    return {
        "tick_id": task.tick_id,
        "number": task.number,
        "kind": task.kind,
        "now": task.now.isoformat(),
        "rules_version": task.rules_version,
        "payload": task.payload,
    }


def task_from_message(message: dict[str, Any]) -> PlannedTask:
    return PlannedTask(
        tick_id=str(message["tick_id"]),
        number=int(message["number"]),
        kind=str(message["kind"]),
        now=datetime.fromisoformat(str(message["now"])),
        rules_version=str(message["rules_version"]),
        payload=dict(message["payload"]),
    )


TIME_LIMITS = {  # how long a task of each kind may run before Dramatiq stops it
    "evaluate": timedelta(minutes=20),
    "full_sweep": timedelta(minutes=20),
    "realtime": timedelta(minutes=5),
    "dispatch": timedelta(minutes=20),
    "sla": timedelta(minutes=5),
}

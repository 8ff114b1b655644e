"""The Dramatiq runner: the scheduler plans and enqueues, ``lifecycle worker`` runs tasks.

Brokers are Dramatiq's: RabbitMQ (``amqp://``) or Redis (``redis://``) from
LIFECYCLE_BROKER_URL, and the ``StubBroker`` in unit tests. Retries with backoff, time
limits and acknowledgements are Dramatiq's too: a message is acknowledged only after its
actor returns, so a worker killed mid-task leaves it to be delivered again.

Four actors, each on its own queue and each a one-line call of ``run_task`` (engine.
runners.tasks): real-time evaluation (the highest priority: a worker takes those first),
dispatch batches, SLA checks, and evaluation shards (incremental ticks and full sweeps).
Every message is a task of the tick book (engine.runners.tickbook), which is where its
fate is kept: the queue may deliver it twice, the database counts it once.

Nothing here connects at import time; the broker is built by ``make_broker``, which the
composition root (engine.bootstrap) and the tests call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import dramatiq
from dramatiq.brokers.stub import StubBroker

from engine.bootstrap import App
from engine.errors import BrokerUnreachable, ConfigurationError
from engine.playbooks.model import RuleSet
from engine.runners.tasks import TIME_LIMITS, TaskContext, run_task, task_from_message, task_message
from engine.runners.tickbook import (
    PlannedTask,
    complete_finished,
    heartbeat,
    ids_in_flight,
    mark_enqueued,
    open_tick,
    prune_ticks,
    stale_after,
    stale_tasks,
)
from engine.runners.ticks import (
    plan_dispatch,
    plan_evaluation,
    plan_realtime,
    plan_sla,
    record_tick,
    watermark_writer,
)

log = logging.getLogger("lifecycle.distributed")


@dataclass(frozen=True)
class Route:
    actor: str
    queue: str
    priority: int  # lower runs first when a worker holds several


def routes(prefix: str = "lifecycle") -> dict[str, Route]:
    """Where each kind of task goes: its actor, its queue (``<prefix>-...``), its priority."""
    return {
        "realtime": Route("lifecycle_realtime", f"{prefix}-realtime", 0),
        "dispatch": Route("lifecycle_dispatch", f"{prefix}-dispatch", 10),
        "sla": Route("lifecycle_sla", f"{prefix}-sla", 20),
        "evaluate": Route("lifecycle_evaluate", f"{prefix}-evaluate", 50),
        "full_sweep": Route("lifecycle_evaluate", f"{prefix}-evaluate", 50),
    }


def queues(prefix: str = "lifecycle") -> tuple[str, ...]:
    return tuple(dict.fromkeys(route.queue for route in routes(prefix).values()))


MAX_RETRIES = 20  # Dramatiq's exponential backoff: the last retry comes hours later
REALTIME_STALE = timedelta(seconds=30)  # a real-time task not done by then: plan its ids again


def make_broker(url: str | None) -> dramatiq.Broker:
    """RabbitMQ for ``amqp://``, Redis for ``redis://``, the StubBroker for None."""
    if url is None:
        return StubBroker()
    if url.startswith(("amqp://", "amqps://")):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        # Publisher confirms: enqueue returns once RabbitMQ has the message.
        return RabbitmqBroker(url=url, confirm_delivery=True)
    if url.startswith(("redis://", "rediss://")):
        from dramatiq.brokers.redis import RedisBroker

        return RedisBroker(url=url)
    raise ConfigurationError("LIFECYCLE_BROKER_URL", f"{url!r} is neither amqp:// nor redis://")


def probe_broker(broker: dramatiq.Broker, url: str) -> None:
    """Raise BrokerUnreachable unless the broker answers: RabbitMQ opens a connection,
    Redis answers PING (the StubBroker always answers). ``url`` is shown without its
    password."""
    if isinstance(broker, StubBroker):
        return
    # pika logs each failed attempt with a traceback; the failure is told once, below.
    pika = logging.getLogger("pika")
    level = pika.level
    pika.setLevel(logging.CRITICAL)
    try:
        if hasattr(broker, "get_queue_message_counts"):  # RabbitMQ
            connection = broker.connection  # type: ignore[attr-defined]  # opens it, or raises
            connection.process_data_events(0)  # it answers, not only accepted the socket
        else:  # Redis
            broker.client.ping()  # type: ignore[attr-defined]
    except Exception as exc:  # pika and redis raise their own trees
        raise BrokerUnreachable(_without_password(url), str(exc) or type(exc).__name__) from exc
    finally:
        pika.setLevel(level)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Actors:
    """The actors, declared on ``broker``. A scheduler declares them to send; a worker
    declares them with its ``context`` to run them."""

    def __init__(
        self,
        broker: dramatiq.Broker,
        context: Callable[[], TaskContext] | None,
        prefix: str = "lifecycle",
    ) -> None:
        self.broker = broker
        self._context = context
        self.routes = routes(prefix)
        self.queues = queues(prefix)
        self.by_name: dict[str, dramatiq.Actor[Any, Any]] = {}
        for kind, route in self.routes.items():
            if route.actor in self.by_name:
                continue
            declare = dramatiq.actor(
                broker=broker,
                actor_name=route.actor,
                queue_name=route.queue,
                priority=route.priority,
                time_limit=int(TIME_LIMITS[kind].total_seconds() * 1000),
                max_retries=MAX_RETRIES,
            )
            self.by_name[route.actor] = declare(self._runner())

    def _runner(self) -> Callable[[dict[str, Any]], None]:
        def run(message: dict[str, Any]) -> None:
            if self._context is None:
                raise ConfigurationError(
                    "LIFECYCLE_RUNNER", "this process only enqueues; run `lifecycle worker`"
                )
            outcome = run_task(self._context(), task_from_message(message))
            if outcome.ran:
                log.info(
                    "%s task %s/%s done: %s%s",
                    message["kind"],
                    str(message["tick_id"])[:8],
                    message["number"],
                    outcome.result,
                    "; tick complete" if outcome.completed_tick else "",
                )

        return run

    def send(self, tasks: Sequence[PlannedTask]) -> None:
        for task in tasks:
            self.by_name[self.routes[task.kind].actor].send(task_message(task))


class DramatiqRunner:
    """Plans ticks into the tick book and enqueues their tasks; runs nothing itself."""

    name = "dramatiq"

    def __init__(self, app: App, actors: Actors) -> None:
        self.app = app
        self.actors = actors

    def _busy(self, kinds: tuple[str, ...], for_: timedelta) -> bool:
        return open_tick(self.app.db, kinds, self.app.clock() - for_) is not None

    def _enqueue(self, kind: str, now: datetime, tasks: list[PlannedTask]) -> None:
        self.actors.send(tasks)
        record_tick(self.app, kind, now)

    def evaluate(self, now: datetime, rules: RuleSet, *, full: bool) -> str:
        kind = "full_sweep" if full else "evaluate"
        # An incremental tick waits for any evaluation in progress (a full sweep covers
        # it); a full sweep only for the previous full sweep.
        if self._busy((kind,) if full else ("evaluate", "full_sweep"), self._stale()):
            return f"{kind}: the previous tick is still being worked on; not planned"
        tasks = plan_evaluation(self.app, now, full=full, rules=rules, planned_at=self.app.clock())
        self._enqueue(kind, now, tasks)
        return f"{kind}: {len(tasks)} shard(s) enqueued"

    def realtime(self, now: datetime, rules: RuleSet) -> str | None:
        clock = self.app.clock()
        waiting = ids_in_flight(self.app.db, "realtime", clock - REALTIME_STALE)
        tasks = plan_realtime(self.app, now, rules=rules, planned_at=clock, in_flight=waiting)
        if not tasks:
            return None
        self._enqueue("realtime", now, tasks)
        return f"real-time: {len(tasks)} task(s) enqueued"

    def dispatch(self, now: datetime, rules: RuleSet) -> str | None:
        if self._busy(("dispatch",), self._stale()):
            return None
        tasks = plan_dispatch(self.app, now, rules=rules, planned_at=self.app.clock())
        self._enqueue("dispatch", now, tasks)
        return None

    def sla(self, now: datetime, rules: RuleSet) -> str | None:
        if self._busy(("sla",), self._stale()):
            return None
        self._enqueue("sla", now, plan_sla(self.app, now, rules=rules, planned_at=self.app.clock()))
        return None

    def maintain(self, now: datetime) -> str | None:
        """Complete ticks whose tasks are all done, enqueue again the tasks that never came
        back, and prune completed ticks older than a day."""
        clock = self.app.clock()
        completed = complete_finished(self.app.db, clock, write_watermark=watermark_writer(clock))
        lost = stale_tasks(self.app.db, clock - self._stale())
        if lost:
            self.actors.send(lost)
            mark_enqueued(self.app.db, lost, clock)
        prune_ticks(self.app.db, clock - timedelta(days=1))  # status shows only the latest
        if not (completed or lost):
            return None
        return f"tick book: {completed} tick(s) completed, {len(lost)} lost task(s) enqueued again"

    def _stale(self) -> timedelta:
        lease = timedelta(seconds=self.app.settings.dispatch_lease_seconds)
        return stale_after(lease, max(TIME_LIMITS.values()))


def queue_depths(broker: dramatiq.Broker, prefix: str = "lifecycle") -> dict[str, int | None]:
    """Messages waiting in each queue (None where the broker cannot tell)."""
    depths: dict[str, int | None] = {}
    for queue in queues(prefix):
        try:
            if isinstance(broker, StubBroker):
                depths[queue] = broker.queues[queue].qsize() if queue in broker.queues else 0
            elif hasattr(broker, "get_queue_message_counts"):  # RabbitMQ
                ready, delayed, _dead = broker.get_queue_message_counts(queue)
                depths[queue] = int(ready) + int(delayed)
            else:  # Redis: the messages of the queue not yet acknowledged
                client = broker.client  # type: ignore[attr-defined]
                namespace = broker.namespace  # type: ignore[attr-defined]
                depths[queue] = int(client.llen(f"{namespace}:{queue}"))
        except Exception as exc:
            log.warning("queue depth of %s unknown: %s", queue, exc)
            depths[queue] = None
    return depths


class WorkerProcess:
    """`lifecycle worker`: Dramatiq's Worker over the actors, with this process's one
    TaskContext, and a heartbeat in the database every ``beat`` seconds."""

    def __init__(
        self,
        context: TaskContext,
        broker: dramatiq.Broker,
        *,
        threads: int,
        only: Sequence[str] | None = None,
        beat: float = 5.0,
    ) -> None:
        self.context = context
        self.broker = broker
        self.actors = Actors(broker, lambda: context, context.app.settings.queue_prefix)
        self.worker = dramatiq.Worker(
            broker, worker_threads=threads, queues=set(only) if only else None
        )
        self.beat = beat
        self._stopped = threading.Event()
        self._started_at = context.app.clock()
        self._beat_thread = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._beat()
        self.worker.start()
        self._beat_thread.start()

    def stop(self, timeout_ms: int = 30_000) -> None:
        self._stopped.set()
        self.worker.stop(timeout=timeout_ms)
        self.context.close()

    def _beat(self) -> None:
        app = self.context.app
        heartbeat(app.db, self.context.worker, app.loaded_version, self._started_at, app.clock())

    def _heartbeats(self) -> None:
        while not self._stopped.wait(self.beat):
            try:
                self._beat()
            except Exception as exc:  # the database may be restarting: try again next beat
                log.warning("heartbeat not recorded: %s", exc)

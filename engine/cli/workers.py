"""`lifecycle worker` (runs the dramatiq runner's tasks) and `lifecycle status`."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Annotated

import typer

from engine.cli.common import (
    app,
    fail,
    load_app,
    out,
    print_json,
    read_settings,
    rules_of,
    start_app,
)
from engine.errors import LifecycleError
from engine.wording import plural

log = logging.getLogger("lifecycle.worker")


@app.command()
def worker(
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", min=1, max=64, help="Tasks at once (default: LIFECYCLE_WORKER_THREADS)."
        ),
    ] = None,
    queues: Annotated[
        str | None,
        typer.Option(
            "--queues",
            help="Only these queues, comma-separated (with the default prefix: "
            "lifecycle-realtime, lifecycle-dispatch, lifecycle-sla, lifecycle-evaluate; "
            "default: all).",
        ),
    ] = None,
    migrate: Annotated[
        bool,
        typer.Option(
            "--migrate", help="Bring the database schema up to date first (default: require it)."
        ),
    ] = False,
) -> None:
    """Run the dramatiq runner's tasks (evaluation shards, dispatch batches, SLA checks)
    from LIFECYCLE_BROKER_URL until SIGINT or SIGTERM; `lifecycle run --runner dramatiq`
    plans them."""
    from engine.runners.distributed import WorkerProcess, make_broker, probe_broker
    from engine.runners.tasks import TaskContext

    application = start_app("worker", log_level=logging.INFO, migrate=migrate)
    rules = rules_of(application)
    settings = application.settings
    from engine.runners.distributed import queues as queues_of

    known = queues_of(settings.queue_prefix)
    chosen = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    unknown = sorted(set(chosen or ()) - set(known))
    if unknown:
        raise fail(f"--queues: no queue {', '.join(unknown)}; the queues are {', '.join(known)}")
    try:
        broker = make_broker(settings.broker_url)
        # A worker whose broker is down would log connection errors forever while its
        # heartbeat shows it alive in `lifecycle status`: it refuses to start instead.
        probe_broker(broker, settings.broker_url or "")
    except LifecycleError as exc:
        raise fail(str(exc)) from exc
    context = TaskContext(application)
    process = WorkerProcess(
        context, broker, threads=threads or settings.worker_threads, only=chosen
    )
    stopped = threading.Event()

    def _signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping after the running tasks", signal.Signals(signum).name)
        stopped.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _signal)
    process.start()
    out.print(
        f"lifecycle worker {context.worker}: rules version {rules.version}, "
        f"{plural(threads or settings.worker_threads, 'thread')}, queues "
        f"{', '.join(chosen or known)}; Ctrl-C stops it",
        markup=False,
    )
    stopped.wait()
    process.stop()
    broker.close()
    out.print("stopped cleanly")


@app.command()
def status(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Is the engine keeping up: queue depths, workers seen, the lag of the oldest pending
    event and due message, and the last tick of each kind."""
    from engine.usecases.status import engine_status

    settings = read_settings()
    application = load_app(settings)
    queues = None
    broker_down: str | None = None
    if settings.runner == "dramatiq" and settings.broker_url:
        from engine.errors import BrokerUnreachable
        from engine.runners.distributed import make_broker, probe_broker, queue_depths

        broker = make_broker(settings.broker_url)
        try:
            probe_broker(broker, settings.broker_url)
            queues = queue_depths(broker, settings.queue_prefix)
        except BrokerUnreachable as exc:  # the broker down is itself a status to show
            broker_down = str(exc)
        finally:
            broker.close()
    report = engine_status(application.db, application.clock(), settings.runner, queues=queues)
    if json_output:
        print_json({**report.as_dict(), "broker_unreachable": broker_down})
        return
    data = report.as_dict()
    out.print(f"runner: {report.runner}", markup=False)
    out.print(
        f"pending events: {report.pending_events} (oldest waiting "
        f"{_seconds(report.oldest_pending_event_s)}); due messages: {report.due_messages} "
        f"(oldest due {_seconds(report.oldest_due_message_s)})",
        markup=False,
    )
    if broker_down is not None:
        out.print(f"queues: unknown: {broker_down}", markup=False)
    if queues is not None:
        shown = ", ".join(f"{q} {'?' if n is None else n}" for q, n in queues.items())
        out.print(f"queues: {shown}", markup=False)
    if report.runner == "dramatiq":
        workers = ", ".join(
            f"{w['id']} (rules {str(w['rules_version'])[:12]}, {w['seen_s_ago']}s ago)"
            for w in report.workers
        )
        out.print(f"workers seen in the last minute: {workers or 'none'}", markup=False)
    for kind, tick in data["last_ticks"].items():
        line = f"last {kind}: {tick['ran_at'] or 'never'}"
        if "tasks" in tick:
            state = "complete" if tick["completed_at"] else "in progress"
            line += f" ({tick['done']}/{tick['tasks']} tasks done, {state})"
        out.print(line, markup=False)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"

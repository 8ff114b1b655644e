"""The distributed runner's figures: a full sweep inline vs on two Dramatiq workers, and
the latency from an event posted to the API to its message in the outbox.

    python -m bench.distributed sweep --customers 100000
    python -m bench.distributed latency --runner inline|dramatiq [--rate 100] [--seconds 60]

``sweep``: the same seeded customers in two PostgreSQL schemas; one full sweep by the
inline runner (its worker processes: one per core), one planned into the tick book and run
by two `lifecycle worker` processes over the local RabbitMQ (one thread each: evaluation is
CPU-bound). Prints both times and their ratio.

``latency``: ``rate`` opted-in customers a second get a sign-up event through
``POST /v1/events`` for ``seconds`` seconds, while `lifecycle serve` and `lifecycle run`
(inline on SQLite; or the dramatiq runner on PostgreSQL with two workers) run as
processes. A poller reads the outbox every 50 ms; an event's latency is from the moment
its request was sent to the poll that first saw its welcome email queued. Prints p50,
p95, p99 and max, and how many events were never followed by a message in time.

Each prints one JSON line (the last line of its output) for ``python -m bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import NOW, RULES, TEMPLATES, drop_database, free_port, fresh_postgres

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ = os.environ.get("LIFECYCLE_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
API_KEY = "bench-distributed-api-key"
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def _env(url: str, work: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
    env.update(
        {
            "LIFECYCLE_DATABASE_URL": url,
            "LIFECYCLE_RULES_DIR": str(RULES),
            "LIFECYCLE_TEMPLATES_DIR": str(TEMPLATES),
            "LIFECYCLE_OUTBOX_DIR": str(work / "outbox"),
            "LIFECYCLE_SECRET_KEY": "bench-secret-not-the-default",
            "LIFECYCLE_API_KEY": API_KEY,
            "COLUMNS": "200",
            **extra,
        }
    )
    return env


def _cluster(env: dict[str, str], work: Path) -> Any:
    from tests.support.cluster import Cluster

    return Cluster(env, work / "logs")


# ── sweep: inline vs two workers ─────────────────────────────────────────────────


def sweep(customers: int) -> dict[str, Any]:
    from engine.bootstrap import bootstrap
    from engine.data.db import make_engine, upgrade
    from engine.data.seed import seed
    from engine.runners.distributed import Actors, make_broker
    from engine.runners.ticks import evaluation_tick, plan_evaluation
    from engine.settings import Settings
    from tests.support.cluster import delete_queues, tick_progress, wait_until

    work = Path(tempfile.mkdtemp(prefix="lifecycle-bench-"))
    inline_url, workers_url = fresh_postgres(POSTGRES), fresh_postgres(POSTGRES)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    result: dict[str, Any] = {"case": "distributed sweep", "customers": customers}
    try:
        for url in (inline_url, workers_url):
            db = make_engine(url)
            upgrade(db)
            seed(db, customers, NOW)
            db.dispose()

        def settings(url: str) -> Settings:
            return Settings(  # type: ignore[call-arg]
                _env_file=None,
                database_url=url,
                rules_dir=RULES,
                templates_dir=TEMPLATES,
                runner="dramatiq",
                broker_url=RABBITMQ,
                queue_prefix=prefix,
            )

        inline = bootstrap(settings(inline_url), channels={}, migrate=False)
        started = time.perf_counter()
        report = evaluation_tick(inline, NOW, full=True)
        result["inline_s"] = round(time.perf_counter() - started, 2)
        result["inline_workers"] = inline.workers()
        result["queued"] = report.journeys.total("queued")
        inline.db.dispose()

        app = bootstrap(settings(workers_url), channels={}, migrate=False)
        env = _env(
            workers_url,
            work,
            LIFECYCLE_RUNNER="dramatiq",
            LIFECYCLE_BROKER_URL=RABBITMQ,
            LIFECYCLE_QUEUE_PREFIX=prefix,
        )
        cluster = _cluster(env, work)
        broker = make_broker(RABBITMQ)
        actors = Actors(broker, None, prefix)
        try:
            for name in ("worker-1", "worker-2"):
                cluster.worker(name, threads=1)
            for name in ("worker-1", "worker-2"):
                cluster.wait_for_log(name, "lifecycle worker", 120)
            started = time.perf_counter()
            tasks = plan_evaluation(app, NOW, full=True, rules=app.rules, planned_at=app.clock())
            actors.send(tasks)
            wait_until(lambda: tick_progress(app.db, tasks[0].tick_id)[2], 3600, "the sweep", 0.1)
            result["workers_s"] = round(time.perf_counter() - started, 2)
            result["shards"] = len(tasks)
        finally:
            cluster.stop()
            broker.close()
            delete_queues(RABBITMQ, list(actors.queues))
            app.db.dispose()
        result["inline_per_s"] = round(customers / result["inline_s"])
        result["workers_per_s"] = round(customers / result["workers_s"])
        result["ratio"] = round(result["inline_s"] / result["workers_s"], 2)
    finally:
        drop_database("postgres", inline_url, work)
        drop_database("postgres", workers_url, Path(tempfile.mkdtemp()))
    return result


# ── latency: event in, message queued ────────────────────────────────────────────


def latency(runner: str, rate: int, seconds: int) -> dict[str, Any]:
    from sqlalchemy import text

    from engine.data.db import make_engine, upgrade
    from engine.data.moments import read_moment
    from tests.support.cluster import delete_queues

    work = Path(tempfile.mkdtemp(prefix="lifecycle-bench-"))
    url = f"sqlite:///{work / 'bench.db'}" if runner == "inline" else fresh_postgres(POSTGRES)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    count = rate * seconds
    ids = [f"rt-{n:06d}" for n in range(count)]
    db = make_engine(url)
    upgrade(db)
    _customers(db, ids)
    extra = {"LIFECYCLE_RUNNER": runner}
    if runner == "dramatiq":
        extra.update(LIFECYCLE_BROKER_URL=RABBITMQ, LIFECYCLE_QUEUE_PREFIX=prefix)
    env = _env(url, work, **extra)
    cluster = _cluster(env, work)
    port = free_port()
    result: dict[str, Any] = {
        "case": "event to queued message",
        "runner": runner,
        "database": db.dialect.name,
        "rate": rate,
        "seconds": seconds,
    }
    try:
        cluster.start("serve", "serve", "--port", str(port))
        cluster.start("scheduler", "run")
        if runner == "dramatiq":
            cluster.wait_for_log("scheduler", "scheduler lock acquired", 120)
            for name in ("worker-1", "worker-2"):
                cluster.worker(name, threads=2)
            for name in ("worker-1", "worker-2"):
                cluster.wait_for_log(name, "lifecycle worker", 120)
        base = f"http://127.0.0.1:{port}"
        _wait_up(base)
        time.sleep(3)  # the scheduler's first ticks (a sweep of customers with no events)
        seen: dict[str, float] = {}
        stop = threading.Event()

        def poll() -> None:
            query = text("SELECT customer_id FROM messages WHERE playbook = 'welcome_series'")
            while not stop.is_set():
                with db.connect() as connection:
                    found = connection.execute(query).scalars().all()
                moment = time.time()
                for customer in found:
                    seen.setdefault(customer, moment)
                stop.wait(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        sent, statuses = asyncio.run(_post_events(base, ids, rate))
        deadline = time.time() + 30
        while len(seen) < len(sent) and time.time() < deadline:
            time.sleep(0.2)
        stop.set()
        poller.join(timeout=5)
        delays = sorted(seen[c] - at for c, at in sent.items() if c in seen)
        # From the moment the API stored the event (its received_at): the engine's part,
        # without the time a request waited for a busy API.
        with db.connect() as connection:
            stored = {
                customer: read_moment(at).timestamp()  # type: ignore[union-attr]
                for customer, at in connection.execute(
                    text("SELECT customer_id, received_at FROM events WHERE type = 'signed_up'")
                )
            }
        after_store = sorted(seen[c] - stored[c] for c in sent if c in seen and c in stored)
        result.update(
            {
                "events": len(sent),
                "answered": statuses,
                "achieved_rate": round(len(sent) / seconds, 1),
                "messages_seen": len(delays),
                "missing_after_30s": len(sent) - len(delays),
                "p50_s": _pct(delays, 50),
                "p95_s": _pct(delays, 95),
                "p99_s": _pct(delays, 99),
                "max_s": round(delays[-1], 3) if delays else None,
                "mean_s": round(statistics.fmean(delays), 3) if delays else None,
                "stored_p50_s": _pct(after_store, 50),
                "stored_p95_s": _pct(after_store, 95),
                "stored_p99_s": _pct(after_store, 99),
                "api_p50_s": _pct(
                    sorted(stored[c] - at for c, at in sent.items() if c in stored), 50
                ),
            }
        )
    finally:
        cluster.stop()
        db.dispose()
        _keep_logs(work, f"latency-{runner}")
        if runner == "dramatiq":
            delete_queues(
                RABBITMQ, [f"{prefix}-{k}" for k in ("realtime", "dispatch", "sla", "evaluate")]
            )
            drop_database("postgres", url, work)
        else:
            drop_database("sqlite", url, work)
    return result


def _keep_logs(work: Path, name: str) -> None:
    """The processes' logs outlive the run, in bench-results/logs-NAME/."""
    import shutil

    logs = work / "logs"
    if logs.exists():
        kept = ROOT / "bench-results" / f"logs-{name}"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(logs, kept)


def _customers(db: Any, ids: list[str]) -> None:
    """Opted-in customers with no events yet: each gets a welcome email on its sign-up."""
    from sqlmodel import Session

    from engine.data.ingest import CustomerIn, upsert_customer

    with Session(db) as session:
        for customer_id in ids:
            upsert_customer(
                session,
                CustomerIn(
                    id=customer_id,
                    email=f"{customer_id}@example.com",
                    email_opt_in=True,
                    timezone="UTC",
                    first_name="Bench",
                    signed_up_at=NOW,
                ),
                NOW,
            )
        session.commit()


def _wait_up(base: str) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("lifecycle serve did not answer /healthz in time")


async def _post_events(
    base: str, ids: list[str], rate: int
) -> tuple[dict[str, float], dict[str, int]]:
    """One sign-up event per customer, ``rate`` a second, paced by the clock (not by the
    answers); returns when each was sent (wall clock), and the statuses answered."""
    import httpx

    sent: dict[str, float] = {}
    statuses: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as http:

        async def post(customer: str) -> None:
            body = {
                "id": f"signup-{customer}",
                "customer_id": customer,
                "type": "signed_up",
                "occurred_at": datetime.now(UTC).isoformat(),
            }
            sent[customer] = time.time()
            try:
                response = await http.post("/v1/events", json=body)
                key = str(response.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1

        started = time.perf_counter()
        pending = []
        for n, customer in enumerate(ids):
            delay = started + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(post(customer)))
        await asyncio.gather(*pending)
    return sent, statuses


def _pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(p / 100 * len(values)) - 1))
    return round(values[index], 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--customers", type=int, default=100_000)
    lat = sub.add_parser("latency")
    lat.add_argument("--runner", choices=("inline", "dramatiq"), required=True)
    lat.add_argument("--rate", type=int, default=100)
    lat.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args()
    if args.what == "sweep":
        result = sweep(args.customers)
    else:
        result = latency(args.runner, args.rate, args.seconds)
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

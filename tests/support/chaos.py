"""The chaos run of the distributed runner: PostgreSQL + RabbitMQ, two `lifecycle worker`
processes, SIGKILL in the middle of a full sweep and in the middle of dispatch, then count.

1. ``customers`` seeded customers; a full sweep planned into the tick book and enqueued
   (this process plans, as the scheduler does: ``DramatiqRunner``); once a share of its
   shards are done, worker A is killed with SIGKILL and a new one started. When the tick
   is complete, the enrollments and messages must equal an inline control run's.
2. Dispatch ticks planned one after another (the real SendGrid and Twilio SDKs against
   the local fake provider); once the provider has had ``dispatch_kill_after`` requests,
   worker B is killed and replaced. Ticks go on until nothing is queued, sending, or
   ambiguous that the provider can settle. Then: no receipt twice, none missing.
3. Two `lifecycle run --runner dramatiq` schedulers: the first holds the lock, the second
   waits; the first is killed and the second must take over and plan.

The test (tests/integration/test_distributed_cluster.py) runs it small; `make chaos` runs
100,000 customers (bench/chaos.py) and prints the figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

from engine.bootstrap import App, bootstrap
from engine.data.db import make_engine, upgrade
from engine.data.seed import seed
from engine.runners.distributed import Actors, DramatiqRunner, make_broker
from engine.runners.runner import InlineRunner
from engine.runners.ticks import plan_dispatch, plan_evaluation
from engine.settings import Settings
from engine.web.app import create_app
from tests.support.cluster import (
    RABBITMQ_URL,
    Cluster,
    delete_queues,
    message_statuses,
    receipts,
    tick_progress,
    wait_until,
)
from tests.support.fake_provider import FakeProvider, post_sendgrid_events, sendgrid_webhook_keypair
from tests.support.outcomes import outcome_counts
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES
from tests.support.server import serve

SECRET = "chaos-test-secret-0123456789"


@dataclass(frozen=True)
class ChaosConfig:
    database_url: str
    customers: int
    now: datetime
    work: Path  # logs, the control database, the outbox
    prefix: str
    batch_size: int = 2000
    sweep_kill_at: float = 0.4  # share of the sweep's shards done when worker A dies
    dispatch_kill_after: int = 200  # provider requests before worker B dies
    threads: int = 2
    timeout_s: float = 1800


def worker_env(config: ChaosConfig, fake: FakeProvider) -> dict[str, str]:
    import os

    return {
        **os.environ,
        "LIFECYCLE_DATABASE_URL": config.database_url,
        "LIFECYCLE_RULES_DIR": str(FIXTURE_RULES),
        "LIFECYCLE_TEMPLATES_DIR": str(FIXTURE_TEMPLATES),
        "LIFECYCLE_OUTBOX_DIR": str(config.work / "outbox"),
        "LIFECYCLE_SECRET_KEY": SECRET,
        "LIFECYCLE_PUBLIC_BASE_URL": "https://lifecycle.example",
        "LIFECYCLE_RUNNER": "dramatiq",
        "LIFECYCLE_BROKER_URL": RABBITMQ_URL,
        "LIFECYCLE_QUEUE_PREFIX": config.prefix,
        "LIFECYCLE_BATCH_SIZE": str(config.batch_size),
        "LIFECYCLE_EMAIL_CHANNEL": "sendgrid",
        "LIFECYCLE_SENDGRID_API_KEY": fake.sendgrid_api_key,
        "LIFECYCLE_SENDGRID_HOST": fake.url,
        "LIFECYCLE_SMS_CHANNEL": "twilio",
        "LIFECYCLE_TWILIO_ACCOUNT_SID": fake.twilio_account_sid,
        "LIFECYCLE_TWILIO_AUTH_TOKEN": fake.twilio_auth_token,
        "LIFECYCLE_TWILIO_FROM_NUMBER": "+15005550006",
        "LIFECYCLE_TWILIO_BASE_URL": fake.url,
        "LIFECYCLE_DISPATCH_LEASE_SECONDS": "2",
        "LIFECYCLE_DISPATCH_SEND_THREADS": "4",
        "LIFECYCLE_DISPATCH_SETTLE_GRACE_SECONDS": "0.5",
        "LIFECYCLE_DISPATCH_SETTLE_RETRY_SECONDS": "1",
        "LIFECYCLE_DISPATCH_SETTLE_PER_TICK": "200",
    }


def planner(config: ChaosConfig, webhook_key: str) -> App:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=config.database_url,
        rules_dir=FIXTURE_RULES,
        templates_dir=FIXTURE_TEMPLATES,
        outbox_dir=config.work / "outbox",
        secret_key=SECRET,
        batch_size=config.batch_size,
        runner="dramatiq",
        broker_url=RABBITMQ_URL,
        queue_prefix=config.prefix,
        dispatch_lease_seconds=2,
        sendgrid_webhook_public_key=webhook_key,
    )
    return bootstrap(settings, channels={}, migrate=False)


def inline_control(config: ChaosConfig) -> tuple[dict[str, Any], float]:
    """The same customers through the inline runner, in a SQLite file of their own."""
    url = f"sqlite:///{config.work / 'control.db'}"
    db = make_engine(url)
    upgrade(db)
    seed(db, config.customers, config.now)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=url,
        rules_dir=FIXTURE_RULES,
        templates_dir=FIXTURE_TEMPLATES,
        outbox_dir=config.work / "control-outbox",
        batch_size=config.batch_size,
    )
    control = bootstrap(settings, db=db, channels={}, migrate=False)
    started = time.perf_counter()
    InlineRunner(control).evaluate(config.now, control.rules, full=True)
    elapsed = time.perf_counter() - started
    counts = outcome_counts(db)
    db.dispose()
    return counts, elapsed


@contextmanager
def chaos_services(config: ChaosConfig) -> Iterator[tuple[FakeProvider, str, str]]:
    """The fake provider and the web app serving SendGrid's signed event webhook."""
    keys = sendgrid_webhook_keypair()
    with FakeProvider.start() as fake:
        app = planner(config, keys.public_key)
        with serve(create_app(app)) as base_url:
            yield fake, f"{base_url}/webhooks/sendgrid", keys.public_key
        app.db.dispose()


def run_chaos(config: ChaosConfig) -> dict[str, Any]:
    control, inline_seconds = inline_control(config)
    db = make_engine(config.database_url)
    upgrade(db)  # a fresh schema (bench); the tests' is migrated already (a no-op)
    seed(db, config.customers, config.now)
    result: dict[str, Any] = {
        "customers": config.customers,
        "inline_sweep_s": round(inline_seconds, 1),
    }
    broker = make_broker(RABBITMQ_URL)
    with chaos_services(config) as (fake, webhook_url, public_key):
        app = planner(config, public_key)
        actors = Actors(broker, None, config.prefix)
        runner = DramatiqRunner(app, actors)
        cluster = Cluster(worker_env(config, fake), config.work / "logs")
        try:
            for name in ("worker-a", "worker-b"):
                cluster.worker(name, config.threads)
            for name in ("worker-a", "worker-b"):
                cluster.wait_for_log(name, "lifecycle worker", 120)
            result.update(_sweep(config, app, actors, cluster, db, control))
            result.update(_dispatch(config, app, runner, actors, cluster, db, fake, webhook_url))
            result.update(_takeover(cluster, db))
        finally:
            cluster.stop()
            broker.close()
            delete_queues(RABBITMQ_URL, list(actors.queues))
            app.db.dispose()
    db.dispose()
    return result


def _sweep(
    config: ChaosConfig,
    app: App,
    actors: Actors,
    cluster: Cluster,
    db: Any,
    control: dict[str, Any],
) -> dict[str, Any]:
    started = time.perf_counter()
    tasks = plan_evaluation(app, config.now, full=True, rules=app.rules, planned_at=app.clock())
    actors.send(tasks)
    tick = tasks[0].tick_id
    kill_at = max(1, int(len(tasks) * config.sweep_kill_at))
    wait_until(
        lambda: tick_progress(db, tick)[0] >= kill_at, config.timeout_s, "the sweep to start"
    )
    done_at_kill = tick_progress(db, tick)[0]
    cluster.kill("worker-a")
    cluster.worker("worker-a2", config.threads)
    wait_until(lambda: tick_progress(db, tick)[2], config.timeout_s, "the sweep to complete", 0.2)
    seconds = time.perf_counter() - started
    with db.connect() as connection:
        runs = connection.execute(
            text("SELECT SUM(runs) FROM tick_tasks WHERE tick_id = :t"), {"t": tick}
        ).scalar_one()
    counts = outcome_counts(db)
    return {
        "sweep_shards": len(tasks),
        "sweep_shards_done_at_kill": done_at_kill,
        "sweep_task_runs": int(runs),
        "sweep_s": round(seconds, 1),
        "sweep_counts_equal_inline": counts == control,
        "sweep_counts": counts,
        "control_counts": control,
    }


def _dispatch(
    config: ChaosConfig,
    app: App,
    runner: DramatiqRunner,
    actors: Actors,
    cluster: Cluster,
    db: Any,
    fake: FakeProvider,
    webhook_url: str,
) -> dict[str, Any]:
    keys = sendgrid_webhook_keypair()
    posted = 0

    def post_new_events() -> None:
        # As SendGrid posts as it goes: the events of what it accepted since the last post.
        nonlocal posted
        events = fake.sendgrid_events()
        post_sendgrid_events(webhook_url, events[posted:], keys.private_key, batch_size=250)
        posted = len(events)

    killed = False
    ticks = 0
    started = time.perf_counter()
    deadline = time.monotonic() + config.timeout_s
    while True:
        tasks = plan_dispatch(app, config.now, rules=app.rules, planned_at=app.clock())
        actors.send(tasks)
        ticks += 1
        tick = tasks[0].tick_id
        while not tick_progress(db, tick)[2]:
            if not killed and len(fake.requests) >= config.dispatch_kill_after:
                cluster.kill("worker-b")
                killed = True
                cluster.worker("worker-b2", config.threads)
                post_new_events()
            assert time.monotonic() < deadline, "dispatch did not finish"
            time.sleep(0.05)
        states = message_statuses(db)
        if not (states["queued"] or states["sending"]) and killed:
            post_new_events()
            counted = receipts(fake, db)
            # Ambiguous SMS are settled by asking Twilio; emails by SendGrid's events.
            if counted["ambiguous_received"] == 0 and not _ambiguous_sms(db):
                break
        assert time.monotonic() < deadline, f"dispatch did not settle: {dict(states)}"
        runner.maintain(app.clock())  # the killed worker's tasks come back through the broker
        time.sleep(0.3)
    counted = receipts(fake, db)
    return {
        "dispatch_killed": killed,
        "dispatch_ticks": ticks,
        "dispatch_s": round(time.perf_counter() - started, 1),
        "message_statuses": dict(message_statuses(db)),
        **{f"provider_{k}": v for k, v in counted.items()},
    }


def _ambiguous_sms(db: Any) -> int:
    with db.connect() as connection:
        return int(
            connection.execute(
                text("SELECT COUNT(*) FROM messages WHERE status = 'ambiguous' AND channel = 'sms'")
            ).scalar_one()
        )


def _takeover(cluster: Cluster, db: Any) -> dict[str, Any]:
    cluster.scheduler("scheduler-1")
    cluster.wait_for_log("scheduler-1", "scheduler lock acquired", 60)
    cluster.scheduler("scheduler-2")
    cluster.wait_for_log("scheduler-2", "waiting to take over", 60)
    killed_at = time.time()
    cluster.kill("scheduler-1")
    took_over = cluster.wait_for_log("scheduler-2", "scheduler lock acquired", 60)

    def planned_after_kill() -> bool:
        with db.connect() as connection:
            newest = connection.execute(text("SELECT MAX(planned_at) FROM ticks")).scalar()
        return newest is not None and newest.timestamp() > killed_at

    wait_until(planned_after_kill, 60, "the standby to plan a tick")
    return {
        "standby_took_over_s": round(took_over, 2),
        "standby_planned_s": round(time.time() - killed_at, 2),
    }

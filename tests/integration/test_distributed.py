"""The Dramatiq runner on Dramatiq's StubBroker and a real Worker, on SQLite and PostgreSQL.

The scheduler's side (DramatiqRunner) plans ticks into the tick book and enqueues their
tasks; the worker's side (WorkerProcess: Dramatiq's Worker, one TaskContext) runs them.
What they leave is compared with the inline runner over the same seeded data.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker
from sqlalchemy import Engine, text

from channels.memory import MemoryChannel
from engine.bootstrap import App, bootstrap
from engine.data.db import make_engine, upgrade
from engine.data.seed import seed
from engine.data.uow import reading
from engine.errors import RulesVersionMismatch
from engine.runners.distributed import Actors, DramatiqRunner, WorkerProcess
from engine.runners.runner import InlineRunner
from engine.runners.tasks import HANDLERS, TIME_LIMITS, TaskContext, run_task
from engine.runners.tickbook import last_ticks, start_task
from engine.runners.ticks import WATERMARK, plan_evaluation, read_state
from engine.settings import Settings
from tests.integration.test_journeys import signed_up
from tests.support.outcomes import outcome_counts
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

CUSTOMERS = 1500


def make_app(url: str, db: Engine | None, tmp_path: Path, **settings: Any) -> App:
    config = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=url,
        rules_dir=FIXTURE_RULES,
        templates_dir=FIXTURE_TEMPLATES,
        outbox_dir=tmp_path / "outbox",
        batch_size=settings.pop("batch_size", 400),
        **settings,
    )
    channel = MemoryChannel()
    return bootstrap(config, db=db, channels={"email": channel, "sms": channel}, migrate=False)


@pytest.fixture
def app(db: Engine, db_url: str, tmp_path: Path) -> App:
    return make_app(db_url, db, tmp_path)


@pytest.fixture
def broker() -> Iterator[StubBroker]:
    stub = StubBroker()
    stub.emit_after("process_boot")
    yield stub
    stub.flush_all()
    stub.close()


@pytest.fixture
def worker(app: App, broker: StubBroker) -> Iterator[WorkerProcess]:
    process = WorkerProcess(TaskContext(app), broker, threads=2, beat=0.2)
    process.start()
    yield process
    process.stop()


def drain(broker: StubBroker, process: WorkerProcess) -> None:
    for queue in process.actors.queues:
        broker.join(queue, fail_fast=True)
    process.worker.join()


def inline_control(tmp_path: Path, now: datetime) -> dict[str, Any]:
    """The same customers, evaluated by the inline runner in a SQLite file of their own."""
    url = f"sqlite:///{tmp_path / 'control.db'}"
    db = make_engine(url)
    upgrade(db)
    seed(db, CUSTOMERS, now)
    control = make_app(url, db, tmp_path)
    InlineRunner(control).evaluate(now, control.rules, full=True)
    counts = outcome_counts(db)
    db.dispose()
    return counts


def test_a_full_sweep_on_workers_matches_the_inline_runner(
    app: App, broker: StubBroker, worker: WorkerProcess, tmp_path: Path, now: datetime
) -> None:
    seed(app.db, CUSTOMERS, now)
    runner = DramatiqRunner(app, worker.actors)
    line = runner.evaluate(now, app.rules, full=True)
    assert line == "full_sweep: 4 shard(s) enqueued"  # 1,500 customers, 400 a shard
    drain(broker, worker)
    counts = outcome_counts(app.db)
    assert counts == inline_control(tmp_path, now)
    assert counts["messages"] and counts["doubled"] == 0 and counts["pending_events"] == 0
    sweep = last_ticks(app.db)["full_sweep"]
    assert (sweep.tasks, sweep.done, sweep.runs) == (4, 4, 4)
    assert sweep.completed_at is not None


def test_every_task_delivered_twice_runs_once(
    app: App, broker: StubBroker, tmp_path: Path, now: datetime
) -> None:
    seed(app.db, CUSTOMERS, now)
    # One thread: each copy arrives after its original finished. (Two copies running at
    # once both run, harmlessly: the next test shows a second run doubles nothing.)
    worker = WorkerProcess(TaskContext(app), broker, threads=1)
    worker.start()
    try:
        tasks = plan_evaluation(app, now, full=True, rules=app.rules, planned_at=now)
        worker.actors.send(tasks)
        worker.actors.send(tasks)  # the broker delivers every task a second time
        drain(broker, worker)
    finally:
        worker.stop()
    assert outcome_counts(app.db) == inline_control(tmp_path, now)
    sweep = last_ticks(app.db)["full_sweep"]
    assert (sweep.tasks, sweep.done, sweep.runs) == (4, 4, 4)  # the second copies skipped


def test_a_task_whose_worker_died_mid_shard_runs_again_and_doubles_nothing(
    app: App, broker: StubBroker, worker: WorkerProcess, tmp_path: Path, now: datetime
) -> None:
    seed(app.db, CUSTOMERS, now)
    tasks = plan_evaluation(app, now, full=True, rules=app.rules, planned_at=now)
    # A worker started the first two shards and wrote their journeys, then was killed
    # before it marked them done: the broker delivers them again.
    context = TaskContext(app, worker="dead-worker:1")
    for task in tasks[:2]:
        assert start_task(app.db, task.tick_id, task.number, context.worker)
        HANDLERS[task.kind](context, task, app.rules)
    with reading(app.db) as session:
        assert read_state(session, WATERMARK) is None  # not every shard is done
    worker.actors.send(tasks)
    drain(broker, worker)
    assert outcome_counts(app.db) == inline_control(tmp_path, now)
    sweep = last_ticks(app.db)["full_sweep"]
    assert (sweep.tasks, sweep.done, sweep.runs) == (4, 4, 6)  # two ran twice
    with reading(app.db) as session:
        assert read_state(session, WATERMARK) == (now - timedelta(minutes=5)).isoformat()


def test_the_watermark_moves_only_when_the_last_shard_is_done(app: App, now: datetime) -> None:
    for number in range(5):
        signed_up(app, f"c{number}", now - timedelta(minutes=10))
    with reading(app.db) as session:
        assert read_state(session, WATERMARK) is None
    app.settings.batch_size = 2
    first = plan_evaluation(app, now, full=False, rules=app.rules, planned_at=now)
    assert [t.kind for t in first] == ["full_sweep"] * 3  # no watermark yet: everyone
    context = TaskContext(app)
    outcomes = [run_task(context, task) for task in first]
    assert [o.completed_tick for o in outcomes] == [False, False, True]
    later = now + timedelta(minutes=1)
    signed_up(app, "c9", later)
    tasks = plan_evaluation(app, later, full=False, rules=app.rules, planned_at=later)
    assert [t.kind for t in tasks] == ["evaluate"]  # only what changed since the watermark
    with reading(app.db) as session:
        before = read_state(session, WATERMARK)
    assert before == (now - timedelta(minutes=5)).isoformat()
    run_task(context, tasks[0])
    with reading(app.db) as session:
        assert read_state(session, WATERMARK) == (later - timedelta(minutes=5)).isoformat()


def test_a_worker_refuses_a_task_planned_with_other_rules(app: App, now: datetime) -> None:
    signed_up(app, "ada", now)
    tasks = plan_evaluation(app, now, full=True, rules=app.rules, planned_at=now)
    other = [
        type(t)(t.tick_id, t.number, t.kind, t.now, "0123456789abcdef", t.payload) for t in tasks
    ]
    context = TaskContext(app, worker="host:42")
    with pytest.raises(RulesVersionMismatch) as refused:
        run_task(context, other[0])
    assert str(refused.value) == (
        f"worker host:42 refuses full_sweep task {tasks[0].tick_id[:8]}/0: it was planned with "
        f"rules version 0123456789abcdef, this worker has {app.rules.version}; deploy the same "
        "rule files to every worker and the scheduler"
    )
    assert last_ticks(app.db)["full_sweep"].runs == 0  # refused before it started
    assert run_task(context, tasks[0]).ran  # the same task with its own rules runs


def test_an_event_is_evaluated_in_real_time_by_either_runner(
    app: App, broker: StubBroker, worker: WorkerProcess, now: datetime
) -> None:
    signed_up(app, "ada", now)
    assert InlineRunner(app).realtime(now, app.rules) == (
        "real-time: 1 customers with new events, 1 enrolled, 1 queued"
    )
    signed_up(app, "bob", now)
    runner = DramatiqRunner(app, worker.actors)
    assert runner.realtime(now, app.rules) == "real-time: 1 task(s) enqueued"
    drain(broker, worker)
    with app.db.connect() as connection:
        queued = connection.execute(
            text("SELECT customer_id FROM messages WHERE playbook = 'welcome_series' ORDER BY 1")
        ).scalars()
        assert list(queued) == ["ada", "bob"]
    assert runner.realtime(now, app.rules) is None  # nothing pending any more


def test_tasks_whose_messages_were_lost_are_enqueued_again(
    app: App, broker: StubBroker, worker: WorkerProcess, now: datetime
) -> None:
    app.clock = lambda: now
    signed_up(app, "ada", now)
    plan_evaluation(app, now, full=True, rules=app.rules, planned_at=now)  # never sent
    runner = DramatiqRunner(app, worker.actors)
    assert runner.maintain(now) is None  # too recent to call lost
    app.clock = lambda: now + timedelta(minutes=26)  # past the 20-min time limit + 5
    assert runner.maintain(now) == ("tick book: 0 tick(s) completed, 1 lost task(s) enqueued again")
    drain(broker, worker)
    assert last_ticks(app.db)["full_sweep"].completed_at is not None


def test_a_task_still_within_its_time_limit_is_not_called_lost(
    app: App, worker: WorkerProcess, now: datetime
) -> None:
    # A full-sweep shard may run 20 minutes (TIME_LIMITS); before, its tick was called
    # lost after 10, enqueued again, and a second full sweep was planned beside it.
    app.clock = lambda: now
    signed_up(app, "ada", now)
    plan_evaluation(app, now, full=True, rules=app.rules, planned_at=now)  # running
    runner = DramatiqRunner(app, worker.actors)
    later = now + TIME_LIMITS["full_sweep"] - timedelta(minutes=1)
    app.clock = lambda: later
    assert runner.maintain(later) is None
    assert runner.evaluate(later, app.rules, full=True) == (
        "full_sweep: the previous tick is still being worked on; not planned"
    )


def test_dispatch_and_sla_batches_run_on_workers(
    app: App, broker: StubBroker, worker: WorkerProcess, now: datetime
) -> None:
    signed_up(app, "ada", now)
    InlineRunner(app).realtime(now, app.rules)
    runner = DramatiqRunner(app, worker.actors)
    runner.dispatch(now, app.rules)
    runner.sla(now, app.rules)
    drain(broker, worker)
    channel = app.channels["email"]
    assert [m.to for m in channel.emails()] == ["ada@example.com"]
    ticks = last_ticks(app.db)
    assert ticks["dispatch"].completed_at is not None and ticks["sla"].completed_at is not None


def test_a_realtime_task_waiting_holds_up_only_its_own_customers(app: App, now: datetime) -> None:
    app.clock = lambda: now
    broker = StubBroker()  # no worker: what is enqueued waits
    runner = DramatiqRunner(app, Actors(broker, None))
    signed_up(app, "ada", now)
    assert runner.realtime(now, app.rules) == "real-time: 1 task(s) enqueued"
    assert runner.realtime(now, app.rules) is None  # ada's task waits: not planned twice
    signed_up(app, "bob", now)
    waiting = runner.realtime(now, app.rules)
    assert waiting == "real-time: 1 task(s) enqueued"  # bob's, without ada
    queued = [
        Message.decode(data).args[0]["payload"]
        for data in broker.queues["lifecycle-realtime"].queue
    ]
    assert queued == [{"ids": ["ada"]}, {"ids": ["bob"]}]
    broker.close()

"""The tick book: the ticks a distributed scheduler planned, their tasks, and who finished.

PostgreSQL, not the queue, is where a task's fate is kept. A tick is one row of
``ticks``; each of its tasks one row of ``tick_tasks``, keyed by (tick, number): the
task-run key. So:

- a task delivered twice runs its work once: ``start_task`` finds it done and says so;
- a task whose worker died (SIGKILL mid-shard) is delivered again by the broker and
  runs again; the work itself is idempotent (the journey store's guards and unique keys,
  the outbox's claims and leases), and ``finish_task`` counts it once;
- the task that finishes last completes the tick, under a lock on the tick's row, and
  only then does an incremental tick move the evaluation watermark;
- a tick whose tasks never came back (a message lost, retries used up) is found by
  ``stale_tasks`` and its tasks are enqueued again.

Every write here is one guarded statement or a few in one transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Table, and_, exists, func, insert, select, update
from sqlmodel import Session

from engine.data.models import Tick, TickTask, WorkerSeen
from engine.data.uow import reading, unit_of_work

TICKS: Table = Tick.__table__  # type: ignore[attr-defined]
TASKS: Table = TickTask.__table__  # type: ignore[attr-defined]
LAST_TICK = "last_tick."  # engine_state names: last_tick.evaluate, last_tick.dispatch, ...
KINDS = ("evaluate", "full_sweep", "realtime", "dispatch", "sla")


@dataclass(frozen=True)
class PlannedTask:
    """One task to enqueue: its key, and what its actor is handed."""

    tick_id: str
    number: int
    kind: str
    now: datetime
    rules_version: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Finished:
    """What ``finish_task`` did: counted this run (False: another run of it had), and
    completed the tick (this was the last task of it)."""

    counted: bool
    completed_tick: bool


def plan_tick(
    db: Engine,
    kind: str,
    now: datetime,
    rules_version: str,
    payloads: Sequence[dict[str, Any]],
    planned_at: datetime,
    *,
    watermark: str | None = None,
) -> list[PlannedTask]:
    """Record a tick and its tasks (one transaction) and return the tasks to enqueue."""
    tick_id = uuid.uuid4().hex
    with unit_of_work(db) as session:
        session.execute(
            insert(TICKS).values(
                id=tick_id,
                kind=kind,
                now=now,
                rules_version=rules_version,
                tasks=len(payloads),
                watermark=watermark,
                planned_at=planned_at,
            )
        )
        if payloads:
            session.execute(
                insert(TASKS),
                [
                    {
                        "tick_id": tick_id,
                        "number": number,
                        "payload": payload,
                        "enqueued_at": planned_at,
                        "runs": 0,
                    }
                    for number, payload in enumerate(payloads)
                ],
            )
    return [
        PlannedTask(tick_id, number, kind, now, rules_version, payload)
        for number, payload in enumerate(payloads)
    ]


def start_task(db: Engine, tick_id: str, number: int, worker: str) -> bool:
    """Count a run of a task; False when it is done already (a redelivery: skip it)."""
    with unit_of_work(db) as session:
        moved = session.execute(
            update(TASKS)
            .where(TASKS.c.tick_id == tick_id, TASKS.c.number == number, TASKS.c.done_at.is_(None))
            .values(runs=TASKS.c.runs + 1, worker=worker[:100])
            .returning(TASKS.c.number)
        ).first()
    return moved is not None


def finish_task(
    db: Engine,
    tick_id: str,
    number: int,
    result: dict[str, Any],
    at: datetime,
    *,
    write_watermark: Any = None,
) -> Finished:
    """Mark a task done (once) and, when it was the last of its tick, complete the tick
    and hand its watermark to ``write_watermark(session, value)`` in the same transaction.

    The tick's row is locked first (FOR UPDATE; SQLite's writer lock does as much), so two
    tasks finishing at once are counted one after the other and the second sees the
    first: one of them, never neither, completes the tick.
    """
    with unit_of_work(db) as session:
        session.execute(select(TICKS.c.id).where(TICKS.c.id == tick_id).with_for_update())
        counted = session.execute(
            update(TASKS)
            .where(TASKS.c.tick_id == tick_id, TASKS.c.number == number, TASKS.c.done_at.is_(None))
            .values(done_at=at, result=result)
            .returning(TASKS.c.number)
        ).first()
        completed = _complete(session, tick_id, at)
        if completed is not None and completed.watermark and write_watermark is not None:
            write_watermark(session, completed.watermark)
    return Finished(counted=counted is not None, completed_tick=completed is not None)


def _complete(session: Session, tick_id: str, at: datetime) -> Any:
    """Complete the tick if every task of it is done; its row (with the watermark) if so."""
    undone = exists().where(TASKS.c.tick_id == tick_id, TASKS.c.done_at.is_(None))
    return session.execute(
        update(TICKS)
        .where(TICKS.c.id == tick_id, TICKS.c.completed_at.is_(None), ~undone)
        .values(completed_at=at)
        .returning(TICKS.c.id, TICKS.c.watermark)
    ).first()


def complete_finished(db: Engine, at: datetime, *, write_watermark: Any = None) -> int:
    """Complete any tick whose tasks are all done but which is not marked complete (a
    tick with no tasks, or a finisher that died between its two statements)."""
    completed = 0
    with reading(db) as session:
        open_ids = list(session.scalars(select(TICKS.c.id).where(TICKS.c.completed_at.is_(None))))
    for tick_id in open_ids:
        with unit_of_work(db) as session:
            session.execute(select(TICKS.c.id).where(TICKS.c.id == tick_id).with_for_update())
            row = _complete(session, tick_id, at)
            if row is not None:
                completed += 1
                if row.watermark and write_watermark is not None:
                    write_watermark(session, row.watermark)
    return completed


def open_tick(db: Engine, kinds: Sequence[str], younger_than: datetime) -> str | None:
    """The id of an unfinished tick of one of these kinds planned after ``younger_than``:
    the scheduler plans no new one of a kind while one is still being worked on."""
    with reading(db) as session:
        return session.scalar(
            select(TICKS.c.id)
            .where(
                TICKS.c.kind.in_(list(kinds)),
                TICKS.c.completed_at.is_(None),
                TICKS.c.planned_at > younger_than,
            )
            .limit(1)
        )


def stale_tasks(db: Engine, enqueued_before: datetime, limit: int = 1000) -> list[PlannedTask]:
    """Tasks not done that were enqueued before ``enqueued_before``: to enqueue again
    (their message was lost, or its retries ran out). ``mark_enqueued`` moves them on."""
    statement = (
        select(TASKS, TICKS.c.kind, TICKS.c.now, TICKS.c.rules_version)
        .join(TICKS, TICKS.c.id == TASKS.c.tick_id)
        .where(and_(TASKS.c.done_at.is_(None), TASKS.c.enqueued_at < enqueued_before))
        .order_by(TASKS.c.enqueued_at)
        .limit(limit)
    )
    with reading(db) as session:
        rows = session.execute(statement).all()
    return [
        PlannedTask(r.tick_id, r.number, r.kind, r.now, r.rules_version, dict(r.payload))
        for r in rows
    ]


def mark_enqueued(db: Engine, tasks: Sequence[PlannedTask], at: datetime) -> None:
    if not tasks:
        return
    with unit_of_work(db) as session:
        for task in tasks:
            session.execute(
                update(TASKS)
                .where(TASKS.c.tick_id == task.tick_id, TASKS.c.number == task.number)
                .values(enqueued_at=at)
            )


@dataclass(frozen=True)
class TickSummary:
    kind: str
    planned_at: datetime
    completed_at: datetime | None
    tasks: int
    done: int
    runs: int  # task runs counted (more than done: some were redelivered)


def last_ticks(db: Engine) -> dict[str, TickSummary]:
    """The newest planned tick of each kind, with how many of its tasks are done."""
    summaries: dict[str, TickSummary] = {}
    with reading(db) as session:
        for kind in KINDS:
            tick = session.execute(
                select(TICKS).where(TICKS.c.kind == kind).order_by(TICKS.c.planned_at.desc())
            ).first()
            if tick is None:
                continue
            done, runs = session.execute(
                select(func.count(TASKS.c.done_at), func.coalesce(func.sum(TASKS.c.runs), 0)).where(
                    TASKS.c.tick_id == tick.id
                )
            ).one()
            summaries[kind] = TickSummary(
                kind, tick.planned_at, tick.completed_at, tick.tasks, int(done), int(runs)
            )
    return summaries


def prune_ticks(db: Engine, before: datetime) -> int:
    """Delete completed ticks (and their tasks) planned before ``before`` (housekeeping)."""
    old = select(TICKS.c.id).where(TICKS.c.completed_at.is_not(None), TICKS.c.planned_at < before)
    with unit_of_work(db) as session:
        session.execute(TASKS.delete().where(TASKS.c.tick_id.in_(old)))
        result = session.execute(
            TICKS.delete().where(TICKS.c.completed_at.is_not(None), TICKS.c.planned_at < before)
        )
    return int(getattr(result, "rowcount", 0) or 0)


def stale_after(lease: timedelta, longest_task: timedelta) -> timedelta:
    """How long an enqueued task may stay undone before it is enqueued again (and its
    tick stops holding up the next one of its kind): well past the longest a task may
    run (``longest_task``, the largest Dramatiq time limit), so a slow task still within
    its limit is not doubled for nothing (a doubled one is harmless, only wasted)."""
    return max(lease * 2, longest_task + timedelta(minutes=5), timedelta(minutes=10))


def heartbeat(
    db: Engine, worker: str, rules_version: str | None, started_at: datetime, at: datetime
) -> None:
    """Record that a worker process is alive (one row per process, its id host:pid)."""
    table: Table = WorkerSeen.__table__  # type: ignore[attr-defined]
    with unit_of_work(db) as session:
        moved = session.execute(
            update(table)
            .where(table.c.id == worker[:100])
            .values(seen_at=at, rules_version=rules_version)
        )
        if not getattr(moved, "rowcount", 0):
            session.execute(
                insert(table).values(
                    id=worker[:100], rules_version=rules_version, started_at=started_at, seen_at=at
                )
            )


def workers_seen(db: Engine, since: datetime) -> list[WorkerSeen]:
    with reading(db) as session:
        statement = select(WorkerSeen).where(WorkerSeen.seen_at >= since)  # type: ignore[arg-type]
        return list(session.scalars(statement.order_by(WorkerSeen.id)))  # type: ignore[arg-type]


def ids_in_flight(db: Engine, kind: str, younger_than: datetime) -> set[str]:
    """The customer ids of the undone tasks of unfinished ticks of ``kind`` planned after
    ``younger_than``: the real-time path plans them no second time while they wait."""
    statement = (
        select(TASKS.c.payload)
        .join(TICKS, TICKS.c.id == TASKS.c.tick_id)
        .where(
            TICKS.c.kind == kind,
            TICKS.c.completed_at.is_(None),
            TICKS.c.planned_at > younger_than,
            TASKS.c.done_at.is_(None),
        )
    )
    with reading(db) as session:
        payloads = session.execute(statement).scalars().all()
    return {str(i) for payload in payloads for i in payload.get("ids", ())}

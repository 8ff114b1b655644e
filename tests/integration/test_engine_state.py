"""Engine state (the evaluation watermark) under concurrency, on SQLite and PostgreSQL.

`lifecycle run` starts its evaluation and full-sweep jobs together; on a fresh database
both write the watermark first. Writes are upserts, so neither fails.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, event, func, select
from sqlmodel import Session

from engine.data.models import EngineState
from engine.data.uow import reading, unit_of_work
from engine.runners.ticks import read_state, write_state


def test_two_first_writes_of_one_state_name_both_succeed(db: Engine, now: datetime) -> None:
    """Both writers look before either writes, as the two jobs of a fresh `run` do.

    A writer that reads the row to decide between insert and update holds here until the
    other has read too (a hook on the SELECT), so both see no row and both insert: that
    is the race. An upsert does not read first, so nothing waits and nothing fails.
    """
    looked = threading.Barrier(2, timeout=30)

    def hold_after_lookup(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "engine_state" in statement:
            looked.wait()

    event.listen(db, "after_cursor_execute", hold_after_lookup)
    failures: list[BaseException] = []

    def writer(value: str, moment: datetime) -> None:
        try:
            with unit_of_work(db) as session:
                write_state(session, "evaluation_watermark", value, moment)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    threads = [
        threading.Thread(target=writer, args=(f"value-{i}", now + timedelta(seconds=i)))
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    event.remove(db, "after_cursor_execute", hold_after_lookup)
    assert failures == []
    with reading(db) as session:
        assert session.scalar(select(func.count()).select_from(EngineState)) == 1
        assert read_state(session, "evaluation_watermark") in ("value-0", "value-1")


def test_writing_a_state_again_updates_it_in_place(db: Engine, now: datetime) -> None:
    with unit_of_work(db) as session:
        write_state(session, "evaluation_watermark", "first", now)
    later = now + timedelta(minutes=1)
    with unit_of_work(db) as session:
        write_state(session, "evaluation_watermark", "second", later)
    with Session(db) as session:
        (row,) = session.scalars(select(EngineState)).all()
        assert (row.name, row.value, row.updated_at) == ("evaluation_watermark", "second", later)


def test_the_watermark_never_moves_back(db: Engine, now: datetime) -> None:
    """A long full sweep finishing after a later incremental tick keeps the later mark."""
    later, earlier = now.isoformat(), (now - timedelta(hours=6)).isoformat()
    with unit_of_work(db) as session:
        write_state(session, "evaluation_watermark", later, now, forward_only=True)
    with unit_of_work(db) as session:
        write_state(session, "evaluation_watermark", earlier, now, forward_only=True)
    with reading(db) as session:
        assert read_state(session, "evaluation_watermark") == later

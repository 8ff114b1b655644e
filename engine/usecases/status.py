"""What `lifecycle status` shows: is the engine keeping up?

- the queue depth of each Dramatiq queue (with the dramatiq runner and a broker);
- the workers seen in the last minute (their heartbeats, engine.runners.distributed);
- the lag of the oldest pending event (received, not yet evaluated) and of the oldest
  due message (queued, due, not yet sent): the two numbers to alert on;
- the last tick of each kind: when it ran (both runners), and with the dramatiq runner
  how many of its tasks are done and whether it is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text

from engine.clock import as_utc
from engine.data.moments import read_moment, session_moment
from engine.data.uow import reading
from engine.runners.tickbook import KINDS, LAST_TICK, TickSummary, last_ticks, workers_seen

WORKER_SEEN_WITHIN = timedelta(minutes=1)


@dataclass
class Status:
    now: datetime
    runner: str
    pending_events: int
    oldest_pending_event_s: float | None
    due_messages: int
    oldest_due_message_s: float | None
    last_ticks: dict[str, datetime | None]
    ticks: dict[str, TickSummary] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    queues: dict[str, int | None] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "runner": self.runner,
            "pending_events": self.pending_events,
            "oldest_pending_event_lag_s": self.oldest_pending_event_s,
            "due_messages": self.due_messages,
            "oldest_due_message_lag_s": self.oldest_due_message_s,
            "last_ticks": {
                kind: {
                    "ran_at": at.isoformat() if at else None,
                    **(
                        {
                            "tasks": t.tasks,
                            "done": t.done,
                            "runs": t.runs,
                            "completed_at": t.completed_at.isoformat() if t.completed_at else None,
                        }
                        if (t := self.ticks.get(kind)) is not None
                        else {}
                    ),
                }
                for kind, at in self.last_ticks.items()
            },
            "workers": self.workers,
            "queues": self.queues,
        }


def engine_status(
    db: Engine, now: datetime, runner: str, *, queues: dict[str, int | None] | None = None
) -> Status:
    with reading(db) as session:
        moment = session_moment(session, now)
        pending, oldest_event = session.execute(
            text("SELECT COUNT(*), MIN(received_at) FROM events WHERE evaluated_at IS NULL")
        ).one()
        due, oldest_due = session.execute(
            text(
                "SELECT COUNT(*), MIN(due_at) FROM messages "
                "WHERE status = 'queued' AND due_at <= :now"
            ),
            {"now": moment},
        ).one()
        states = dict(
            session.execute(
                text("SELECT name, value FROM engine_state WHERE name LIKE :prefix"),
                {"prefix": LAST_TICK + "%"},
            ).all()
        )
    ran = {
        kind: as_utc(datetime.fromisoformat(states[LAST_TICK + kind]))
        if LAST_TICK + kind in states
        else None
        for kind in KINDS
    }
    seen = [
        {
            "id": w.id,
            "rules_version": w.rules_version,
            "started_at": w.started_at.isoformat(),
            "seen_s_ago": round((now - w.seen_at).total_seconds(), 1),
        }
        for w in workers_seen(db, now - WORKER_SEEN_WITHIN)
    ]
    return Status(
        now=now,
        runner=runner,
        pending_events=int(pending),
        oldest_pending_event_s=_lag(now, oldest_event),
        due_messages=int(due),
        oldest_due_message_s=_lag(now, oldest_due),
        last_ticks=ran,
        ticks=last_ticks(db),
        workers=seen,
        queues=queues,
    )


def _lag(now: datetime, value: Any) -> float | None:
    moment = read_moment(value)
    if moment is None:
        return None
    return round(max(0.0, (now - moment).total_seconds()), 1)

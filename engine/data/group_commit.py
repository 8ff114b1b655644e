"""Group commit: many threads' small writes, committed together in few transactions.

Each thread hands in one operation and waits until it is committed. Whoever finds no
write in progress becomes the writer: it takes every operation waiting at that moment
(its own among them) and applies them all in one unit of work; the threads that arrive
meanwhile wait and the first of them writes the next group. So a thread's write is
durable when ``submit`` returns, and under load N threads pay for about one commit
instead of N (on SQLite, where writers queue for one lock, it also turns N lock
hand-overs into one).

If a group fails, each of its operations is tried again alone, so one bad operation
fails only its own thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from sqlalchemy import Engine
from sqlmodel import Session

from engine.data.uow import unit_of_work

Op = TypeVar("Op")
Result = TypeVar("Result")


class _Ticket(Generic[Op, Result]):
    def __init__(self, op: Op) -> None:
        self.op = op
        self.done = False
        self.result: Result | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[Op, Result]):
    """Applies operations from many threads with ``apply(session, ops) -> results``.

    ``apply`` gets every operation of a group, in arrival order, inside one transaction,
    and returns one result per operation, in the same order.
    """

    def __init__(
        self, db: Engine, apply: Callable[[Session, Sequence[Op]], Sequence[Result]]
    ) -> None:
        self._db = db
        self._apply = apply
        self._ready = threading.Condition()
        self._pending: list[_Ticket[Op, Result]] = []
        self._writing = False

    def submit(self, op: Op) -> Result:
        """Apply ``op`` with whatever else is waiting; return its result once committed."""
        ticket: _Ticket[Op, Result] = _Ticket(op)
        with self._ready:
            self._pending.append(ticket)
            while self._writing and not ticket.done:
                self._ready.wait()
            if not ticket.done:
                self._writing = True
                group, self._pending = self._pending, []
            else:
                group = []
        if group:
            try:
                self._write(group)
            finally:
                with self._ready:
                    for unfinished in (t for t in group if not t.done):  # interrupted
                        unfinished.error = RuntimeError("the group commit was interrupted")
                        unfinished.done = True
                    self._writing = False
                    self._ready.notify_all()
        if ticket.error is not None:
            raise ticket.error
        return ticket.result  # type: ignore[return-value]

    def _write(self, group: list[_Ticket[Op, Result]]) -> None:
        try:
            self._commit(group)
            return
        except Exception as exc:
            if len(group) == 1:
                group[0].error, group[0].done = exc, True
                return
        for ticket in group:  # isolate the operation that fails
            try:
                self._commit([ticket])
            except Exception as exc:
                ticket.error, ticket.done = exc, True

    def _commit(self, group: list[_Ticket[Op, Result]]) -> None:
        with unit_of_work(self._db) as session:
            results = self._apply(session, [t.op for t in group])
            if len(results) != len(group):  # a bug in apply: commit nothing
                raise RuntimeError(f"{len(results)} results for {len(group)} operations")
        for ticket, result in zip(group, results, strict=True):
            ticket.result, ticket.done = result, True

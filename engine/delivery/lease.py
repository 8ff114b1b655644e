"""Leases on claimed outbox rows: one clock, and a heartbeat while a batch is sent.

A lease is about real elapsed time, so it is never read from a tick's ``now``: a
simulation runs ticks on a fake clock, and two dispatchers on two machines each have
their own. ``LeaseClock`` gives the one clock as a SQL expression: PostgreSQL's
``statement_timestamp()`` (every dispatcher and every reader compare against the
database server's clock), and on SQLite, which only processes on one machine share, that
machine's wall clock.

``Heartbeat`` renews a batch's lease while it is being sent, so a long send (a slow
provider, many retries within a call) never loses its lease under it: the lease only
runs out when the process that holds it has stopped renewing it, i.e. it died or hung.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from types import TracebackType

from sqlalchemy import Engine, func, literal
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel.sql.sqltypes import UTCDateTime

from engine.clock import utcnow

log = logging.getLogger(__name__)


class LeaseClock:
    """The clock leases, attempts and settlement times are read from (see the module)."""

    def __init__(self, db: Engine, wall: Callable[[], datetime] = utcnow) -> None:
        self.on_server = db.dialect.name == "postgresql"
        self._wall = wall

    def now(self) -> ColumnElement[datetime]:
        """This moment, as a SQL expression."""
        if self.on_server:
            return func.statement_timestamp(type_=UTCDateTime())
        return literal(self._wall(), UTCDateTime())

    def after(self, delta: timedelta) -> ColumnElement[datetime]:
        """``delta`` from this moment, as a SQL expression."""
        if self.on_server:
            return func.statement_timestamp(type_=UTCDateTime()) + delta
        return literal(self._wall() + delta, UTCDateTime())


class Heartbeat:
    """Calls ``renew`` every ``interval`` in a thread of its own until the block ends.

    A renewal that fails is logged and tried again at the next beat: the lease is sized
    to survive a few missed beats (the dispatcher beats three times per lease).
    """

    def __init__(self, interval: timedelta, renew: Callable[[], object], name: str) -> None:
        self.interval = max(interval.total_seconds(), 0.01)
        self._renew = renew
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._renew()
            except Exception:
                log.exception("could not renew the lease; trying again in %.0f s", self.interval)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

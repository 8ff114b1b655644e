"""One scheduler at a time: a PostgreSQL advisory lock held by the scheduler that plans.

A second ``lifecycle run --runner dramatiq`` waits for the lock, trying every
``poll`` seconds. The lock belongs to the first scheduler's database session, so it is
released when that process dies, however it dies (SIGKILL included: the server sees the
connection close). TCP keepalives on the session make a machine that vanished without
closing its connection let go within about fifteen seconds.

The holder checks its session every few seconds (``alive``); a session that is gone may
already have let another scheduler in, so the holder stops planning at once.

The lock's key is derived from the database and schema, so schedulers of different
projects (or test schemas) on one server never wait for each other.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Connection, Engine, text

from engine.errors import ConfigurationError

log = logging.getLogger("lifecycle.leader")

LOCK = "pg_try_advisory_lock(hashtext('lifecycle.scheduler'), hashtext(current_database() || '.' || current_schema()))"
KEEPALIVES = (
    "SET tcp_keepalives_idle = 5",
    "SET tcp_keepalives_interval = 2",
    "SET tcp_keepalives_count = 5",
)


class Leadership:
    """The scheduler's hold on the advisory lock (PostgreSQL only)."""

    def __init__(self, db: Engine, *, poll: float = 1.0) -> None:
        if db.dialect.name != "postgresql":
            raise ConfigurationError(
                "LIFECYCLE_DATABASE_URL",
                "the dramatiq runner needs PostgreSQL (one scheduler is chosen by a "
                "PostgreSQL advisory lock, and workers on several machines share the "
                "database); use the inline runner with SQLite",
            )
        self.db = db
        self.poll = poll
        self._connection: Connection | None = None

    def acquire(self, stopped: threading.Event) -> bool:
        """Wait for the lock; True once held, False when ``stopped`` was set first."""
        said = False
        while not stopped.is_set():
            if self._try():
                log.info("scheduler lock acquired: this scheduler plans")
                return True
            if not said:
                log.info("another scheduler holds the lock; waiting to take over")
                said = True
            stopped.wait(self.poll)
        return False

    def _try(self) -> bool:
        connection = self.db.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            for statement in KEEPALIVES:
                connection.execute(text(statement))
            held = bool(connection.execute(text(f"SELECT {LOCK}")).scalar())
        except Exception:
            connection.close()
            raise
        if held:
            self._connection = connection
            return True
        connection.close()
        return False

    def alive(self) -> bool:
        """The session that holds the lock still answers."""
        if self._connection is None:
            return False
        try:
            self._connection.execute(text("SELECT 1"))
            return True
        except Exception as exc:
            log.error("the scheduler lock's database session is gone (%s)", exc)
            return False

    def release(self) -> None:
        if self._connection is not None:
            try:
                # The session itself ends (not back to the pool, where it would keep the
                # lock): as when the process dies.
                self._connection.invalidate()
                self._connection.close()
            finally:
                self._connection = None

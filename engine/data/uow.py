"""The unit of work: one transaction, opened in one way everywhere.

    with unit_of_work(db) as session:
        ...            # everything written here commits together when the block ends,
                       # and nothing does if it raises

``reading(db)`` is the same for code that only reads: it never commits, so a read-only
command cannot write by accident.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlmodel import Session

from engine.data.db import SQLITE_BEGIN


@contextmanager
def unit_of_work(db: Engine) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back if it raises.

    On SQLite it holds the write lock from its start (BEGIN IMMEDIATE), so what it reads
    cannot go stale before it writes, and a second writer waits its turn (busy timeout)
    instead of failing. Objects stay readable after the commit (``expire_on_commit=
    False``): callers hand them to templates and reports once the transaction is over.
    """
    with Session(db, expire_on_commit=False) as session:
        session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def reading(db: Engine) -> Iterator[Session]:
    """A session for reading only: it never commits, and closing it at the end of the
    block rolls back whatever it did. (Objects stay readable after the block: closing,
    unlike an explicit rollback, does not expire them.)"""
    with Session(db, expire_on_commit=False) as session:
        # On SQLite, a reader takes no lock: writers go on while it reads its snapshot.
        session.connection(execution_options={SQLITE_BEGIN: "DEFERRED"})
        yield session

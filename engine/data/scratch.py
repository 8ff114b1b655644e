"""Scratch copies of a database, for work that must never change the original (simulate).

SQLite: the file is copied with SQLite's online backup API (``sqlite3.Connection.backup``),
which copies a consistent snapshot even while another process writes the database in WAL
mode, then the copy is migrated. The source is only read. The copy lives in a
temporary directory that is removed at the end, unless the caller names a file to keep.

PostgreSQL: a scratch schema is created next to the source schema, the tables are made in
it by the migrations, and every table is copied with ``INSERT INTO scratch.t SELECT ... FROM
source.t`` (sequences moved past the copied ids). The schema is dropped at the end, also
when the work fails.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, make_url, text

from engine.data.db import alembic_config, make_engine, normalize_url, upgrade
from engine.errors import ScratchCopyError

SCRATCH_SCHEMA_PREFIX = "lifecycle_scratch_"


@contextmanager
def scratch_copy(url: str, *, keep: Path | None = None) -> Iterator[Engine]:
    """A migrated copy of the database at ``url`` to work on; the source is not changed.

    ``keep`` (SQLite only) is a new file the copy is written to and left in; without it
    the copy is removed at the end. Raises ScratchCopyError when the database cannot be
    copied (no such file, an in-memory database, an unmigrated PostgreSQL schema).
    """
    address = make_url(normalize_url(url))
    shown = address.render_as_string(hide_password=True)  # errors never print a password
    if address.get_backend_name() == "sqlite":
        with _sqlite_copy(address.database, keep) as engine:
            yield engine
    elif address.get_backend_name() == "postgresql":
        if keep is not None:
            raise ScratchCopyError(
                shown,
                "a kept copy (--work-db) is a SQLite file; on PostgreSQL the work is done in "
                "a scratch schema that is dropped at the end",
            )
        with _postgres_copy(url, shown) as engine:
            yield engine
    else:
        raise ScratchCopyError(shown, f"{address.get_backend_name()} databases are not supported")


@contextmanager
def _sqlite_copy(database: str | None, keep: Path | None) -> Iterator[Engine]:
    if not database or database == ":memory:":
        raise ScratchCopyError("sqlite://", "an in-memory database has nothing to copy")
    source = Path(database)
    if not source.is_file():
        raise ScratchCopyError(
            str(source), "no such database file: create it with `lifecycle init` first"
        )
    if keep is not None and keep.exists():
        raise ScratchCopyError(str(keep), "already exists: remove it or name a new file")
    if keep is not None and keep.resolve() == source.resolve():
        raise ScratchCopyError(str(keep), "is the database itself: name a new file")
    workdir = Path(tempfile.mkdtemp(prefix="lifecycle-scratch-"))
    target = keep if keep is not None else workdir / "copy.db"
    engine: Engine | None = None
    try:
        _backup(source, target)
        engine = make_engine(f"sqlite:///{target}")
        upgrade(engine)
        yield engine
    finally:
        if engine is not None:
            engine.dispose()
        shutil.rmtree(workdir, ignore_errors=True)


def _backup(source: Path, target: Path) -> None:
    """A consistent snapshot of ``source`` into ``target``, reading ``source`` only.

    The reader is an ordinary connection made query-only, not a ``mode=ro`` one: a
    read-only connection to a WAL database leaves its ``-wal`` and ``-shm`` files behind
    (it may not remove them), which would show in the user's working copy; an ordinary
    one removes them when it is the last to close, as every other command does.
    """
    reader = sqlite3.connect(source)
    try:
        reader.execute("PRAGMA query_only = ON")
        writer = sqlite3.connect(target)
        try:
            reader.backup(writer)
        finally:
            writer.close()
    finally:
        reader.close()


@contextmanager
def _postgres_copy(url: str, shown: str) -> Iterator[Engine]:
    source = make_engine(url)
    scratch: str | None = None
    engine: Engine | None = None
    try:
        origin = _migrated_schema(source, shown)
        scratch = f"{SCRATCH_SCHEMA_PREFIX}{uuid.uuid4().hex[:12]}"
        with source.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{scratch}"'))
        engine = make_engine(url, schema=scratch)
        upgrade(engine)
        _copy_tables(engine, origin, scratch)
        yield engine
    finally:
        if engine is not None:
            engine.dispose()
        if scratch is not None:
            with source.begin() as connection:
                connection.execute(text(f'DROP SCHEMA IF EXISTS "{scratch}" CASCADE'))
        source.dispose()


def _migrated_schema(source: Engine, shown: str) -> str:
    """The source's schema; refused unless it is at the newest migration (the copy's
    tables are made by the migrations, so the columns must be the same)."""
    head = ScriptDirectory.from_config(alembic_config(source)).get_current_head()
    with source.connect() as connection:
        schema = str(connection.scalar(text("SELECT current_schema()")))
        revision = MigrationContext.configure(connection).get_current_revision()
    if revision != head:
        raise ScratchCopyError(
            shown,
            f"schema {schema!r} is at migration {revision or '(none)'}, not {head}: "
            "run `lifecycle init` first",
        )
    return schema


def _copy_tables(engine: Engine, origin: str, scratch: str) -> None:
    tables = MetaData()
    tables.reflect(engine)
    with engine.begin() as connection:
        for table in tables.sorted_tables:
            if table.name == "alembic_version":
                continue
            columns = ", ".join(f'"{column.name}"' for column in table.columns)
            connection.execute(
                text(
                    f'INSERT INTO "{scratch}"."{table.name}" ({columns}) '
                    f'SELECT {columns} FROM "{origin}"."{table.name}"'
                )
            )
            for column in table.primary_key.columns:
                sequence = connection.scalar(
                    text("SELECT pg_get_serial_sequence(:table, :column)"),
                    {"table": f'"{scratch}"."{table.name}"', "column": column.name},
                )
                if sequence is not None:
                    connection.execute(
                        text(
                            f'SELECT setval(:sequence, COALESCE(MAX("{column.name}"), 0) + 1, '
                            f'false) FROM "{scratch}"."{table.name}"'
                        ),
                        {"sequence": sequence},
                    )

"""Database engines and sessions, and schema upgrades through Alembic.

SQLite is the embedded default. On SQLite we turn on WAL and a busy timeout so a dispatcher
and an evaluator can share the file; on PostgreSQL the isolation level stays the default
(read committed) and correctness comes from unique keys and ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Execution option: how a SQLite transaction begins ("DEFERRED" or "IMMEDIATE").
SQLITE_BEGIN = "lifecycle_sqlite_begin"


def normalize_url(url: str) -> str:
    """Accept ``postgresql://`` and pick the psycopg 3 driver that we install."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str, *, schema: str | None = None) -> Engine:
    """An engine for ``url``; ``schema`` (PostgreSQL) puts every connection's search_path
    there, so unqualified tables, the migrations' included, live in that schema."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            # pysqlite's own transaction handling begins late and never for SAVEPOINT;
            # SQLAlchemy's documented recipe: let SQLAlchemy emit BEGIN itself (below).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection):  # type: ignore[no-untyped-def]
            # A transaction that reads and then writes must take the write lock up front
            # (BEGIN IMMEDIATE): upgrading a read snapshot to a write fails at once with
            # "database is locked" when another writer committed in between, whatever
            # the busy timeout. So every transaction does, unless it says it only reads
            # (engine.data.uow.reading sets the execution option below to DEFERRED).
            mode = connection.get_execution_options().get(SQLITE_BEGIN, "IMMEDIATE")
            connection.exec_driver_sql(f"BEGIN {mode}")

        return engine
    target = make_url(url)
    if schema is not None:
        # In the URL (libpq's options), so the engine's URL alone builds the same engine
        # again: a worker process connects to the same schema from it.
        target = target.update_query_dict({"options": f"-csearch_path={schema}"})
    return create_engine(target, pool_pre_ping=True, pool_size=5, max_overflow=5)


def existing_database(url: str) -> Engine | None:
    """An engine for ``url`` if a database at the newest migration is there, else None:
    for commands that read the database when it exists and must never create one (SQLite
    creates the file on first connect). "Ready" is schema_problem's, as for every command."""
    engine = make_engine(url)
    if schema_problem(engine) is not None:
        engine.dispose()
        return None
    return engine


def engine_url(engine: Engine) -> str:
    """The URL that builds this engine again (with its password): for worker processes."""
    return engine.url.render_as_string(hide_password=False)


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    command.upgrade(alembic_config(engine), "head")


def schema_problem(engine: Engine) -> str | None:
    """Why the database behind ``engine`` cannot be used as it is (none there, no
    Lifecycle tables, an older schema), or None when it is at the newest migration.

    Creates nothing: a SQLite file that is not there is reported before anything connects
    (connecting would create it), and nothing is migrated.
    """
    url = engine.url
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        in_memory = database in ("", ":memory:") or database.startswith("file:")
        if not in_memory and not Path(database).exists():
            return f"there is no database file {database}"
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
    except DBAPIError as exc:
        first = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc) else ""
        return f"the database cannot be opened ({first})"
    heads = set(ScriptDirectory.from_config(alembic_config(engine)).get_heads())
    if not current:
        return "the database has no Lifecycle tables"
    if current != heads:
        return (
            f"the database is at revision {', '.join(sorted(current))}, older than this "
            f"Lifecycle ({', '.join(sorted(heads))})"
        )
    return None

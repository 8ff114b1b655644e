"""Set-based writes at the speed of the driver: many rows into one table in one go.

The batch paths (the journey store, the seeder) write hundreds of thousands of rows a
minute. SQLAlchemy's per-row parameter processing (aware datetime to UTC to text, JSON
to text, one dict per row) costs more than the insert itself, so rows are handed to the
driver as plain tuples:

- on SQLite, one ``executemany`` of a positional ``INSERT``, with datetimes and JSON
  encoded here by C functions (``isoformat``, ``json.dumps``) into exactly the text
  SQLAlchemy would store (checked once per process against SQLAlchemy's own processors,
  so the two can never drift apart silently);
- on PostgreSQL, ``COPY ... FROM STDIN`` through psycopg, which parses the text of each
  value into the column's type.

Rows are tuples in the order of ``columns``. A value for a JSON column may be a Python
object or a ``Encoded`` text (a document encoded once and shared by many rows, like the
facts of a customer stamped on each of their decisions).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import JSON, Connection, Table
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError
from sqlmodel.sql.sqltypes import UTCDateTime


class Encoded(str):
    """A JSON document already encoded as text, written to a JSON column as it is."""

    __slots__ = ()


def encode_json(value: Any) -> Encoded:
    return Encoded(json.dumps(value))


def sqlite_datetime(moment: datetime) -> str:
    """An aware datetime as SQLAlchemy's UTCDateTime stores it on SQLite."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return moment.isoformat(" ", "microseconds")[:26]  # without the "+00:00"


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, Encoded) else json.dumps(value)


class BulkInsert:
    """Inserts tuples into ``table`` (``columns`` in order) on a connection's driver.

    ``encode`` turns rows into what the driver takes and may run in another process
    (the rows it returns pickle); ``write`` hands them to the driver. Calling the
    object does both.
    """

    def __init__(self, table: Table, columns: Sequence[str], dialect: str) -> None:
        self.table = table
        self.columns = tuple(columns)
        self.dialect = dialect
        kinds = [table.c[name].type for name in self.columns]
        self.dates = tuple(i for i, kind in enumerate(kinds) if isinstance(kind, UTCDateTime))
        self.documents = tuple(i for i, kind in enumerate(kinds) if isinstance(kind, JSON))
        names = ", ".join(f'"{name}"' for name in self.columns)
        if dialect == "sqlite":
            _check_sqlite_encoding(table)
            marks = ", ".join("?" for _ in self.columns)
            self.statement = f'INSERT INTO "{table.name}" ({names}) VALUES ({marks})'
        elif dialect == "postgresql":
            self.statement = f'COPY "{table.name}" ({names}) FROM STDIN'
        else:
            raise ValueError(f"bulk insert does not know the {dialect} dialect")

    def __call__(self, connection: Connection, rows: Iterable[Sequence[Any]]) -> int:
        """Insert every row; returns how many. Runs in the connection's transaction."""
        return self.write(connection, self.encode(rows))

    def encode(self, rows: Iterable[Sequence[Any]]) -> list[tuple[Any, ...]]:
        dates, documents, sqlite = self.dates, self.documents, self.dialect == "sqlite"
        texts: dict[datetime, str] = {}  # a batch repeats its moments (``now`` above all)
        encoded = []
        for row in rows:
            values = list(row)
            if sqlite:
                for i in dates:
                    moment = values[i]
                    if moment is not None:
                        text = texts.get(moment)
                        if text is None:
                            text = texts[moment] = sqlite_datetime(moment)
                        values[i] = text
            for i in documents:
                values[i] = _json_text(values[i])
            encoded.append(tuple(values))
        return encoded

    def write(self, connection: Connection, encoded: Sequence[tuple[Any, ...]]) -> int:
        if not encoded:
            return 0
        if self.dialect == "sqlite":
            connection.exec_driver_sql(self.statement, encoded)  # type: ignore[arg-type]
            return len(encoded)
        driver: Any = connection.connection.dbapi_connection  # a psycopg Connection
        dbapi: Any = connection.dialect.dbapi
        try:
            with driver.cursor() as cursor, cursor.copy(self.statement) as copy:
                for row in encoded:
                    copy.write_row(row)
        except dbapi.Error as exc:
            # COPY bypasses SQLAlchemy: raise what it would (IntegrityError on a unique
            # key, OperationalError on a deadlock...), so callers handle both paths alike.
            raise DBAPIError.instance(self.statement, None, exc, dbapi.Error) from exc
        return len(encoded)


_CHECKED: set[str] = set()


def _check_sqlite_encoding(table: Table) -> None:
    """Refuse to write what SQLAlchemy would read back differently (a library upgrade that
    changed its text format must fail loudly here, not corrupt times silently)."""
    if table.name in _CHECKED:
        return
    dialect = sqlite.dialect()
    for column in table.columns:
        processor = column.type.dialect_impl(dialect).bind_processor(dialect)
        if isinstance(column.type, UTCDateTime):
            moments = (
                datetime(2001, 2, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=2))),
                datetime(2026, 3, 2, 12, 0, tzinfo=UTC),
            )
            if processor is None or any(processor(m) != sqlite_datetime(m) for m in moments):
                raise RuntimeError(f"{table.name}.{column.name}: datetimes would not round-trip")
        elif isinstance(column.type, JSON):
            document = {"text": "é", "n": 1, "list": [True, None]}
            if processor is None or processor(document) != json.dumps(document):
                raise RuntimeError(f"{table.name}.{column.name}: JSON would not round-trip")
    _CHECKED.add(table.name)

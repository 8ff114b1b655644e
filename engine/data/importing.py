"""Importing customers and events from CSV or JSON Lines files.

The format is chosen by the extension:

``.csv``    a header line, then one row per customer or event. Customers have the columns
            ``id,email,phone,first_name,timezone,locale,email_opt_in,sms_opt_in,signed_up_at``
            plus ``attr.<name>`` for attributes and ``topic.<name>`` for subscription topics
            (true/false: the customer's choice); events have ``id,customer_id,type,occurred_at``
            plus ``prop.<name>`` for properties. Only ``id`` (and for events ``customer_id``,
            ``type`` and ``occurred_at``) must be there. Attribute and property cells are typed
            by rules/catalog.yaml: bool is true/false, yes/no or 1/0; int a whole number; money
            whole cents (4999); date YYYY-MM-DD; string as written. An empty cell is absent.
``.jsonl``  one JSON object per line, shaped like the API's CustomerIn or EventIn.

Every row goes through the same validation as the API (engine.data.ingest). A bad row is
reported with its number (the 1-based data row; for CSV also its line in the file, the
header being line 1) and a reason naming the field, and the good rows are kept: they are
committed in batches, and a batch the database refuses is retried row by row, so that only
the offending row is reported. Importing the same file again changes nothing: events are
known by id (counted as duplicates; an id seen before, in the database or earlier in the
file, with a different payload is a bad row, and changes nothing), and a customer whose
row says nothing new is left untouched (counted as unchanged). A column or key the file does not have never erases
what is stored: attributes merge key by key, and a missing ``email_opt_in`` keeps consent.

Imported events are stored exactly as ingested ones: not yet evaluated.
"""

from __future__ import annotations

import csv
import difflib
import functools
import json
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TextIO, TypeVar

from pydantic import ValidationError
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import DataError, IntegrityError, StatementError
from sqlmodel import Session, col

from engine.clock import as_utc
from engine.data.erasure import ErasedAddresses
from engine.data.ingest import (
    CustomerIn,
    EventIn,
    InputLimits,
    Recorded,
    apply_customer,
    check_attributes,
    check_event_properties,
    customer_draft,
    ingest_context,
    record_events,
    validation_reason,
)
from engine.data.models import Customer
from engine.data.topics import check_topics
from engine.data.uow import unit_of_work
from engine.errors import CustomerErased, EventConflict, ImportRowError, LifecycleError
from engine.language.catalog import EVENT_PROPERTY_PREFIX, FactCatalog, FactType
from engine.wording import plural

BATCH_SIZE = 1000
CUSTOMER_COLUMNS = (
    "id",
    "email",
    "phone",
    "first_name",
    "timezone",
    "locale",
    "email_opt_in",
    "sms_opt_in",
    "signed_up_at",
)
EVENT_COLUMNS = ("id", "customer_id", "type", "occurred_at")
ATTRIBUTE_PREFIX = "attr."
PROPERTY_PREFIX = "prop."
TOPIC_COLUMN_PREFIX = "topic."
FORMATS = (".csv", ".jsonl")

Progress = Callable[[int, int], None]
Model = TypeVar("Model", CustomerIn, EventIn)


class ImportFileError(LifecycleError):
    """A whole import file is unusable (unknown format, bad header, not UTF-8 text); raised
    by the importer before it stores any row."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass
class ImportReport:
    """What an import did: rows read, what became of them, and every bad row."""

    path: str
    kind: str  # "customers" or "events"
    rows: int = 0
    created: int = 0  # customers created, or events stored
    updated: int = 0
    unchanged: int = 0
    duplicates: int = 0  # events whose id was already stored
    errors: list[ImportRowError] = field(default_factory=list)

    def summary(self) -> str:
        if self.kind == "events":
            done = f"{plural(self.created, 'event')} stored, {plural(self.duplicates, 'duplicate')}"
        else:
            done = (
                f"{plural(self.created, 'customer')} created, {self.updated:,} updated, "
                f"{self.unchanged:,} unchanged"
            )
        bad = plural(len(self.errors), "bad row")
        return f"{self.path}: {plural(self.rows, 'row')}: {done}, {bad}"


def import_customers(
    engine: Engine,
    path: Path,
    catalog: FactCatalog,
    now: datetime,
    progress: Progress | None = None,
    *,
    batch_size: int = BATCH_SIZE,
    limits: InputLimits | None = None,
    phone_region: str | None = None,
    erased: ErasedAddresses | None = None,
) -> ImportReport:
    """Create or update the customers in ``path``; see the module docstring.
    ``phone_region`` is the country of national phone numbers (07700 900123 in GB);
    ``erased`` puts back the suppression of an erased person's address imported again."""
    return _Import(
        engine,
        Path(path),
        catalog,
        as_utc(now),
        progress,
        batch_size,
        _CUSTOMERS,
        limits,
        phone_region=phone_region,
        erased=erased,
    ).run()


def import_events(
    engine: Engine,
    path: Path,
    catalog: FactCatalog,
    now: datetime,
    progress: Progress | None = None,
    *,
    batch_size: int = BATCH_SIZE,
    history: bool = False,
    limits: InputLimits | None = None,
) -> ImportReport:
    """Store the events in ``path`` (their customers must exist) and fold their roll-ups;
    ``history`` marks them evaluated, so past events start no journey."""
    kind = _HISTORY if history else _EVENTS
    return _Import(
        engine, Path(path), catalog, as_utc(now), progress, batch_size, kind, limits
    ).run()


def count_rows(path: Path) -> int:
    """Data rows in ``path``, counted from its non-blank lines (for a progress bar).

    This pass reads the whole file anyway, so it also refuses one that is not UTF-8 text,
    naming the line, before anything is imported.
    """
    lines = 0
    with path.open("rb") as stream:
        for number, line in enumerate(stream, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ImportFileError(
                    str(path),
                    f"line {number} is not UTF-8 text ({exc.reason} at byte {exc.start + 1}); "
                    "save the file as UTF-8",
                ) from None
            if line.strip():
                lines += 1
    return max(lines - 1, 0) if path.suffix.lower() == ".csv" else lines


# ---------------------------------------------------------------- reading rows


@dataclass(frozen=True)
class _Row:
    number: int  # 1-based data row
    line: int | None  # 1-based line in a CSV file (the header is line 1)
    data: dict[str, Any] | None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Column:
    name: str  # as written in the header
    target: str  # "field", "attribute", "property" or "topic"
    key: str  # the field, attribute or property name
    type: FactType | None = None  # for attributes and properties the catalog declares


def _json_rows(path: Path, max_row: int) -> Iterator[_Row]:
    """One row per non-blank line; the row number is the line number. A line longer than
    ``max_row`` characters is one bad row, and is never read into memory whole."""
    with path.open(encoding="utf-8-sig") as stream:
        number = 0
        while True:
            line = stream.readline(max_row + 1)
            if not line:
                return
            number += 1
            if len(line) > max_row and not line.endswith("\n"):
                _skip_line(stream, max_row)
                yield _Row(number, None, None, (f"the line is longer than {max_row:,} characters",))
                continue
            if not line.strip():
                continue
            yield _json_row(number, line)


def _skip_line(stream: TextIO, chunk: int) -> None:
    """Read on to the end of the current line, a chunk at a time."""
    while True:
        piece = stream.readline(chunk)
        if not piece or piece.endswith("\n"):
            return


def _json_row(number: int, line: str) -> _Row:
    try:
        data = json.loads(line.rstrip("\r\n"), parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        return _Row(number, None, None, (f"malformed JSON: {exc.msg} at column {exc.pos + 1}",))
    except ValueError as exc:
        return _Row(number, None, None, (f"malformed JSON: {exc}",))
    except RecursionError:
        return _Row(number, None, None, ("malformed JSON: nested too deeply",))
    if not isinstance(data, dict):
        what = _JSON_KINDS.get(type(data), "null")
        return _Row(number, None, None, (f"expected a JSON object {{...}}, got {what}",))
    return _Row(number, None, data)


_JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a bool",
}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _csv_layout(
    header: list[str], kind: _Kind[Any], catalog: FactCatalog, path: str
) -> list[_Column]:
    names = [name.strip() for name in header]
    if kind.name == "customers":
        prefix, target = ATTRIBUTE_PREFIX, "attribute"
        declared = [s.name for s in catalog.attributes()]
    else:
        prefix, target = PROPERTY_PREFIX, "property"
        declared = [s.name.removeprefix(EVENT_PROPERTY_PREFIX) for s in catalog.event_properties()]
    columns: list[_Column] = []
    problems: list[str] = []
    seen: set[str] = set()
    for name in names:
        if not name:
            problems.append("a column has no name")
        elif name in seen:
            problems.append(f"column {name!r} appears more than once")
        elif name in kind.columns:
            columns.append(_Column(name, "field", name))
        elif kind.name == "customers" and name.startswith(TOPIC_COLUMN_PREFIX):
            # a topic choice is true/false; an undeclared topic is refused row by row
            key = name.removeprefix(TOPIC_COLUMN_PREFIX)
            columns.append(_Column(name, "topic", key, FactType.BOOL))
        elif name.startswith(prefix):
            key = name.removeprefix(prefix)
            spec = catalog.get(key if target == "attribute" else EVENT_PROPERTY_PREFIX + key)
            columns.append(_Column(name, target, key, spec.type if spec else None))
        else:
            known = [*kind.columns, *(prefix + d for d in declared)]
            if kind.name == "customers":
                known += [TOPIC_COLUMN_PREFIX + topic for topic in catalog.topics]
            hint = difflib.get_close_matches(name, known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(
                f"unknown column {name!r}{suggestion}; {kind.name} files have the columns "
                f"{', '.join(kind.columns)} and {prefix}<name>"
            )
        seen.add(name)
    missing = [name for name in kind.required if name not in seen]
    if missing:
        problems.append(f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if problems:
        raise ImportFileError(path, "header (line 1): " + "; ".join(problems))
    return columns


class _Lines:
    """The lines of a CSV file for csv.reader, numbered, with the lines of the current row
    kept so that they can be read again (see _csv_body)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._again: deque[tuple[int, str]] = deque()
        self._read = 0
        self.row: list[tuple[int, str]] = []  # (line number, text) of the row being read
        self.hit_end = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self._again:
            number, text = self._again.popleft()
        else:
            text = self._stream.readline()
            if not text:
                self.hit_end = True
                raise StopIteration
            self._read += 1
            number = self._read
        self.row.append((number, text))
        return text

    def start_row(self) -> None:
        self.row, self.hit_end = [], False

    def read_again_after_first(self) -> None:
        """The current row was a mistake after its first line: read those lines again."""
        self._again.extendleft(reversed(self.row[1:]))


def _csv_rows(path: Path, kind: _Kind[Any], catalog: FactCatalog, max_row: int) -> Iterator[_Row]:
    """Reads and checks the header now (a bad one fails before any row); the rows lazily."""
    stream = path.open(encoding="utf-8-sig", newline="")
    try:
        lines = _Lines(stream)
        reader = csv.reader(lines)
        header = next(reader, None)
        if header is None:
            raise ImportFileError(str(path), "the file is empty: it needs a header line")
        layout = _csv_layout(header, kind, catalog, str(path))
    except BaseException:
        stream.close()
        raise
    return _csv_body(stream, lines, reader, layout, max_row)


def _csv_body(
    stream: TextIO, lines: _Lines, reader: Any, layout: list[_Column], max_row: int
) -> Iterator[_Row]:
    """The data rows. A quote that is never closed makes csv read every line after it
    into one field. So a row that runs over several lines is refused at its first line,
    and the lines after that are read again as rows, when it reached the end of the file,
    has the wrong number of columns, or took in a line that is a whole row by itself (a
    quoted cell may hold line breaks, but hardly a line with a cell for every column)."""
    with stream:
        number = 0
        while True:
            lines.start_row()
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                number += 1
                yield _Row(number, _row_start(lines), None, (f"unreadable CSV: {exc}",))
                continue
            line = _row_start(lines)
            if not any(cell.strip() for cell in cells):
                continue  # a blank line is not a row
            number += 1
            # hit_end: csv asked for a line after the last one, i.e. a quote was still
            # open there (so even a last row of one line took in its line break).
            several = len(lines.row) > 1 or lines.hit_end
            if several and (problem := _open_quote(lines, len(cells), len(layout))):
                lines.read_again_after_first()
                yield _Row(number, line, None, (problem,))
                continue
            size = sum(len(text) for _, text in lines.row)
            if size > max_row:
                yield _Row(number, line, None, (f"the row is longer than {max_row:,} characters",))
                continue
            if len(cells) != len(layout):
                problem = (
                    f"expected {plural(len(layout), 'column')} as in the header, found {len(cells)}"
                )
                yield _Row(number, line, None, (problem,))
                continue
            data, problems = _csv_record(layout, cells)
            yield _Row(number, line, data, tuple(problems))


def _open_quote(lines: _Lines, found: int, expected: int) -> str | None:
    """Why a row of several lines looks like a quote left open, or None."""
    if lines.hit_end:
        return (
            "a quote opened in this row is never closed "
            "(it would take in every line to the end of the file)"
        )
    first, last = lines.row[0][0], lines.row[-1][0]
    if found != expected:
        return (
            f"expected {expected} columns as in the header, found {found}; the row runs "
            f"over lines {first}-{last}: is a quote left open?"
        )
    for number, text in lines.row[1:]:
        if len(next(csv.reader([text]), [])) == expected:
            return (
                f"a quote opened in this row takes in line {number}, which looks like a row "
                "of its own: is a quote left open?"
            )
    return None


def _row_start(lines: _Lines) -> int | None:
    return lines.row[0][0] if lines.row else None


def _csv_record(layout: list[_Column], cells: list[str]) -> tuple[dict[str, Any], list[str]]:
    data: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {"attribute": {}, "property": {}, "topic": {}}
    problems: list[str] = []
    for column, cell in zip(layout, cells, strict=True):
        text = cell.strip()
        if not text:
            continue  # an empty cell is absent
        if column.target == "field":
            data[column.key] = text
            continue
        try:
            nested[column.target][column.key] = _typed_cell(text, column.type)
        except ValueError as exc:
            where = {"attribute": "attributes", "topic": "topics"}.get(column.target, "properties")
            problems.append(f"{where}.{column.key}: {exc}")
    if nested["attribute"]:
        data["attributes"] = nested["attribute"]
    if nested["property"]:
        data["properties"] = nested["property"]
    if nested["topic"]:
        data["topics"] = nested["topic"]
    return data, problems


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_WHOLE = re.compile(r"^[+-]?\d+$")


def _typed_cell(text: str, kind: FactType | None) -> Any:
    """A CSV cell as the catalog type says (undeclared names stay text, refused later)."""
    if kind is FactType.BOOL:
        if text.lower() not in _BOOLS:
            raise ValueError(f"expected bool (true/false, yes/no or 1/0), got {text!r}")
        return _BOOLS[text.lower()]
    if kind is FactType.INT:
        if not _WHOLE.match(text):
            raise ValueError(f"expected int (a whole number), got {text!r}")
        return int(text)
    if kind is FactType.MONEY:
        if not _WHOLE.match(text):
            raise ValueError(f"expected money in whole cents (4999 for $49.99), got {text!r}")
        return int(text)
    if kind is FactType.DATE:
        try:
            datetime.strptime(text, "%Y-%m-%d")
        except ValueError:
            raise ValueError(f"expected date as YYYY-MM-DD, got {text!r}") from None
        return text
    return text


# ---------------------------------------------------------------- validating and storing


@dataclass(frozen=True)
class _Kind(Generic[Model]):
    name: str
    model: type[Model]
    columns: tuple[str, ...]
    required: tuple[str, ...]
    check: Callable[[Model, FactCatalog, InputLimits], list[str]]
    store: Callable[[Session, list[Model], datetime, ImportReport], list[tuple[int, str]]]


def _check_customer(customer: CustomerIn, catalog: FactCatalog, limits: InputLimits) -> list[str]:
    return [
        *check_attributes(customer.attributes, catalog, limits),
        *check_topics(customer.topics, catalog),
    ]


def _store_customers(
    session: Session, batch: list[CustomerIn], now: datetime, report: ImportReport
) -> list[tuple[int, str]]:
    ids = sorted({item.id for item in batch})
    statement = select(Customer).where(col(Customer.id).in_(ids))
    known: dict[str, Customer] = {c.id: c for c in session.scalars(statement)}
    drafts: dict[str, Any] = {}  # new customers, inserted with one executemany
    bad: list[tuple[int, str]] = []
    for index, item in enumerate(batch):
        existing = known.get(item.id)
        if existing is not None and existing.erased_at is not None:
            bad.append((index, f"id: {CustomerErased(item.id)}"))
            continue
        customer, changed = apply_customer(existing, item, now, new=customer_draft, via="import")
        if existing is None:
            drafts[item.id] = known[item.id] = customer
            report.created += 1
        elif changed:
            report.updated += 1
        else:
            report.unchanged += 1
    if drafts:
        table = Customer.__table__  # type: ignore[attr-defined]
        session.execute(insert(table), [vars(draft) for draft in drafts.values()])
    return bad


def _store_events(
    session: Session,
    batch: list[EventIn],
    now: datetime,
    report: ImportReport,
    *,
    history: bool = False,
) -> list[tuple[int, str]]:
    bad: list[tuple[int, str]] = []
    outcomes = record_events(session, batch, now, history=history)
    for index, (item, outcome) in enumerate(zip(batch, outcomes, strict=True)):
        if outcome is Recorded.STORED:
            report.created += 1
        elif outcome is Recorded.DUPLICATE:
            report.duplicates += 1
        elif isinstance(outcome, EventConflict):
            bad.append((index, f"id: {outcome}"))
        elif outcome is Recorded.ERASED_CUSTOMER:
            bad.append((index, f"customer_id: {CustomerErased(item.customer_id)}"))
        else:
            bad.append((index, f"customer_id: no customer with id {item.customer_id!r}"))
    return bad


_CUSTOMERS: _Kind[CustomerIn] = _Kind(
    "customers", CustomerIn, CUSTOMER_COLUMNS, ("id",), _check_customer, _store_customers
)
_EVENTS: _Kind[EventIn] = _Kind(
    "events", EventIn, EVENT_COLUMNS, EVENT_COLUMNS, check_event_properties, _store_events
)
_HISTORY: _Kind[EventIn] = _Kind(
    "events",
    EventIn,
    EVENT_COLUMNS,
    EVENT_COLUMNS,
    check_event_properties,
    functools.partial(_store_events, history=True),
)

# Errors that belong to a row (a constraint, a value the column refuses); anything else,
# such as a lost connection, stops the import instead of blaming every row in turn.
_ROW_ERRORS = (IntegrityError, DataError, StatementError)


class _Import(Generic[Model]):
    def __init__(
        self,
        engine: Engine,
        path: Path,
        catalog: FactCatalog,
        now: datetime,
        progress: Progress | None,
        batch_size: int,
        kind: _Kind[Model],
        limits: InputLimits | None = None,
        *,
        phone_region: str | None = None,
        erased: ErasedAddresses | None = None,
    ) -> None:
        self.engine = engine
        self.path = path
        self.catalog = catalog
        self.now = now
        self.progress = progress
        self.batch_size = max(1, batch_size)
        self.kind: _Kind[Model] = kind
        self.limits = limits or InputLimits()
        self.context = ingest_context(phone_region)
        self.erased = erased
        self.report = ImportReport(str(path), kind.name)

    def run(self) -> ImportReport:
        suffix = self.path.suffix.lower()
        if suffix not in FORMATS:
            raise ImportFileError(
                str(self.path), f"unknown format {suffix or '(no extension)'!r}: use .csv or .jsonl"
            )
        if not self.path.is_file():
            raise ImportFileError(str(self.path), "no such file")
        total = count_rows(self.path)
        max_row = self.limits.max_row_bytes
        if suffix == ".csv":
            rows = _csv_rows(self.path, self.kind, self.catalog, max_row)
        else:
            rows = _json_rows(self.path, max_row)
        if self.progress is not None:
            self.progress(0, total)
        pending: list[tuple[_Row, Model]] = []
        for row in rows:
            self.report.rows += 1
            model = self._validate(row)
            if model is not None:
                pending.append((row, model))
            if self.report.rows % self.batch_size == 0:
                self._store(pending)
                pending = []
                if self.progress is not None:
                    self.progress(self.report.rows, max(total, self.report.rows))
        self._store(pending)
        if self.progress is not None:
            self.progress(self.report.rows, self.report.rows)
        self.report.errors.sort(key=lambda error: error.row)
        return self.report

    def _validate(self, row: _Row) -> Model | None:
        problems = list(row.problems)
        model: Model | None = None
        if row.data is not None:
            try:
                model = self.kind.model.model_validate(row.data, context=self.context)
            except ValidationError as exc:
                problems.append(validation_reason(exc))
            else:
                problems.extend(self.kind.check(model, self.catalog, self.limits))
        if problems:
            self._bad(row, "; ".join(problems))
            return None
        return model

    def _bad(self, row: _Row, reason: str) -> None:
        where = f"line {row.line}: " if row.line is not None else ""
        self.report.errors.append(ImportRowError(str(self.path), row.number, where + reason))

    def _store(self, batch: list[tuple[_Row, Model]]) -> None:
        """Commit a batch; if the database refuses it, commit row by row to find the culprit."""
        if not batch:
            return
        counts = _counts(self.report)
        try:
            with unit_of_work(self.engine) as session:
                models = [model for _, model in batch]
                bad = self.kind.store(session, models, self.now, self.report)
                if self.erased is not None:
                    refused = {index for index, _ in bad}
                    stored = [m for i, m in enumerate(models) if i not in refused]
                    self.erased.restore(session, _contacts(stored), self.now)
        except _ROW_ERRORS as exc:
            _restore(self.report, counts)
            if len(batch) == 1:
                self._bad(batch[0][0], f"the database refused the row: {_first_line(exc)}")
                return
            for item in batch:
                self._store([item])
            return
        for index, reason in bad:
            self._bad(batch[index][0], reason)


def _contacts(models: list[Any]) -> list[tuple[str | None, str | None]]:
    """The (email, phone) of the customers among ``models``."""
    return [(m.email, m.phone) for m in models if isinstance(m, CustomerIn)]


def _counts(report: ImportReport) -> tuple[int, int, int, int]:
    return report.created, report.updated, report.unchanged, report.duplicates


def _restore(report: ImportReport, counts: tuple[int, int, int, int]) -> None:
    report.created, report.updated, report.unchanged, report.duplicates = counts


def _first_line(exc: Exception) -> str:
    cause = getattr(exc, "orig", None) or exc
    return str(cause).strip().splitlines()[0][:300] if str(cause).strip() else type(cause).__name__

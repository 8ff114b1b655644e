"""The journey store: snapshots of a batch in a few queries, plans written set-based.

Reading (``load_journeys``, ``load_context``) is two plus two queries a batch whatever
its size; writing a plan (``write``) is a handful of statements a batch: one UPDATE ...
RETURNING each to claim the events and to move the enrollments (guarded by the version
each was read at), one bulk insert per table for new enrollments, messages, cases, case
notes and decisions (engine.data.bulk: executemany on SQLite, COPY on PostgreSQL). No ORM
object is built per row.

Races are settled by the database, not by locks held while planning: planning reads in
its own transaction, and the write checks that nothing moved since. A customer whose
events were already claimed, whose enrollment moved (its version changed), or whose new
rows collide with a unique key (``active_key``, the entry number, a message's
``dedupe_key``) lost the race to another evaluator: everything of that customer is left
out (the rest of the batch is written) and ``write`` returns them, to be planned again
alone from a fresh snapshot (engine.journeys.run).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session

from engine.data.bulk import BulkInsert, Encoded, encode_json
from engine.data.models import (
    Decision,
    Enrollment,
    Escalation,
    EscalationNote,
    Message,
    StageTransition,
)
from engine.data.moments import moment_parameter, read_moment, session_moment
from engine.journeys.effects import (
    CancelQueued,
    CaseNote,
    ClaimEvents,
    Convert,
    CustomerSnapshot,
    Decide,
    Enroll,
    Entries,
    JoinCase,
    Journey,
    Move,
    OpenCase,
    OpenCaseEffect,
    Plan,
    Queue,
    RecordStage,
    Ref,
    TouchCustomer,
    Touched,
)
from engine.playbooks.model import RuleSet
from engine.statuses import EnrollmentStatus, EscalationStatus, MessageStatus

COUNTED_STATUSES = (
    MessageStatus.QUEUED,
    MessageStatus.SENDING,
    MessageStatus.SENT,
    MessageStatus.DELIVERED,
)
OPEN_CASE_STATES = (
    EscalationStatus.OPEN,
    EscalationStatus.ACKNOWLEDGED,
    EscalationStatus.REOPENED,
)
_CHUNK = 1000  # rows per statement: far below either database's limit on parameters
ENROLLMENTS: Table = Enrollment.__table__  # type: ignore[attr-defined]
MESSAGES: Table = Message.__table__  # type: ignore[attr-defined]
CASES: Table = Escalation.__table__  # type: ignore[attr-defined]
NOTES: Table = EscalationNote.__table__  # type: ignore[attr-defined]
DECISIONS: Table = Decision.__table__  # type: ignore[attr-defined]
TRANSITIONS: Table = StageTransition.__table__  # type: ignore[attr-defined]
_DEADLOCK = "40P01"


# ---------------------------------------------------------------- reading


def load_journeys(
    session: Session,
    ids: Sequence[str],
    span: Span | None = None,
    touched_since: datetime | None = None,
) -> dict[str, CustomerSnapshot]:
    """Active enrollments and past entries of the customers, in one query over their
    enrollments by customer (the index on customer, playbook, entry number; selecting
    by status would lead SQLite to scan every active enrollment instead). ``span``:
    ``ids`` are every customer with an id in (after, upto], selected by that range
    rather than by a list of a few thousand ids. ``touched_since``: ended enrollments
    whose latest message is this recent, and not converted, come as ``touched`` (a goal
    can still be credited to them)."""
    active: dict[str, dict[str, Journey]] = defaultdict(dict)
    touched: dict[str, list[Touched]] = defaultdict(list)
    last: dict[tuple[str, str], int] = {}
    cooldown: dict[tuple[str, str], datetime] = {}
    if ids:
        rows = session.execute(*_by_customers(session, _ENROLLMENTS, "", ids, span))
        for row in rows:
            key = (row.customer_id, row.playbook)
            if row.entry_number > last.get(key, 0):
                last[key] = row.entry_number
            entered_at = _required(row.entered_at)
            counts = row.queued_count > 0 or row.status in COOLDOWN_STATUSES
            if counts and (key not in cooldown or entered_at > cooldown[key]):
                cooldown[key] = entered_at
            if row.status == EnrollmentStatus.ACTIVE:
                active[row.customer_id][row.playbook] = Journey(
                    id=row.id,
                    playbook=row.playbook,
                    step_id=row.step_id,
                    due_at=read_moment(row.next_due_at),
                    version=row.version,
                    hold_reason=row.hold_reason,
                    entry_number=row.entry_number,
                    entered_at=entered_at,
                    queued_count=row.queued_count,
                    trigger_event_id=row.trigger_event_id,
                    arm=row.arm,
                    waiting_since=read_moment(row.waiting_since),
                    last_touch_at=read_moment(row.last_touch_at),
                    last_touch_step=row.last_touch_step,
                    converted_at=read_moment(row.converted_at),
                )
            elif touched_since is not None and row.converted_at is None and row.last_touch_at:
                last_touch = _required(row.last_touch_at)
                if last_touch >= touched_since:
                    touched[row.customer_id].append(
                        Touched(row.id, row.playbook, row.arm, last_touch, row.last_touch_step)
                    )
    entries: dict[str, dict[str, Entries]] = defaultdict(dict)
    for (customer_id, playbook), number in last.items():
        entries[customer_id][playbook] = Entries(number, cooldown.get((customer_id, playbook)))
    return {
        customer_id: CustomerSnapshot(
            customer_id,
            active.get(customer_id, {}),
            entries.get(customer_id, {}),
            touched=tuple(touched.get(customer_id, ())),
        )
        for customer_id in ids
    }


def load_context(
    session: Session,
    snapshots: Mapping[str, CustomerSnapshot],
    ids: Sequence[str],
    rules: RuleSet,
    now: datetime,
) -> dict[str, CustomerSnapshot]:
    """The rest of the snapshot of the customers with work: their recent marketing
    messages (for the frequency caps) and their open case. Two queries."""
    recent: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    cases: dict[str, OpenCase] = {}
    caps = rules.policies.frequency_caps
    if ids and caps:
        horizon = now - max(cap.per for cap in caps)
        params = {"ids": list(ids), "horizon": session_moment(session, horizon)}
        for row in session.execute(_RECENT, params):
            if row.kind == "marketing" and row.status in COUNTED_STATUSES:
                recent[row.customer_id].append((_required(row.due_at), row.channel))
    if ids:
        for row in session.execute(_OPEN_CASES, {"ids": list(ids)}):
            cases.setdefault(row.customer_id, OpenCase(row.id, row.priority))
    return {
        customer_id: replace(
            snapshots[customer_id],
            recent=tuple(recent.get(customer_id, ())),
            open_case=cases.get(customer_id),
        )
        for customer_id in ids
    }


Span = tuple[str | None, str | None]

_ENROLLMENTS = (
    "SELECT id, customer_id, playbook, status, step_id, next_due_at, version, hold_reason, "
    "entry_number, entered_at, queued_count, trigger_event_id, arm, waiting_since, "
    "last_touch_at, last_touch_step, converted_at FROM enrollments"
)
# The entries that count for re-entry even when they queued nothing (plan, "Re-entry").
COOLDOWN_STATUSES = frozenset(
    {EnrollmentStatus.ACTIVE, EnrollmentStatus.COMPLETED, EnrollmentStatus.DROPPED}
)


def _by_customers(
    session: Session,
    select_from: str,
    where: str,
    ids: Sequence[str],
    span: Span | None,
    tail: str = "",
) -> tuple[Any, dict[str, Any]]:
    """A statement over the rows of ``ids`` (by list) or of ``span`` (by range)."""
    clauses = [where] if where else []
    params: dict[str, Any] = {}
    if span is None:
        clauses.append("customer_id IN :ids")
        params["ids"] = list(ids)
        statement = text(f"{select_from} WHERE {' AND '.join(clauses)}{tail}").bindparams(
            bindparam("ids", expanding=True)
        )
        return statement, params
    after, upto = span
    if after is not None:
        clauses.append("customer_id > :after")
        params["after"] = after
    if upto is not None:
        clauses.append("customer_id <= :upto")
        params["upto"] = upto
    condition = " AND ".join(clauses) or "1 = 1"
    return text(f"{select_from} WHERE {condition}{tail}"), params


# By customer only (their index): with the status in the WHERE clause SQLite would scan
# every queued message by the status index instead. Kind and status are checked here.
_RECENT = text(
    "SELECT customer_id, due_at, channel, kind, status FROM messages "
    "WHERE customer_id IN :ids AND due_at > :horizon"
).bindparams(bindparam("ids", expanding=True))
_OPEN_CASES = text(
    "SELECT id, customer_id, priority FROM escalations WHERE customer_id IN :ids "
    "AND status IN ('open', 'acknowledged', 'reopened') ORDER BY opened_at, id"
).bindparams(bindparam("ids", expanding=True))


def _required(value: Any) -> datetime:
    moment = read_moment(value)
    assert moment is not None
    return moment


# ---------------------------------------------------------------- writing


@dataclass
class Written:
    """What ``write`` wrote, and who was left out because they lost a race."""

    lost: list[str] = field(default_factory=list)
    cancelled: int = 0  # queued messages cancelled by journeys that ended


def write(session: Session, plan: Plan, rules: RuleSet, now: datetime) -> Written:
    """Write ``plan`` in the session's transaction, leaving out the customers who lost a
    race (each attempt runs in a savepoint, so what is left out leaves no trace)."""
    written = Written()
    remaining = plan
    while remaining.customers:
        savepoint = session.begin_nested()
        try:
            lost, cancelled = _write_all(session, remaining, rules, now)
        except IntegrityError:
            savepoint.rollback()
            lost = _colliding(session, remaining)
            if not lost:
                raise  # a conflict no customer explains is a bug: fail loudly
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != _DEADLOCK:
                raise
            savepoint.rollback()  # PostgreSQL broke a deadlock between two evaluators
            continue
        else:
            if not lost:
                savepoint.commit()
                written.cancelled = cancelled
                return written
            savepoint.rollback()
        written.lost.extend(lost)
        remaining = remaining.without(lost)
    return written


def _write_all(
    session: Session, plan: Plan, rules: RuleSet, now: datetime
) -> tuple[list[str], int]:
    """Guards first (claims, moves), then inserts; returns the customers whose guards
    failed (the caller rolls back) and how many queued messages were cancelled."""
    claims: dict[str, str] = {}
    moves: list[tuple[str, Move]] = []
    stages: list[RecordStage] = []
    kinds: dict[type, list[Any]] = defaultdict(list)
    for customer in plan.customers:
        for effect in customer.effects:
            if isinstance(effect, ClaimEvents):
                claims.update((event_id, customer.customer_id) for event_id in effect.event_ids)
            elif isinstance(effect, Move):
                moves.append((customer.customer_id, effect))
            elif isinstance(effect, RecordStage):
                stages.append(effect)
            else:
                kinds[type(effect)].append(effect)
    lost = set(_claim(session, claims, now))
    lost.update(_move(session, moves, now))
    lost.update(_record_stages(session, stages))
    if lost:
        return sorted(lost), 0
    dialect = session.get_bind().dialect.name
    connection = session.connection()
    enrollment_ids = _insert_enrollments(session, dialect, kinds[Enroll])
    case_ids = _insert_cases(session, dialect, kinds[OpenCaseEffect], now)
    refs = {**enrollment_ids, **case_ids}
    messages = (_message_row(e, refs, now) for e in kinds[Queue])
    _insert(dialect, connection, MESSAGES, _MESSAGE_COLUMNS, messages)
    # After the insert: a journey may queue a message and end within one plan (a sign-up
    # and an order in one batch), and then what it just queued is cancelled too.
    cancelled_rows = _cancel_queued(session, kinds[CancelQueued], refs, now)
    notes = (
        (_resolve(e.case, refs), now, e.actor, e.action, e.note[:2000]) for e in kinds[CaseNote]
    )
    _insert(dialect, connection, NOTES, _NOTE_COLUMNS, notes)
    _join_cases(session, kinds[JoinCase], now)
    _convert(session, kinds[Convert])
    _touch(session, {e.customer_id for e in kinds[TouchCustomer]}, now)
    documents: dict[int, Encoded] = {}
    rows = [_decision_row(d, refs, rules.version, now, documents) for d in kinds[Decide]]
    rows.extend(_cancelled_decisions(cancelled_rows, rules.version, now))
    _insert(dialect, connection, DECISIONS, _DECISION_COLUMNS, rows)
    transitions = ((r.customer_id, r.from_stage, r.to_stage, r.at, r.rules_version) for r in stages)
    _insert(dialect, connection, TRANSITIONS, _TRANSITION_COLUMNS, transitions)
    return [], len(cancelled_rows)


# Statements ------------------------------------------------------------------


def _claim(session: Session, claims: Mapping[str, str], now: datetime) -> list[str]:
    """Mark the events evaluated; the customers of events another evaluator claimed lost."""
    if not claims:
        return []
    ids = list(claims)
    claimed: set[str] = set()
    for chunk in _chunks(ids):
        statement = text(
            "UPDATE events SET evaluated_at = :now WHERE id IN :ids AND evaluated_at IS NULL "
            "RETURNING id"
        ).bindparams(bindparam("ids", expanding=True))
        claimed.update(
            session.execute(
                statement, {"now": session_moment(session, now), "ids": chunk}
            ).scalars()
        )
    return sorted({claims[event_id] for event_id in ids if event_id not in claimed})


def _move(session: Session, moves: Sequence[tuple[str, Move]], now: datetime) -> list[str]:
    """One guarded UPDATE ... FROM (VALUES ...) RETURNING per chunk: an enrollment moves
    only from the version the plan read; the customers of those that did not lost."""
    if not moves:
        return []
    dialect = session.get_bind().dialect.name
    moved: set[int] = set()
    for chunk in _chunks(sorted(moves, key=lambda m: m[1].enrollment_id)):
        params: list[Any] = []
        for _, move in chunk:
            state = move.state
            params.extend(
                (
                    move.enrollment_id,
                    move.version,
                    str(state.status),
                    state.step_id,
                    moment_parameter(dialect, state.due_at),
                    state.hold_reason,
                    state.queued_count,
                    moment_parameter(dialect, state.ended_at),
                    state.end_reason,
                    state.arm,
                    moment_parameter(dialect, state.waiting_since),
                    moment_parameter(dialect, state.last_touch_at),
                    state.last_touch_step,
                    moment_parameter(dialect, state.converted_at),
                    state.conversion_event_id,
                    state.conversion_step,
                )
            )
        statement = _move_statement(dialect, len(chunk))
        moved.update(session.connection().exec_driver_sql(statement, tuple(params)).scalars())
    return sorted({customer for customer, move in moves if move.enrollment_id not in moved})


# The columns a Move writes, with their types (PostgreSQL types the VALUES by casts).
_MOVED = (
    ("id", "INTEGER"),
    ("version", "INTEGER"),
    ("status", "VARCHAR"),
    ("step_id", "VARCHAR"),
    ("due_at", "TIMESTAMP WITH TIME ZONE"),
    ("hold_reason", "VARCHAR"),
    ("queued_count", "INTEGER"),
    ("ended_at", "TIMESTAMP WITH TIME ZONE"),
    ("end_reason", "VARCHAR"),
    ("arm", "VARCHAR"),
    ("waiting_since", "TIMESTAMP WITH TIME ZONE"),
    ("last_touch_at", "TIMESTAMP WITH TIME ZONE"),
    ("last_touch_step", "VARCHAR"),
    ("converted_at", "TIMESTAMP WITH TIME ZONE"),
    ("conversion_event_id", "VARCHAR"),
    ("conversion_step", "VARCHAR"),
)


def _move_statement(dialect: str, rows: int) -> str:
    mark = "?" if dialect == "sqlite" else "%s"
    columns = ", ".join(
        (f"column{i + 1}" if dialect == "sqlite" else f"CAST(column{i + 1} AS {kind})")
        + f" AS {name}"
        for i, (name, kind) in enumerate(_MOVED)
    )
    row = "(" + ", ".join(mark for _ in _MOVED) + ")"
    values = ", ".join(row for _ in range(rows))
    assignments = ", ".join(
        f"{'next_due_at' if name == 'due_at' else name} = v.{name}"
        for name, _ in _MOVED
        if name not in ("id", "version")
    )
    return (
        f"UPDATE enrollments SET {assignments}, "
        "active_key = CASE WHEN v.status = 'active' THEN enrollments.active_key END, "
        "version = enrollments.version + 1 "
        f"FROM (SELECT {columns} FROM (VALUES {values}) AS w) AS v "
        "WHERE enrollments.id = v.id AND enrollments.version = v.version "
        "AND enrollments.status = 'active' RETURNING enrollments.id"
    )


def _record_stages(session: Session, records: Sequence[RecordStage]) -> list[str]:
    """One guarded UPDATE ... FROM (VALUES ...) RETURNING per chunk: a customer's stage
    moves only from the stage the evaluation read; the customers whose stage another
    evaluator recorded meanwhile lost (their history row is not written twice)."""
    if not records:
        return []
    dialect = session.get_bind().dialect.name
    moved: set[str] = set()
    for chunk in _chunks(sorted(records, key=lambda r: r.customer_id)):
        params: list[Any] = []
        for record in chunk:
            params.extend(
                (
                    record.customer_id,
                    record.from_stage,
                    record.to_stage,
                    moment_parameter(dialect, record.at),
                )
            )
        statement = _stage_statement(dialect, len(chunk))
        moved.update(session.connection().exec_driver_sql(statement, tuple(params)).scalars())
    return sorted({r.customer_id for r in records if r.customer_id not in moved})


def _stage_statement(dialect: str, rows: int) -> str:
    sqlite = dialect == "sqlite"
    mark = "?" if sqlite else "%s"
    kinds = (("id", "VARCHAR"), ("from_stage", "VARCHAR"), ("stage", "VARCHAR"))
    columns = ", ".join(
        (f"column{i + 1}" if sqlite else f"CAST(column{i + 1} AS {kind})") + f" AS {name}"
        for i, (name, kind) in enumerate((*kinds, ("since", "TIMESTAMP WITH TIME ZONE")))
    )
    values = ", ".join(f"({mark}, {mark}, {mark}, {mark})" for _ in range(rows))
    same = "IS" if sqlite else "IS NOT DISTINCT FROM"
    return (
        "UPDATE customers SET stage = v.stage, stage_since = v.since, "
        "previous_stage = v.from_stage "
        f"FROM (SELECT {columns} FROM (VALUES {values}) AS w) AS v "
        f"WHERE customers.id = v.id AND customers.stage {same} v.from_stage "
        "RETURNING customers.id"
    )


def _convert(session: Session, conversions: Sequence[Convert]) -> None:
    """Credit conversions to ended enrollments, each once (a second evaluator that got
    there first leaves nothing to do: the guard holds the first)."""
    dialect = session.get_bind().dialect.name
    mark = "?" if dialect == "sqlite" else "%s"
    statement = (
        f"UPDATE enrollments SET converted_at = {mark}, conversion_event_id = {mark}, "
        f"conversion_step = {mark} WHERE id = {mark} AND converted_at IS NULL"
    )
    rows = [
        (moment_parameter(dialect, c.at), c.event_id, c.step_id, c.enrollment_id)
        for c in conversions
    ]
    if rows:
        session.connection().exec_driver_sql(statement, rows)  # type: ignore[arg-type]


def _insert_enrollments(
    session: Session, dialect: str, enrolls: Sequence[Enroll]
) -> dict[str, int]:
    if not enrolls:
        return {}
    ids = _allocate(session, dialect, "enrollments", len(enrolls))
    refs = {e.key: i for e, i in zip(enrolls, ids, strict=True)}
    rows = (
        (
            refs[e.key],
            e.customer_id,
            e.playbook,
            str(e.state.status),
            f"{e.customer_id}|{e.playbook}" if e.state.status is EnrollmentStatus.ACTIVE else None,
            e.entry_number,
            e.state.step_id,
            e.state.due_at,
            0,
            e.state.queued_count,
            e.rules_version,
            e.trigger_event_id,
            e.state.hold_reason,
            e.entered_at,
            e.state.ended_at,
            e.state.end_reason,
            e.state.arm,
            e.state.waiting_since,
            e.state.last_touch_at,
            e.state.last_touch_step,
            e.state.converted_at,
            e.state.conversion_event_id,
            e.state.conversion_step,
        )
        for e in enrolls
    )
    _insert(dialect, session.connection(), ENROLLMENTS, _ENROLLMENT_COLUMNS, rows)
    return refs


def _insert_cases(
    session: Session, dialect: str, cases: Sequence[OpenCaseEffect], now: datetime
) -> dict[str, int]:
    if not cases:
        return {}
    ids = _allocate(session, dialect, "escalations", len(cases))
    refs = {c.key: i for c, i in zip(cases, ids, strict=True)}
    rows = (
        (
            refs[c.key],
            c.customer_id,
            c.reason,
            c.trigger_event_id,
            c.priority,
            c.queue,
            str(EscalationStatus.OPEN),
            c.sla_due_at,
            c.notified_tier,
            now,
            now,
        )
        for c in cases
    )
    _insert(dialect, session.connection(), CASES, _CASE_COLUMNS, rows)
    return refs


def _allocate(session: Session, dialect: str, table: str, count: int) -> list[int]:
    """Ids for new rows, known before they are inserted (so the rows that refer to them
    go in with the same bulk insert). SQLite: the transaction holds the write lock
    (BEGIN IMMEDIATE), so nobody else takes the ids above the highest. PostgreSQL: the
    table's sequence hands them out, concurrently safe."""
    if dialect == "sqlite":
        highest = session.connection().exec_driver_sql(f"SELECT coalesce(max(id), 0) FROM {table}")
        first = int(highest.scalar_one()) + 1
        return list(range(first, first + count))
    statement = text(
        f"SELECT nextval(pg_get_serial_sequence('{table}', 'id')) FROM generate_series(1, :n)"
    )
    return [int(i) for i in session.execute(statement, {"n": count}).scalars()]


def _cancel_queued(
    session: Session, cancels: Sequence[CancelQueued], refs: Mapping[str, int], now: datetime
) -> list[Any]:
    """Cancel what ending journeys still have queued; returns the cancelled rows."""
    by_reason: dict[str, list[int]] = defaultdict(list)
    for effect in cancels:
        by_reason[effect.reason].append(_resolve(effect.enrollment, refs))
    cancelled: list[Any] = []
    for reason, ids in by_reason.items():
        for chunk in _chunks(ids):
            statement = text(
                "UPDATE messages SET status = 'cancelled', last_error = :reason, "
                "updated_at = :now WHERE enrollment_id IN :ids AND status = 'queued' "
                "RETURNING id, customer_id, playbook, step_id, enrollment_id"
            ).bindparams(bindparam("ids", expanding=True))
            params = {"reason": reason, "now": session_moment(session, now), "ids": chunk}
            cancelled.extend((reason, row) for row in session.execute(statement, params))
    return cancelled


def _cancelled_decisions(
    cancelled: Iterable[Any], rules_version: str, now: datetime
) -> list[tuple[Any, ...]]:
    return [
        (
            now,
            row.customer_id,
            row.playbook or "",
            row.step_id,
            "cancelled",
            reason,
            None,
            row.enrollment_id,
            row.id,
            rules_version,
            _EMPTY,
        )
        for reason, row in cancelled
    ]


def _join_cases(session: Session, joins: Sequence[JoinCase], now: datetime) -> None:
    for join in joins:
        session.execute(
            text("UPDATE escalations SET priority = :priority, updated_at = :now WHERE id = :id"),
            {"priority": join.priority, "now": session_moment(session, now), "id": join.case_id},
        )


def _touch(session: Session, customer_ids: set[str], now: datetime) -> None:
    if not customer_ids:
        return
    statement = text("UPDATE customers SET changed_at = :now WHERE id IN :ids").bindparams(
        bindparam("ids", expanding=True)
    )
    session.execute(statement, {"now": session_moment(session, now), "ids": sorted(customer_ids)})


def _colliding(session: Session, plan: Plan) -> list[str]:
    """After a unique-key violation: the customers whose new rows collide with rows that
    exist (another evaluator entered them, or queued their message, first)."""
    active_keys: dict[str, str] = {}
    entries: dict[tuple[str, str, int], str] = {}
    dedupe: dict[str, str] = {}
    for effect in plan.effects():
        if isinstance(effect, Enroll):
            entries[(effect.customer_id, effect.playbook, effect.entry_number)] = effect.customer_id
            active_keys[f"{effect.customer_id}|{effect.playbook}"] = effect.customer_id
        elif isinstance(effect, Queue):
            dedupe[effect.dedupe_key] = effect.customer_id
    lost: set[str] = set()
    for chunk in _chunks(list(active_keys)):
        statement = text("SELECT active_key FROM enrollments WHERE active_key IN :keys").bindparams(
            bindparam("keys", expanding=True)
        )
        lost.update(active_keys[k] for k in session.execute(statement, {"keys": chunk}).scalars())
    customers = sorted({c for c, _, _ in entries})
    for chunk in _chunks(customers):
        statement = text(
            "SELECT customer_id, playbook, entry_number FROM enrollments WHERE customer_id IN :ids"
        ).bindparams(bindparam("ids", expanding=True))
        for row in session.execute(statement, {"ids": chunk}):
            found = entries.get((row.customer_id, row.playbook, row.entry_number))
            if found is not None:
                lost.add(found)
    for chunk in _chunks(list(dedupe)):
        statement = text("SELECT dedupe_key FROM messages WHERE dedupe_key IN :keys").bindparams(
            bindparam("keys", expanding=True)
        )
        lost.update(dedupe[k] for k in session.execute(statement, {"keys": chunk}).scalars())
    return sorted(lost)


# Rows ------------------------------------------------------------------------

_ENROLLMENT_COLUMNS = (
    "id",
    "customer_id",
    "playbook",
    "status",
    "active_key",
    "entry_number",
    "step_id",
    "next_due_at",
    "version",
    "queued_count",
    "rules_version",
    "trigger_event_id",
    "hold_reason",
    "entered_at",
    "ended_at",
    "end_reason",
    "arm",
    "waiting_since",
    "last_touch_at",
    "last_touch_step",
    "converted_at",
    "conversion_event_id",
    "conversion_step",
)
_CASE_COLUMNS = (
    "id",
    "customer_id",
    "reason",
    "trigger_event_id",
    "priority",
    "queue",
    "status",
    "sla_due_at",
    "notified_tier",
    "opened_at",
    "updated_at",
)
_NOTE_COLUMNS = ("escalation_id", "at", "actor", "action", "note")
_MESSAGE_COLUMNS = (
    "id",
    "dedupe_key",
    "customer_id",
    "enrollment_id",
    "escalation_id",
    "playbook",
    "step_id",
    "kind",
    "channel",
    "template",
    "to_address",
    "context",
    "priority",
    "status",
    "due_at",
    "attempts",
    "created_at",
    "updated_at",
)
_DECISION_COLUMNS = (
    "at",
    "customer_id",
    "playbook",
    "step_id",
    "outcome",
    "reason",
    "until",
    "enrollment_id",
    "message_id",
    "rules_version",
    "facts",
)
_TRANSITION_COLUMNS = ("customer_id", "from_stage", "to_stage", "at", "rules_version")
_EMPTY = Encoded("{}")


def _message_row(message: Queue, refs: Mapping[str, int], now: datetime) -> tuple[Any, ...]:
    case = _resolve(message.case, refs) if message.case is not None else None
    context = message.context
    if case is not None and "case" in context:
        # A staff notification about a case this plan opened: its id is known only now.
        context = {**context, "case": {**context["case"], "id": case}}
    return (
        message.message_id,
        message.dedupe_key,
        message.customer_id,
        _resolve(message.enrollment, refs) if message.enrollment is not None else None,
        case,
        message.playbook,
        message.step_id,
        message.kind,
        message.channel,
        message.template,
        message.to_address,
        context,
        message.priority,
        str(MessageStatus.QUEUED),
        message.due_at,
        0,
        now,
        now,
    )


def _decision_row(
    decision: Decide,
    refs: Mapping[str, int],
    rules_version: str,
    now: datetime,
    documents: dict[int, Encoded],
) -> tuple[Any, ...]:
    facts = decision.facts
    document = documents.get(id(facts))
    if document is None:
        document = documents[id(facts)] = encode_json(facts)
    return (
        now,
        decision.customer_id,
        decision.playbook,
        decision.step_id,
        decision.outcome,
        decision.reason,
        decision.until,
        _resolve(decision.enrollment, refs) if decision.enrollment is not None else None,
        decision.message_id,
        rules_version,
        document,
    )


def _resolve(ref: Ref, refs: Mapping[str, int]) -> int:
    return ref if isinstance(ref, int) else refs[ref]


# Helpers ---------------------------------------------------------------------

_BULK: dict[tuple[str, str, tuple[str, ...]], BulkInsert] = {}


def _bulk(dialect: str, table: Table, columns: tuple[str, ...]) -> BulkInsert:
    key = (dialect, table.name, columns)
    found = _BULK.get(key)
    if found is None:
        found = _BULK[key] = BulkInsert(table, columns, dialect)
    return found


def _insert(
    dialect: str,
    connection: Any,
    table: Table,
    columns: tuple[str, ...],
    rows: Iterable[Sequence[Any]],
) -> None:
    bulk = _bulk(dialect, table, columns)
    bulk.write(connection, bulk.encode(rows))


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


__all__ = ["Written", "due_customer_ids", "load_context", "load_journeys", "write"]


def due_customer_ids(session: Session, now: datetime, since: datetime | None) -> list[str]:
    """Customers an incremental tick must look at: changed since the watermark, with
    pending events, or with a journey step due. Three indexed queries."""
    ids: set[str] = set()
    if since is not None:
        changed = text("SELECT id FROM customers WHERE changed_at > :since")
        ids.update(session.execute(changed, {"since": session_moment(session, since)}).scalars())
    pending = text("SELECT DISTINCT customer_id FROM events WHERE evaluated_at IS NULL")
    ids.update(session.execute(pending).scalars())
    due = text(
        "SELECT DISTINCT customer_id FROM enrollments "
        "WHERE status = 'active' AND next_due_at <= :now"
    )
    ids.update(session.execute(due, {"now": session_moment(session, now)}).scalars())
    return sorted(ids)

"""Playbook tests: a marketer's examples of what a playbook should send, run for real.

A test file (``rules/tests/*.yaml``) holds cases. Each case is one customer (their facts
as the API or an import would give them), a timeline of events at given moments, and
the messages the customer is expected to get (template, channel, local time) or must
never get. ``load_tests`` reads the files and reports every mistake at ``path:line:col``
(PlaybookTestsInvalid); ``run_test`` runs one case through the real engine on a fake
clock, the way ``lifecycle simulate`` does (engine.runners.ticks: evaluation, SLA check
and dispatch), on a fresh scratch SQLite database of its own, with an in-memory channel
for email and SMS; ``compare`` turns what was sent into a diff against what was
expected, each line with the decision that explains it.

The clock moves from the case's ``start`` to ``start + run_for``: it stops at every
event, at every top of the hour (conditions on time, like days since the last visit,
change as days pass) and at every moment something becomes due (a step's wait, a message
held by a sending window, a case's SLA), so messages go at the minute the engine means
them to, not at the next hour.
"""

from __future__ import annotations

import copy
import difflib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import Engine, text
from sqlmodel import col, select

from channels.memory import MemoryChannel
from engine.bootstrap import bootstrap
from engine.clock import as_utc
from engine.data.db import make_engine, upgrade
from engine.data.ingest import (
    CustomerIn,
    EventIn,
    check_attributes,
    check_event_properties,
    ingest_context,
    record_event,
    record_events,
    upsert_customer,
)
from engine.data.models import Decision, Escalation, Message
from engine.data.moments import session_moment
from engine.data.uow import reading, unit_of_work
from engine.errors import DurationError, PlaybookTestsInvalid, SourceProblem
from engine.language.durations import parse_duration
from engine.playbooks.loader import validate_shape
from engine.playbooks.model import RuleSet
from engine.playbooks.yaml_source import Located, load_located
from engine.runners.ticks import dispatch_tick, evaluation_tick, sla_tick
from engine.settings import Settings
from engine.usecases.explain import explain_customer

TESTS_DIR = "tests"  # inside a rules directory: the loader reads only its top level
DEFAULT_CUSTOMER = "test-customer"
LOCAL_FORMAT = "%Y-%m-%d %H:%M"
SENT = ("sent", "delivered")
PRIORITIES = ("urgent", "high", "normal", "low")


# ---------------------------------------------------------------- the file format


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EventSpec(_Strict):
    at: str | datetime  # ISO 8601 with an offset, or +2d / +36h after the case's start
    type: str
    properties: dict[str, Any] = {}
    id: str | None = None


class ExpectSpec(_Strict):
    template: str
    channel: Literal["email", "sms"] | None = None
    at: str | datetime | None = None  # the customer's local time, YYYY-MM-DD HH:MM


class NeverSpec(_Strict):
    template: str
    channel: Literal["email", "sms"] | None = None


class CaseSpec(_Strict):
    name: str
    start: str | datetime
    run_for: str = "14d"
    customer: dict[str, Any] = {}
    history: list[EventSpec] = []  # before start: folded into facts, start no journey
    events: list[EventSpec] = []
    expect: list[ExpectSpec] = []  # every message the customer gets, no more
    never: list[NeverSpec] = []
    escalated: str | bool | None = None  # a case's priority, or false: none opened


class TestFileSpec(_Strict):
    cases: list[Any]  # each validated as a CaseSpec on its own: every case's mistakes


# ---------------------------------------------------------------- compiled cases


@dataclass(frozen=True)
class TestEvent:
    at: datetime  # UTC
    type: str
    properties: dict[str, Any]
    id: str


@dataclass(frozen=True)
class Expected:
    template: str
    channel: str | None
    at: datetime | None  # local wall time (naive), to the minute
    line: int

    def describe(self) -> str:
        channel = self.channel or "any channel"
        when = f" at {self.at:{LOCAL_FORMAT}}" if self.at is not None else ""
        return f"{channel} {self.template}{when}"


@dataclass(frozen=True)
class PlaybookTest:
    """One case of a test file, checked and ready to run."""

    path: str
    line: int
    name: str
    start: datetime
    end: datetime
    customer: CustomerIn
    history: tuple[TestEvent, ...]
    events: tuple[TestEvent, ...]
    expect: tuple[Expected, ...]
    never: tuple[Expected, ...]
    escalated: str | bool | None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.customer.timezone)


def test_files(path: Path) -> list[Path]:
    """The test files a path names: a file, a directory of them, or a rules directory
    (its ``tests/``)."""
    if path.is_file():
        return [path]
    if (path / TESTS_DIR).is_dir():
        path = path / TESTS_DIR
    return sorted(p for p in path.glob("*.yaml") if p.is_file())


def load_tests(files: Sequence[Path], rules: RuleSet) -> list[PlaybookTest]:
    """Every case of ``files``; raises PlaybookTestsInvalid with every mistake at once."""
    problems: list[SourceProblem] = []
    tests: list[PlaybookTest] = []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(SourceProblem(str(path), 1, 1, f"cannot read file: {exc}"))
            continue
        located = load_located(str(path), source)
        spec = validate_shape(located, TestFileSpec) if not located.problems else None
        if spec is not None:
            if not spec.cases:
                located.problems.append(located.at(("cases",), "cases: write at least one case"))
            for index, data in enumerate(spec.cases):
                case = _case_spec(located, index, data)
                test = _compile(located, index, case, rules) if case is not None else None
                if test is not None:
                    tests.append(test)
        problems.extend(located.problems)
    if problems:
        raise PlaybookTestsInvalid(problems)
    return tests


def _case_spec(located: Located, index: int, data: Any) -> CaseSpec | None:
    """The case's shape, its errors at their positions. Unknown keys are reported and
    left out, so the rest of the case is still checked (as the rules loader does)."""
    where = ("cases", index)
    try:
        return CaseSpec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
    for error in errors:
        loc = (*where, *error["loc"])
        label = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            model = _model_of(error["loc"][:-1])
            allowed = ", ".join(model.model_fields) if model else ""
            hint = _did_you_mean(str(error["loc"][-1]), list(model.model_fields) if model else [])
            message = f"unknown key {str(error['loc'][-1])!r}{hint}; allowed: {allowed}"
            located.problems.append(located.at(loc, message, key=True))
        elif error["type"] == "missing":
            located.problems.append(located.at(loc[:-1], f"missing required key {label!r}"))
        else:
            located.problems.append(located.at(loc, f"{label}: {error['msg']}"))
    if all(error["type"] == "extra_forbidden" for error in errors) and isinstance(data, dict):
        cleaned = copy.deepcopy(data)
        for error in errors:
            _drop(cleaned, tuple(error["loc"]))
        try:
            return CaseSpec.model_validate(cleaned)
        except ValidationError:
            return None
    return None


def _model_of(where: tuple[Any, ...]) -> type[BaseModel] | None:
    """The part of a case at ``where`` (for the keys a did-you-mean offers)."""
    models: dict[str, type[BaseModel]] = {
        "history": EventSpec,
        "events": EventSpec,
        "expect": ExpectSpec,
        "never": NeverSpec,
    }
    named = [part for part in where if isinstance(part, str)]
    if not named:
        return CaseSpec
    return models.get(named[0]) if len(named) == 1 else None


def _drop(data: Any, where: tuple[Any, ...]) -> None:
    for part in where[:-1]:
        data = data[part]
    data.pop(where[-1], None)


def _compile(located: Located, index: int, case: CaseSpec, rules: RuleSet) -> PlaybookTest | None:
    where = ("cases", index)
    before = len(located.problems)
    start = _moment(located, (*where, "start"), case.start)
    try:
        run_for = parse_duration(case.run_for)
    except DurationError as exc:
        located.problems.append(located.at((*where, "run_for"), str(exc)))
        run_for = timedelta(0)
    customer = _customer(located, (*where, "customer"), case.customer, rules)
    history = tuple(
        e
        for i, spec in enumerate(case.history)
        if (e := _event(located, (*where, "history", i), spec, start, rules, index)) is not None
    )
    events = tuple(
        e
        for i, spec in enumerate(case.events)
        if (e := _event(located, (*where, "events", i), spec, start, rules, index)) is not None
    )
    if start is not None:
        end = start + run_for
        for i, event in enumerate(history):
            if event.at >= start:
                located.problems.append(
                    located.at(
                        (*where, "history", i, "at"),
                        "a history event happens before the case's start; "
                        "put this one under events",
                    )
                )
        for i, event in enumerate(events):
            if not start <= event.at <= end:
                located.problems.append(
                    located.at(
                        (*where, "events", i, "at"),
                        f"happens outside the run ({start:%Y-%m-%dT%H:%MZ} for {case.run_for})",
                    )
                )
    expect = tuple(
        _expected(located, (*where, "expect", i), spec.template, spec.channel, spec.at, rules)
        for i, spec in enumerate(case.expect)
    )
    never = tuple(
        _expected(located, (*where, "never", i), spec.template, spec.channel, None, rules)
        for i, spec in enumerate(case.never)
    )
    escalated = case.escalated
    if isinstance(escalated, str) and escalated not in PRIORITIES:
        located.problems.append(
            located.at(
                (*where, "escalated"),
                f"escalated: {escalated!r} is not a priority; write one of "
                f"{', '.join(PRIORITIES)}, or false for no case",
            )
        )
    if escalated is True:
        located.problems.append(
            located.at(
                (*where, "escalated"),
                f"escalated: write the case's priority ({', '.join(PRIORITIES)}), or false",
            )
        )
    if len(located.problems) > before or start is None or customer is None:
        return None
    return PlaybookTest(
        path=located.path,
        line=located.values.get(where, (1, 1))[0],
        name=case.name,
        start=start,
        end=start + run_for,
        customer=customer,
        history=history,
        events=events,
        expect=expect,
        never=never,
        escalated=escalated,
    )


def _moment(located: Located, where: tuple[Any, ...], value: str | datetime) -> datetime | None:
    """An ISO 8601 moment with a UTC offset (YAML may already have made it a datetime)."""
    moment: str | datetime | None = value
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            moment = None
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        located.problems.append(
            located.at(
                where,
                f"{value!s} is not a moment with a UTC offset, like 2026-03-02T09:00:00Z",
            )
        )
        return None
    return moment.astimezone(UTC)


def _customer(
    located: Located, where: tuple[Any, ...], data: dict[str, Any], rules: RuleSet
) -> CustomerIn | None:
    values = {"id": DEFAULT_CUSTOMER, **data}
    try:
        customer = CustomerIn.model_validate(values, context=ingest_context(None))
    except ValidationError as exc:
        for error in exc.errors():
            loc = (*where, *error["loc"])
            name = ".".join(str(part) for part in error["loc"])
            if error["type"] == "extra_forbidden":
                allowed = ", ".join(CustomerIn.model_fields)
                hint = _did_you_mean(name, list(CustomerIn.model_fields))
                located.problems.append(
                    located.at(
                        loc, f"customer: unknown key {name!r}{hint}; allowed: {allowed}", key=True
                    )
                )
            else:
                located.problems.append(located.at(loc, f"customer.{name}: {error['msg']}"))
        return None
    found = False
    for problem in check_attributes(customer.attributes, rules.catalog):
        name = problem.split(":", 1)[0]
        located.problems.append(located.at((*where, *name.split(".")), f"customer.{problem}"))
        found = True
    for topic in customer.topics:
        if topic not in rules.catalog.topics:
            hint = _did_you_mean(topic, sorted(rules.catalog.topics))
            located.problems.append(
                located.at(
                    (*where, "topics", topic),
                    f"customer.topics: unknown topic {topic!r}{hint}; declare it in catalog.yaml",
                    key=True,
                )
            )
            found = True
    return None if found else customer


def _event(
    located: Located,
    where: tuple[Any, ...],
    spec: EventSpec,
    start: datetime | None,
    rules: RuleSet,
    case_index: int,
) -> TestEvent | None:
    at: datetime | None = None
    if isinstance(spec.at, str) and spec.at.strip().startswith("+"):
        try:
            delta = parse_duration(spec.at.strip()[1:])
        except DurationError as exc:
            located.problems.append(located.at((*where, "at"), str(exc)))
        else:
            at = start + delta if start is not None else None  # the start's problem is told
    else:
        at = _moment(located, (*where, "at"), spec.at)
    event_id = spec.id or f"test-{case_index}-{'-'.join(str(p) for p in where[2:])}"
    try:
        event = EventIn(
            id=event_id,
            customer_id=DEFAULT_CUSTOMER,
            type=spec.type,
            occurred_at=at or datetime(2000, 1, 1, tzinfo=UTC),  # checked even when at is not
            properties=spec.properties,
        )
    except ValidationError as exc:
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"])
            located.problems.append(located.at((*where, *error["loc"]), f"{name}: {error['msg']}"))
        return None
    problems = check_event_properties(event, rules.catalog)
    for problem in problems:
        name = problem.split(":", 1)[0]
        located.problems.append(located.at((*where, *name.split(".")), problem))
    if problems or at is None:
        return None
    return TestEvent(at=at, type=spec.type, properties=dict(spec.properties), id=event_id)


def _expected(
    located: Located,
    where: tuple[Any, ...],
    template: str,
    channel: str | None,
    at: str | datetime | None,
    rules: RuleSet,
) -> Expected:
    sent = sorted(
        {
            (step.send.channel, step.send.template)
            for playbook in rules.playbooks.values()
            for step in playbook.steps
            if step.send is not None
        }
    )
    if not any(t == template and (channel is None or c == channel) for c, t in sent):
        names = sorted({t for c, t in sent if channel is None or c == channel})
        hint = _did_you_mean(template, names)
        on = f" on {channel}" if channel else ""
        located.problems.append(
            located.at(
                (*where, "template"),
                f"no playbook sends template {template!r}{on}{hint}; "
                f"the playbooks send: {', '.join(names) or 'nothing'}",
            )
        )
    local = None
    if at is not None:
        local = _local(at)
        if local is None:
            located.problems.append(
                located.at(
                    (*where, "at"),
                    f"{at!s} is not a local time like 2026-03-02 09:00 (the customer's time zone)",
                )
            )
    line = located.values.get(where, (1, 1))[0]
    return Expected(template, channel, local, line)


def _local(value: str | datetime) -> datetime | None:
    if isinstance(value, datetime):
        return None if value.tzinfo is not None else value.replace(second=0, microsecond=0)
    try:
        return datetime.strptime(value.strip(), LOCAL_FORMAT)
    except ValueError:
        return None


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------- running a case


@dataclass(frozen=True)
class SentMessage:
    message_id: str
    playbook: str
    step_id: str
    channel: str
    template: str
    at: datetime  # UTC
    local: datetime  # the customer's wall time, to the minute

    def describe(self) -> str:
        return f"{self.channel} {self.template} at {self.local:{LOCAL_FORMAT}}"


@dataclass(frozen=True)
class Why:
    """A decision, as a line of the diff."""

    at: datetime
    playbook: str
    step_id: str | None
    outcome: str
    reason: str
    message_id: str | None


@dataclass
class TestOutcome:
    """A case after its run: what was sent, and the lines of the diff (none: passed)."""

    test: PlaybookTest
    sent: list[SentMessage] = field(default_factory=list)
    diff: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.diff


class Scratch:
    """Migrated once, copied for each case: every case starts on an empty database."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.template = directory / "migrated.db"
        engine = make_engine(f"sqlite:///{self.template}")
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        self.count = 0

    @contextmanager
    def database(self) -> Iterator[Engine]:
        self.count += 1
        target = self.directory / f"case-{self.count}.db"
        shutil.copyfile(self.template, target)
        engine = make_engine(f"sqlite:///{target}")
        try:
            yield engine
        finally:
            engine.dispose()
            target.unlink(missing_ok=True)


@contextmanager
def scratch() -> Iterator[Scratch]:
    directory = Path(tempfile.mkdtemp(prefix="lifecycle-rules-test-"))
    try:
        yield Scratch(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_test(test: PlaybookTest, rules: RuleSet, settings: Settings, where: Scratch) -> TestOutcome:
    """Run one case on a fresh database and compare what was sent with what it expects."""
    with where.database() as db:
        memory = MemoryChannel()
        copy = settings.model_copy(
            update={
                "database_url": db.url.render_as_string(hide_password=False),
                "email_channel": "console",
                "sms_channel": "console",
            }
        )
        app = bootstrap(copy, db=db, channels={"email": memory, "sms": memory}, migrate=False)
        _begin(app.db, test)
        now = test.start
        pending = sorted(test.events, key=lambda e: (e.at, e.id))
        while True:
            pending = _record_due(app.db, test, pending, now)
            evaluation_tick(app, now, full=True, workers=0, rules=rules)
            sla_tick(app, now, rules=rules)
            dispatch_tick(app, now, rules=rules)
            following = _next_moment(app.db, now, test.end, pending)
            if following is None:
                break
            now = following
        return _outcome(app.db, test, rules)


def _begin(db: Engine, test: PlaybookTest) -> None:
    with unit_of_work(db) as session:
        upsert_customer(session, test.customer, test.start)
        session.flush()
        if test.history:
            batch = [_event_in(test, e) for e in test.history]
            record_events(session, batch, test.start, history=True)


def _event_in(test: PlaybookTest, event: TestEvent) -> EventIn:
    return EventIn(
        id=event.id,
        customer_id=test.customer.id,
        type=event.type,
        occurred_at=event.at,
        properties=event.properties,
    )


def _record_due(
    db: Engine, test: PlaybookTest, pending: list[TestEvent], now: datetime
) -> list[TestEvent]:
    due = [e for e in pending if e.at <= now]
    if due:
        with unit_of_work(db) as session:
            for event in due:
                record_event(session, _event_in(test, event), event.at)
    return [e for e in pending if e.at > now]


_NEXT_DUE = text(
    "SELECT min(due) FROM ("
    " SELECT min(next_due_at) AS due FROM enrollments WHERE status = 'active' AND next_due_at > :now"
    " UNION ALL SELECT min(due_at) FROM messages WHERE status = 'queued' AND due_at > :now"
    " UNION ALL SELECT min(sla_due_at) FROM escalations"
    "  WHERE status != 'resolved' AND sla_due_at > :now) AS due_times"
)


def _next_moment(
    db: Engine, now: datetime, end: datetime, pending: Sequence[TestEvent]
) -> datetime | None:
    """The next moment the clock stops at: an event, the top of the next hour, or
    something due; None past the end."""
    hour = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    candidates = [hour]
    if pending:
        candidates.append(pending[0].at)
    with reading(db) as session:
        due = session.execute(_NEXT_DUE, {"now": session_moment(session, now)}).scalar()
    if due is not None:
        due_at = as_utc(datetime.fromisoformat(due) if isinstance(due, str) else due)
        if due_at > now:
            candidates.append(due_at)
    following = min(candidates)
    if following > end:
        return end if now < end else None
    return following


def _outcome(db: Engine, test: PlaybookTest, rules: RuleSet) -> TestOutcome:
    zone = test.zone
    customer_id = test.customer.id
    with reading(db) as session:
        rows = session.scalars(
            select(Message)
            .where(
                col(Message.customer_id) == customer_id,
                col(Message.kind) != "staff",
                col(Message.status).in_(SENT),
            )
            .order_by(col(Message.sent_at), col(Message.id))
        ).all()
        sent = [
            SentMessage(
                message_id=m.id,
                playbook=m.playbook or "",
                step_id=m.step_id or "",
                channel=m.channel,
                template=m.template,
                at=as_utc(m.sent_at or m.due_at),
                local=as_utc(m.sent_at or m.due_at)
                .astimezone(zone)
                .replace(tzinfo=None, second=0, microsecond=0),
            )
            for m in rows
        ]
        decisions = [
            Why(as_utc(d.at), d.playbook, d.step_id, d.outcome, d.reason, d.message_id)
            for d in session.scalars(
                select(Decision)
                .where(col(Decision.customer_id) == customer_id)
                .order_by(col(Decision.at), col(Decision.id))
            )
        ]
        cases = list(
            session.scalars(
                select(Escalation)
                .where(col(Escalation.customer_id) == customer_id)
                .order_by(col(Escalation.id))
            )
        )
        entry_reasons = {
            p["playbook"]: p["checks"][0]["why"] if p["checks"] else p["state"]
            for p in explain_customer(session, rules, customer_id, test.end)["playbooks"]
        }
    outcome = TestOutcome(test, sent)
    outcome.diff = compare(test, sent, decisions, rules, entry_reasons)
    outcome.diff.extend(_case_diff(test, cases))
    return outcome


# ---------------------------------------------------------------- the diff


def compare(
    test: PlaybookTest,
    sent: Sequence[SentMessage],
    decisions: Sequence[Why],
    rules: RuleSet,
    entry_reasons: dict[str, str],
) -> list[str]:
    """The diff of expected and sent messages: ``-`` expected and not sent as expected,
    ``+`` sent and not expected (or forbidden by ``never``), each followed by the
    decision that explains it. Empty when the case passes."""
    zone = test.customer.timezone
    lines: list[str] = []
    left = list(sent)
    unmatched: list[Expected] = []
    for expected in test.expect:
        found = next((s for s in left if _fits(expected, s, timed=True)), None)
        if found is None:
            unmatched.append(expected)
        else:
            left.remove(found)
    for expected in unmatched:
        near = next((s for s in left if _fits(expected, s, timed=False)), None)
        lines.append(f"- expected {expected.describe()} ({zone}) (line {expected.line})")
        if near is not None:
            left.remove(near)
            lines.append(f"+ sent     {near.describe()}")
            lines.extend(_why_sent(near, decisions, zone))
        else:
            lines.append("+ sent     nothing like it")
            lines.extend(_why_not_sent(expected, decisions, rules, entry_reasons, zone))
    for message in left:
        lines.append(f"+ sent     {message.describe()}, which the case does not expect")
        lines.extend(_why_sent(message, decisions, zone))
    for forbidden in test.never:
        for message in sent:
            if _fits(forbidden, message, timed=False):
                lines.append(
                    f"+ sent     {message.describe()}, which `never` forbids "
                    f"(line {forbidden.line})"
                )
                lines.extend(_why_sent(message, decisions, zone))
    return lines


def _fits(expected: Expected, message: SentMessage, *, timed: bool) -> bool:
    if expected.template != message.template:
        return False
    if expected.channel is not None and expected.channel != message.channel:
        return False
    return not timed or expected.at is None or expected.at == message.local


def _line(why: Why, zone: str) -> str:
    local = why.at.astimezone(ZoneInfo(zone))
    step = f"/{why.step_id}" if why.step_id else ""
    return f"    why: {why.playbook}{step} {why.outcome} at {local:{LOCAL_FORMAT}}: {why.reason}"


def _why_sent(message: SentMessage, decisions: Sequence[Why], zone: str) -> list[str]:
    """The decisions of the message's step: how it was queued (and held, if it was)."""
    found = [
        d
        for d in decisions
        if d.message_id == message.message_id
        or (d.playbook == message.playbook and d.step_id == message.step_id)
    ]
    return [_line(d, zone) for d in found[-3:]] or ["    why: no decision names this message"]


def _why_not_sent(
    expected: Expected,
    decisions: Sequence[Why],
    rules: RuleSet,
    entry_reasons: dict[str, str],
    zone: str,
) -> list[str]:
    """The latest decision of each step that sends the template; for a playbook never
    entered, why its enter condition did not hold."""
    lines: list[str] = []
    for playbook in sorted(rules.playbooks.values(), key=lambda p: p.id):
        steps = [
            s.id
            for s in playbook.steps
            if s.send is not None
            and s.send.template == expected.template
            and (expected.channel is None or s.send.channel == expected.channel)
        ]
        if not steps:
            continue
        mine = [d for d in decisions if d.playbook == playbook.id]
        of_step = [d for d in mine if d.step_id in steps]
        if of_step:
            lines.append(_line(of_step[-1], zone))
        elif mine:
            lines.append(
                f"    why: {playbook.id} never reached step {', '.join(steps)}; its last decision:"
            )
            lines.append(_line(mine[-1], zone))
        else:
            reason = entry_reasons.get(playbook.id, "")
            lines.append(f"    why: {playbook.id} was never entered: {reason}")
    return lines


def _case_diff(test: PlaybookTest, cases: Sequence[Escalation]) -> list[str]:
    if test.escalated is None:
        return []
    if test.escalated is False:
        return [f"+ case opened with priority {c.priority} ({c.reason})" for c in cases][:1]
    priorities = [c.priority for c in cases]
    if test.escalated in priorities:
        return []
    found = ", ".join(priorities) if priorities else "no case was opened"
    return [f"- expected a case of priority {test.escalated}", f"+ got      {found}"]

"""Rule files: load, validate (every mistake at once, with ``path:line:col``) and compile.

A rules directory holds:

    catalog.yaml       customer attributes and event types (with their properties)
    policies.yaml      sending windows, frequency caps and the brand shown in messages
    <playbook>.yaml    one playbook per file (see README, "Writing playbooks")

``load_rules`` either returns a complete, valid ``RuleSet`` or raises ``RulesInvalid`` with
all the problems; a running engine keeps its last good ``RuleSet`` when that happens.
Warnings (``SourceProblem(warning=True)``: a deprecated key) do not stop the rules; they
travel on the ``RuleSet`` (and on ``RulesInvalid``) for ``rules check`` to print.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import re
from dataclasses import replace
from datetime import time, timedelta
from pathlib import Path
from typing import Any

from babel.numbers import list_currencies
from pydantic import BaseModel, ValidationError

from engine.delivery.sms_segments import segments
from engine.delivery.templates import (
    DEFAULT_LOCALE,
    RenderedEmail,
    RenderedSms,
    TemplateStore,
    sample_context,
)
from engine.errors import (
    ConditionSyntaxError,
    DurationError,
    RulesInvalid,
    SourceProblem,
    TemplateError,
)
from engine.evaluation.evaluators import network_problem
from engine.language import conditions
from engine.language.catalog import (
    EVENT_PROPERTY_PREFIX,
    FactCatalog,
    FactSource,
    FactSpec,
    FactType,
    Topic,
)
from engine.language.conditions import Condition
from engine.language.durations import parse_duration
from engine.playbooks.model import (
    CHANNELS,
    END,
    PRIORITIES,
    RESERVED_ARMS,
    Arm,
    Branch,
    Escalate,
    FrequencyCap,
    Lead,
    Playbook,
    Policies,
    PriorityBy,
    Roster,
    RuleSet,
    Send,
    SendWindow,
    Split,
    Step,
    WaitFor,
)
from engine.playbooks.schema import (
    DEFAULT_SEND_WINDOW,
    CatalogSpec,
    EscalateSpec,
    GoalSpec,
    PlaybookSpec,
    PoliciesSpec,
    PriorityBySpec,
    RosterSpec,
    SendSpec,
    StagesSpec,
    StepSpec,
)
from engine.playbooks.yaml_source import Located, load_located
from engine.stages.model import STAGE_FACTS, Stage, StageModel

EVENT_ONLY_FACTS = ("event", "event_days_ago")

# ---------------------------------------------------------------- loading


def _validate(located: Located, model: type[BaseModel]) -> Any:
    """Pydantic checks the shape; its errors are mapped back to file positions.

    Unknown keys are reported and then left out, so the rest of the file is still
    checked and every mistake is reported in one run; any other shape error stops the
    checks of that file (what follows would only repeat it).
    """
    data = copy.deepcopy(located.data) if located.data is not None else {}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
    for error in errors:
        located.problems.append(_shape_problem(located, model, error))
    if all(error["type"] == "extra_forbidden" for error in errors):
        for error in errors:
            _remove(data, tuple(error["loc"]))
        try:
            return model.model_validate(data)
        except ValidationError:
            return None
    return None


def validate_shape(located: Located, model: type[BaseModel]) -> Any:
    """The model of ``located``, its shape errors added to ``located.problems`` at their
    positions (None when it does not fit): for other YAML files marketers write, like
    the playbook tests."""
    return _validate(located, model)


def _remove(data: Any, where: tuple[Any, ...]) -> None:
    for part in where[:-1]:
        data = data[part]
    data.pop(where[-1], None)


def _shape_problem(located: Located, model: type[BaseModel], error: Any) -> SourceProblem:
    where = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        name = str(where[-1])
        parent = _model_at(model, where[:-1])
        hint = _did_you_mean(name, list(parent.model_fields) if parent else [])
        allowed = ", ".join(parent.model_fields) if parent else ""
        return located.at(where, f"unknown key {name!r}{hint}; allowed: {allowed}", key=True)
    if error["type"] == "missing":
        return located.at(where[:-1], f"missing required key {where[-1]!r}")
    label = ".".join(str(p) for p in where) or "file"
    return located.at(where, f"{label}: {error['msg']}")


def _model_at(model: type[BaseModel], where: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that sits at a path, to list its keys in a did-you-mean."""
    current: Any = model
    for part in where:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field_info = current.model_fields.get(str(part))
        if field_info is None:
            return None
        annotation = field_info.annotation
        current = _unwrap(annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    for arg in getattr(annotation, "__args__", ()) or ():
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read(path: Path, problems: list[SourceProblem], display: str) -> Located | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(SourceProblem(display, 1, 1, f"cannot read file: {exc}"))
        return None
    located = load_located(display, text)
    return located


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _parse_clock_range(text: str) -> SendWindow:
    try:
        start_text, end_text = text.split("-")
        start = time.fromisoformat(start_text.strip())
        end = time.fromisoformat(end_text.strip())
    except ValueError as exc:
        raise ValueError(f"bad sending window {text!r}: write it like 08:00-21:00") from exc
    if start == end:
        raise ValueError(f"bad sending window {text!r}: start and end are the same")
    return SendWindow(start=start, end=end)


def _send_window_spec(
    located: Located,
    send_window: dict[str, str | None] | None,
    quiet_hours: dict[str, str | None] | None,
) -> tuple[str, dict[str, str | None] | None]:
    """The sending windows a file gives and the key they are under. ``quiet_hours`` is the
    old name of ``send_window`` (it always held the hours when sending is allowed): still
    read, with a warning; both at once is a mistake."""
    if quiet_hours is None:
        return "send_window", send_window
    if send_window is not None:
        located.problems.append(
            located.at(
                ("quiet_hours",),
                "both send_window and quiet_hours are given: quiet_hours is the old name of "
                "send_window; keep send_window only",
                key=True,
            )
        )
        return "send_window", send_window
    warning = located.at(
        ("quiet_hours",),
        "quiet_hours is deprecated: it holds the hours when sending is allowed, so it is now "
        "called send_window; rename the key (the meaning is the same)",
        key=True,
    )
    located.problems.append(replace(warning, warning=True))
    return "quiet_hours", quiet_hours


def _send_windows(
    located: Located, where: tuple[str, ...], spec: dict[str, str | None]
) -> dict[str, SendWindow | None]:
    result: dict[str, SendWindow | None] = {}
    for channel, window in spec.items():
        if channel not in CHANNELS:
            located.problems.append(
                located.at(
                    (*where, channel),
                    f"unknown channel {channel!r}{_did_you_mean(channel, list(CHANNELS))}",
                    key=True,
                )
            )
            continue
        if window is None:
            result[channel] = None
            continue
        try:
            result[channel] = _parse_clock_range(str(window))
        except ValueError as exc:
            located.problems.append(located.at((*where, channel), str(exc)))
    return result


def _duration(located: Located, where: tuple[Any, ...], text: str | None) -> timedelta | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except DurationError as exc:
        located.problems.append(located.at(where, str(exc)))
        return None


def load_catalog(
    directory: Path, problems: list[SourceProblem]
) -> tuple[FactCatalog, Located | None]:
    path = directory / "catalog.yaml"
    if not path.is_file():
        problems.append(SourceProblem(_display(path), 1, 1, "missing catalog file"))
        return FactCatalog.build(), None
    located = _read(path, problems, _display(path))
    if located is None:
        return FactCatalog.build(), None
    spec: CatalogSpec | None = _validate(located, CatalogSpec) if not located.problems else None
    problems.extend(located.problems)
    if spec is None:
        return FactCatalog.build(), located
    builtins = FactCatalog.build()
    extra: list[FactSpec] = []
    for name, attr in spec.attributes.items():
        if builtins.get(name):
            problems.append(
                located.at(("attributes", name), f"{name!r} is a built-in fact", key=True)
            )
            continue
        extra.append(
            FactSpec(name, attr.type, attr.description, FactSource.ATTRIBUTE, attr.example)
        )
    properties: dict[str, FactSpec] = {}
    for event_type, event_spec in spec.events.items():
        for prop, attr in event_spec.properties.items():
            name = EVENT_PROPERTY_PREFIX + prop
            earlier = properties.get(name)
            if earlier and earlier.type != attr.type:
                problems.append(
                    located.at(
                        ("events", event_type, "properties", prop),
                        f"event property {prop!r} is {attr.type} here but {earlier.type} elsewhere",
                    )
                )
                continue
            properties[name] = FactSpec(
                name, attr.type, attr.description, FactSource.EVENT, attr.example
            )
    topics: list[Topic] = []
    for name, topic in spec.topics.items():
        if not _TOPIC_NAME.match(name):
            problems.append(
                located.at(
                    ("topics", name),
                    f"topic {name!r}: write a name of lower-case letters, digits and _, like "
                    "product_news",
                    key=True,
                )
            )
            continue
        topics.append(Topic(name, topic.description, topic.default == "opted_in"))
    catalog = FactCatalog.build(
        [*extra, *properties.values()], event_types=spec.events, topics=topics
    )
    return catalog, located


_TOPIC_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_CURRENCIES = frozenset(list_currencies())


ROSTER_FILE = "support_roster.yaml"


def load_roster(path: Path, problems: list[SourceProblem]) -> tuple[Roster, Located | None]:
    """The support leads in ``path``, and the file as read (None when it is missing or
    unreadable). A missing or empty roster is no problem here: it is one only when a
    playbook escalates (see _check_roster_needed)."""
    if not path.is_file():
        return Roster(()), None
    located = _read(path, problems, _display(path))
    if located is None:
        return Roster(()), None
    spec: RosterSpec | None = _validate(located, RosterSpec) if not located.problems else None
    if spec is None:
        problems.extend(located.problems)
        return Roster(()), located
    from engine.data.contacts import normalise_email, normalise_phone

    for i, lead in enumerate(spec.leads):
        try:
            lead.email = normalise_email(lead.email)
        except ValueError as exc:
            located.problems.append(located.at(("leads", i, "email"), str(exc)))
        try:
            if lead.phone is not None:
                lead.phone = normalise_phone(lead.phone)
        except ValueError as exc:
            located.problems.append(located.at(("leads", i, "phone"), str(exc)))
        if lead.tier < 1:
            located.problems.append(located.at(("leads", i, "tier"), "tier must be 1 or more"))
    if spec.leads and not any(lead.on_duty and lead.tier == 1 for lead in spec.leads):
        located.problems.append(located.at(("leads",), "nobody of tier 1 is on duty"))
    problems.extend(located.problems)
    return Roster(tuple(Lead(**lead.model_dump()) for lead in spec.leads)), located


def _check_roster_needed(
    roster: Roster,
    roster_file: Located | None,
    roster_path: Path,
    escalating: list[tuple[Located, int, str, str]],
    problems: list[SourceProblem],
) -> None:
    """A playbook that escalates needs somebody to notify: a missing or empty roster would
    open cases that no support lead ever hears of, so it is a problem, located at each
    escalating step (no roster file) or at the roster (no leads in it)."""
    if roster.leads or not escalating:
        return
    display = _display(roster_path)
    if roster_file is None and not roster_path.exists():
        for located, index, playbook, step in escalating:
            problems.append(
                located.at(
                    ("steps", index, "escalate"),
                    f"step {step!r} of {playbook} escalates, but there is no support roster "
                    f"{display}: nobody would be notified of its cases; list the support "
                    "leads there (or point LIFECYCLE_ROSTER_FILE at the roster)",
                )
            )
        return
    if roster_file is None or roster_file.problems:
        return  # unreadable or malformed: that problem is reported already
    names = ", ".join(sorted({playbook for _, _, playbook, _ in escalating}))
    problems.append(
        roster_file.at(
            ("leads",),
            f"no support leads: nobody would be notified of the cases that {names} "
            "opens; list at least one lead of tier 1 on duty",
        )
    )


def load_policies(directory: Path, problems: list[SourceProblem]) -> Policies:
    path = directory / "policies.yaml"
    fallback = Policies({"sms": SendWindow(time(8), time(21))}, (), {"name": "", "address": ""})
    if not path.is_file():
        problems.append(SourceProblem(_display(path), 1, 1, "missing policies file"))
        return fallback
    located = _read(path, problems, _display(path))
    if located is None:
        return fallback
    spec: PoliciesSpec | None = _validate(located, PoliciesSpec) if not located.problems else None
    if spec is None:
        problems.extend(located.problems)
        return fallback
    key, windows = _send_window_spec(located, spec.send_window, spec.quiet_hours)
    send_window = _send_windows(
        located, (key,), windows if windows is not None else DEFAULT_SEND_WINDOW
    )
    caps: list[FrequencyCap] = []
    for i, cap in enumerate(spec.frequency_caps):
        per = _duration(located, ("frequency_caps", i, "per"), cap.per)
        if cap.max < 1:
            located.problems.append(
                located.at(("frequency_caps", i, "max"), "max must be at least 1")
            )
        elif per is not None:
            caps.append(FrequencyCap(cap.channel, cap.max, per))
    control = _share(located, ("control_group",), spec.control_group)
    if spec.currency not in _CURRENCIES:
        hint = _did_you_mean(spec.currency.upper(), sorted(_CURRENCIES))
        located.problems.append(
            located.at(
                ("currency",),
                f"unknown currency {spec.currency!r}{hint}: write an ISO 4217 code like USD, "
                "GBP or EUR",
            )
        )
    problems.extend(located.problems)
    return Policies(
        send_window, tuple(caps), spec.brand.model_dump(), control or 0.0, spec.currency
    )


class _ConditionChecker:
    """Parses and type-checks one condition, reporting at its place in the file."""

    def __init__(
        self,
        located: Located,
        catalog: FactCatalog,
        stages: tuple[str, ...] | None = None,
        *,
        check_stages: bool = True,
    ) -> None:
        self.located = located
        self.catalog = catalog
        self.stages = stages  # the stage model's names; None: there is no stage model
        # False when stages.yaml is there but broken: its own problems say enough.
        self.check_stages = check_stages

    def compile(
        self, where: tuple[Any, ...], text: str | None, *, allow_event: bool
    ) -> Condition | None:
        if text is None:
            return None
        text = str(text)
        try:
            expr = conditions.parse(text)
        except ConditionSyntaxError as exc:
            for error in exc.errors:
                self._report(where, error.offset, error.message)
            return None
        found = conditions.check(expr, self.catalog)
        for problem in found:
            self._report(where, problem.offset, problem.message)
        if found:
            return None
        condition = conditions.compile_condition(text, self.catalog)
        if not allow_event:
            for name in sorted(condition.facts):
                if name in EVENT_ONLY_FACTS or name.startswith(EVENT_PROPERTY_PREFIX):
                    offset = text.find(name)
                    self._report(
                        where,
                        max(offset, 0),
                        f"{name!r} is only known when the playbook is entered on an event; "
                        "use it in enter.when",
                    )
                    return None
        # Checked whichever evaluator runs: the reference one stands in for durable_rules,
        # so rules that pass here must be rules either can take.
        too_wide = network_problem(condition)
        if too_wide is not None:
            self._report(where, 0, f"durable_rules cannot take this condition: {too_wide}")
            return None
        if not self._stages_known(where, text, condition):
            return None
        return condition

    def _stages_known(self, where: tuple[Any, ...], text: str, condition: Condition) -> bool:
        """``stage == "at_rsk"`` is a mistake the type checker cannot see: a stage fact is
        compared with text that is no stage of rules/stages.yaml."""
        used = sorted(condition.facts & set(STAGE_FACTS), key=lambda name: (text.find(name), name))
        if not used or not self.check_stages:
            return True
        if self.stages is None:
            self._report(
                where,
                max(text.find(used[0]), 0),
                f"{used[0]!r} needs a stage model: add {STAGES_FILE} to the rules directory",
            )
            return False
        good = True
        for atom in conditions.atoms(condition.tree):
            stage_text = atom.fact in ("stage", "previous_stage") and isinstance(atom.value, str)
            if stage_text and atom.value not in self.stages:
                hint = _did_you_mean(str(atom.value), list(self.stages))
                self._report(
                    where,
                    max(text.find(str(atom.value)) - 1, 0),
                    f"unknown stage {atom.value!r}{hint}; the stages are " + ", ".join(self.stages),
                )
                good = False
        return good

    def _report(self, where: tuple[Any, ...], offset: int, message: str) -> None:
        line, column = self.located.condition_column(where, offset)
        self.located.problems.append(SourceProblem(self.located.path, line, column, message))


def _error_count(located: Located) -> int:
    return sum(1 for problem in located.problems if not problem.warning)


def _compile_playbook(
    located: Located,
    spec: PlaybookSpec,
    catalog: FactCatalog,
    templates: TemplateStore,
    policies: Policies,
    seen_ids: dict[str, str],
    stages: StageModel | None = None,
    *,
    check_stages: bool = True,
) -> Playbook | None:
    before = _error_count(located)
    checker = _ConditionChecker(
        located, catalog, stages.names if stages else None, check_stages=check_stages
    )
    if spec.playbook in seen_ids:
        located.problems.append(
            located.at(
                ("playbook",),
                f"playbook id {spec.playbook!r} is also used in {seen_ids[spec.playbook]}",
            )
        )
    if spec.enter.on is not None and spec.enter.on not in catalog.event_types:
        hint = _did_you_mean(spec.enter.on, sorted(catalog.event_types))
        located.problems.append(
            located.at(
                ("enter", "on"),
                f"unknown event type {spec.enter.on!r}{hint}; declare it in catalog.yaml",
            )
        )
    _check_topic(located, spec, catalog)
    allow_event = spec.enter.on is not None
    when = checker.compile(("enter", "when"), spec.enter.when, allow_event=allow_event)
    exit_condition = (
        checker.compile(("exit", "when"), spec.exit.when, allow_event=False) if spec.exit else None
    )
    goal, goal_event, goal_within = _compile_goal(located, spec, checker, catalog)
    holdout = _share(located, ("holdout",), spec.holdout)
    reentry: timedelta | None = None
    if spec.reentry != "never":
        text = (
            spec.reentry.removeprefix("after").strip() if spec.reentry.startswith("after") else ""
        )
        if not text:
            located.problems.append(
                located.at(("reentry",), f"bad reentry {spec.reentry!r}: write never or after 90d")
            )
        else:
            reentry = _duration(located, ("reentry",), text)
    key, windows = _send_window_spec(located, spec.send_window, spec.quiet_hours)
    send_window = _send_windows(located, (key,), windows or {})
    if spec.max_sms_segments < 1:
        located.problems.append(
            located.at(("max_sms_segments",), "max_sms_segments must be at least 1")
        )
    steps = _compile_steps(located, spec, checker, templates, catalog, policies)
    if _error_count(located) > before or steps is None:
        return None
    enter_text = (
        " and ".join(
            part
            for part in (
                f'event == "{spec.enter.on}"' if spec.enter.on else None,
                f"({spec.enter.when})" if spec.enter.when else None,
            )
            if part
        )
        or "true"
    )
    enter = conditions.compile_condition(enter_text, catalog)
    del when  # checked above at its own position; `enter` is the combined condition
    return Playbook(
        id=spec.playbook,
        stage=spec.stage,
        description=spec.description,
        priority=spec.priority,
        kind=spec.kind,
        enter_on=spec.enter.on,
        enter=enter,
        reentry=reentry,
        exit=exit_condition,
        goal=goal,
        goal_on=spec.goal.event if spec.goal else None,
        goal_event=goal_event,
        goal_within=goal_within,
        goal_text=_goal_text(spec.goal),
        holdout=holdout or 0.0,
        when_capped=spec.when_capped,
        send_window=send_window,
        sms_opt_out_hint=spec.sms_opt_out_hint,
        max_sms_segments=spec.max_sms_segments,
        steps=steps,
        source=located.path,
        topic=spec.topic,
    )


def _goal_text(goal: GoalSpec | None) -> str | None:
    """The goal as the marketer wrote it, for reports: "order_placed within 7d"."""
    if goal is None:
        return None
    if goal.event is None:
        return f"{goal.when} within {goal.within}"
    where = f" where {goal.when}" if goal.when else ""
    return f"{goal.event}{where} within {goal.within}"


def _compile_goal(
    located: Located, spec: PlaybookSpec, checker: _ConditionChecker, catalog: FactCatalog
) -> tuple[Condition | None, Condition | None, timedelta]:
    """A goal is a condition over the facts, or an event (with a condition on it), and
    an attribution window after the last message."""
    default_window = timedelta(days=7)
    goal = spec.goal
    if goal is None:
        return None, None, default_window
    within = _duration(located, ("goal", "within"), goal.within) or default_window
    if goal.event is None:
        if goal.when is None:
            located.problems.append(located.at(("goal",), "a goal needs when, or an event"))
            return None, None, within
        return checker.compile(("goal", "when"), goal.when, allow_event=False), None, within
    if not _known_event(located, ("goal", "event"), goal.event, catalog):
        return None, None, within
    if (
        goal.when is not None
        and checker.compile(("goal", "when"), goal.when, allow_event=True) is None
    ):
        return None, None, within
    return None, _event_condition(goal.event, goal.when, catalog), within


def _event_condition(event: str, when: str | None, catalog: FactCatalog) -> Condition:
    """``event == "<event>" and (<when>)``, compiled (``when`` was checked at its place)."""
    text = f'event == "{event}"' + (f" and ({when})" if when else "")
    return conditions.compile_condition(text, catalog)


def _known_event(
    located: Located, where: tuple[Any, ...], event: str, catalog: FactCatalog
) -> bool:
    if event in catalog.event_types:
        return True
    hint = _did_you_mean(event, sorted(catalog.event_types))
    located.problems.append(
        located.at(where, f"unknown event type {event!r}{hint}; declare it in catalog.yaml")
    )
    return False


def _share(located: Located, where: tuple[Any, ...], text: str | None) -> float | None:
    """A share of customers, written as a percentage: ``10%``, ``2.5%``."""
    if text is None:
        return None
    value = str(text).strip()
    try:
        if not value.endswith("%"):
            raise ValueError
        share = float(value[:-1]) / 100
    except ValueError:
        located.problems.append(
            located.at(where, f"bad share {text!r}: write a percentage like 10%")
        )
        return None
    if not 0 < share < 1:
        located.problems.append(
            located.at(where, f"share {text!r} must be more than 0% and less than 100%")
        )
        return None
    return share


def _check_topic(located: Located, spec: PlaybookSpec, catalog: FactCatalog) -> None:
    """A playbook's topic is declared in catalog.yaml; only marketing has topics (a
    transactional message goes whatever the customer's topics say)."""
    if spec.topic is None:
        return
    if spec.topic not in catalog.topics:
        hint = _did_you_mean(spec.topic, sorted(catalog.topics))
        declared = ", ".join(sorted(catalog.topics)) or "none yet"
        located.problems.append(
            located.at(
                ("topic",),
                f"unknown topic {spec.topic!r}{hint}; declare it under topics: in catalog.yaml "
                f"(declared: {declared})",
            )
        )
    elif spec.kind != "marketing":
        located.problems.append(
            located.at(
                ("topic",),
                f"a {spec.kind} playbook has no topic: its messages go whatever the customer's "
                "topics say; remove topic, or make the playbook kind: marketing",
            )
        )


def _compile_steps(
    located: Located,
    spec: PlaybookSpec,
    checker: _ConditionChecker,
    templates: TemplateStore,
    catalog: FactCatalog,
    policies: Policies,
) -> tuple[Step, ...] | None:
    """Every step, then the journey as a whole: a graph of steps linked by id, checked for
    dangling ids, unreachable steps and cycles that never wait (every problem at once)."""
    steps: list[Step] = []
    ids: dict[str, int] = {}
    ok = True
    for i, step in enumerate(spec.steps):
        where = ("steps", i)
        if step.id in ids:
            located.problems.append(
                located.at(
                    (*where, "id"), f"duplicate step id {step.id!r} (also step {ids[step.id] + 1})"
                )
            )
            ok = False
        if step.id == END:
            located.problems.append(
                located.at((*where, "id"), f"{END!r} is not a step id: it names the journey's end")
            )
            ok = False
        ids.setdefault(step.id, i)
    waited = False  # a step so far waits: the steps from there on run after the event
    for i, step in enumerate(spec.steps):
        following = spec.steps[i + 1].id if i + 1 < len(spec.steps) else END
        # Conservatively in file order: a step after any wait may run after the event.
        waited = waited or bool(step.wait) or step.wait_for is not None
        on_entry = spec.enter.on is not None and not waited
        compiled = _compile_step(
            located, spec, i, following, checker, templates, catalog, policies, on_entry
        )
        if compiled is None:
            ok = False
        else:
            steps.append(compiled)
    if not _check_graph(located, spec.steps, ids):
        ok = False
    return tuple(steps) if ok else None


def _compile_step(
    located: Located,
    spec: PlaybookSpec,
    index: int,
    following: str,
    checker: _ConditionChecker,
    templates: TemplateStore,
    catalog: FactCatalog,
    policies: Policies,
    on_entry: bool,
) -> Step | None:
    """``on_entry``: the step runs as the playbook is entered on an event (no wait before
    it), so the event's properties are known to it."""
    step = spec.steps[index]
    where = ("steps", index)
    before = _error_count(located)
    wait = _duration(located, (*where, "wait"), step.wait) if step.wait else timedelta(0)
    kinds = [
        name
        for name, present in (
            ("send or escalate", step.send is not None or step.escalate is not None),
            ("wait_for", step.wait_for is not None),
            ("branch", step.branch is not None),
            ("split", step.split is not None),
        )
        if present
    ]
    if not kinds:
        located.problems.append(
            located.at(where, f"step {step.id!r} needs send, escalate, wait_for, branch or split")
        )
    elif len(kinds) > 1:
        located.problems.append(
            located.at(where, f"step {step.id!r} has {' and '.join(kinds)}: a step does one thing")
        )
    if step.when is not None and (step.send is None and step.escalate is None):
        located.problems.append(
            located.at((*where, "when"), "when skips an action step; a branch chooses with cases")
        )
    if step.next is not None and (step.wait_for or step.branch or step.split):
        located.problems.append(
            located.at((*where, "next"), "next is for action steps; this step names its own")
        )
    when = checker.compile((*where, "when"), step.when, allow_event=False)
    send = _check_send(located, (*where, "send"), step.send, templates, catalog, policies, spec)
    escalate = _check_escalate(located, (*where, "escalate"), step.escalate, catalog, on_entry)
    wait_for = _compile_wait_for(located, (*where, "wait_for"), step, checker, catalog)
    branch = _compile_branch(located, (*where, "branch"), step, checker)
    split = _compile_split(located, (*where, "split"), step)
    if _error_count(located) > before:
        return None
    return Step(
        step.id,
        wait or timedelta(0),
        when,
        send,
        escalate,
        following=_target(step.next or following),
        wait_for=wait_for,
        branch=branch,
        split=split,
    )


def _target(step_id: str) -> str | None:
    return None if step_id == END else step_id


def _compile_wait_for(
    located: Located,
    where: tuple[Any, ...],
    step: StepSpec,
    checker: _ConditionChecker,
    catalog: FactCatalog,
) -> WaitFor | None:
    spec = step.wait_for
    if spec is None:
        return None
    known = _known_event(located, (*where, "event"), spec.event, catalog)
    within = _duration(located, (*where, "within"), spec.within)
    when_ok = spec.when is None or (
        checker.compile((*where, "when"), spec.when, allow_event=True) is not None
    )
    if not (known and within and when_ok):
        return None
    return WaitFor(
        event=spec.event,
        condition=_event_condition(spec.event, spec.when, catalog),
        within=within,
        then=_target(spec.then),
        otherwise=_target(spec.otherwise),
    )


def _compile_branch(
    located: Located, where: tuple[Any, ...], step: StepSpec, checker: _ConditionChecker
) -> Branch | None:
    spec = step.branch
    if spec is None:
        return None
    cases = []
    for i, case in enumerate(spec.cases):
        condition = checker.compile((*where, "cases", i, "when"), case.when, allow_event=False)
        if condition is not None:
            cases.append((condition, _target(case.goto)))
    if len(cases) < len(spec.cases):
        return None
    return Branch(tuple(cases), _target(spec.otherwise))


def _compile_split(located: Located, where: tuple[Any, ...], step: StepSpec) -> Split | None:
    arms = step.split
    if arms is None:
        return None
    before = _error_count(located)
    if len(arms) < 2:
        located.problems.append(located.at(where, "a split needs at least two arms"))
    names: set[str] = set()
    for i, arm in enumerate(arms):
        if arm.arm in names:
            located.problems.append(located.at((*where, i, "arm"), f"duplicate arm {arm.arm!r}"))
        if arm.arm in RESERVED_ARMS:
            located.problems.append(
                located.at(
                    (*where, i, "arm"), f"{arm.arm!r} names the control groups; pick another"
                )
            )
        names.add(arm.arm)
        if arm.weight < 1:
            located.problems.append(
                located.at((*where, i, "weight"), "a weight is a whole number, 1 or more")
            )
    if _error_count(located) > before:
        return None
    return Split(tuple(Arm(a.arm, a.weight, _target(a.goto)) for a in arms))


def _check_graph(located: Located, steps: list[StepSpec], ids: dict[str, int]) -> bool:
    """Every id a step names exists; every step can be reached from the first; no cycle
    runs without waiting (it would loop within one tick). Checked on the file as written,
    so these problems are reported with every other one."""
    before = _error_count(located)
    known = {step.id for step in steps}
    links = {step.id: _links(index, step) for index, step in enumerate(steps)}
    for step in steps:
        for where, target in links[step.id]:
            if target != END and target not in known:
                hint = _did_you_mean(target, sorted(known))
                located.problems.append(
                    located.at(where, f"no step {target!r} in this playbook{hint}")
                )
    successors = {
        step.id: [t for _, t in links[step.id] if t != END and t in known] for step in steps
    }
    for index, step in enumerate(steps):
        is_action = not (step.wait_for or step.branch or step.split)
        if is_action and step.next is None and index + 1 < len(steps):
            successors[step.id].append(steps[index + 1].id)  # on to the step listed next
    reached = {steps[0].id}
    frontier = [steps[0].id]
    while frontier:
        for target in successors[frontier.pop()]:
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    for step in steps:
        if step.id not in reached:
            located.problems.append(
                located.at(
                    ("steps", ids[step.id], "id"),
                    f"step {step.id!r} is never reached from the first step",
                )
            )
    instant = {
        step.id: [t for t in successors[step.id] if not _waits(by_id[t])]
        for by_id in [{s.id: s for s in steps}]
        for step in steps
        if step.wait_for is None  # a wait for an event always waits
    }
    cycle = _cycle(instant)
    if cycle:
        located.problems.append(
            located.at(
                ("steps", ids[cycle[0]], "id"),
                "these steps loop without waiting: "
                + " -> ".join([*cycle, cycle[0]])
                + " (give one of them a wait)",
            )
        )
    return _error_count(located) == before


def _waits(step: StepSpec) -> bool:
    """Reaching this step waits: a wait (one that does not parse is reported elsewhere
    and counts as waiting here), or a wait for an event."""
    if step.wait_for is not None:
        return True
    if not step.wait:
        return False
    try:
        return parse_duration(step.wait) > timedelta(0)
    except DurationError:
        return True


def _links(index: int, step: StepSpec) -> list[tuple[tuple[Any, ...], str]]:
    """Each id a step names, with where it is written (an action step without ``next``
    goes on to the step listed after it, which needs no checking)."""
    where: tuple[Any, ...] = ("steps", index)
    if step.wait_for is not None:
        return [
            ((*where, "wait_for", "then"), step.wait_for.then),
            ((*where, "wait_for", "otherwise"), step.wait_for.otherwise),
        ]
    if step.branch is not None:
        return [
            ((*where, "branch", "cases", i, "goto"), case.goto)
            for i, case in enumerate(step.branch.cases)
        ] + [((*where, "branch", "otherwise"), step.branch.otherwise)]
    if step.split is not None:
        return [((*where, "split", i, "goto"), arm.goto) for i, arm in enumerate(step.split)]
    if step.next is not None:
        return [((*where, "next"), step.next)]
    return []


def _cycle(graph: dict[str, list[str]]) -> list[str]:
    """A cycle in ``graph``, if it has one (a depth-first search)."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in graph.get(node, ()):
            if state.get(target) == 1:
                return path[path.index(target) :]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in graph:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def _check_send(
    located: Located,
    where: tuple[Any, ...],
    send: SendSpec | None,
    templates: TemplateStore,
    catalog: FactCatalog,
    policies: Policies,
    spec: PlaybookSpec,
) -> Send | None:
    if send is None:
        return None
    if send.channel not in CHANNELS:
        hint = _did_you_mean(send.channel, list(CHANNELS))
        located.problems.append(
            located.at((*where, "channel"), f"unknown channel {send.channel!r}{hint}")
        )
        return None
    missing = templates.missing_parts(send.channel, send.template)
    if missing:
        hint = _did_you_mean(send.template, templates.names(send.channel))
        located.problems.append(
            located.at(
                (*where, "template"),
                f"unknown {send.channel} template {send.template!r}{hint}: missing {', '.join(missing)}",
            )
        )
        return None
    context = sample_context(catalog.sample_facts())
    context["brand"] = policies.brand
    context["event"] = {
        s.name.removeprefix(EVENT_PROPERTY_PREFIX): s.example for s in catalog.event_properties()
    }
    # The default, then every locale variant, as a customer of that locale would get it.
    ok = True
    for variant in [None, *templates.locales(send.channel, send.template)]:
        context["customer"] = {**context["customer"], "locale": variant or DEFAULT_LOCALE}
        try:
            rendered = templates.render(
                send.channel, send.template, context, currency=policies.currency, variant=variant
            )
        except TemplateError as exc:
            located.problems.append(
                _template_problem(located, (*where, "template"), templates, exc)
            )
            ok = False
            continue
        if send.channel == "sms" and not _sms_fits(located, where, send, spec, rendered, variant):
            ok = False
    return Send(send.channel, send.template) if ok else None


def _sms_fits(
    located: Located,
    where: tuple[Any, ...],
    send: SendSpec,
    spec: PlaybookSpec,
    rendered: RenderedEmail | RenderedSms,
    variant: str | None,
) -> bool:
    assert isinstance(rendered, RenderedSms)
    body = rendered.body
    if spec.sms_opt_out_hint:
        body = f"{body} {spec.sms_opt_out_hint}"
    counted = segments(body)
    if counted.segments <= spec.max_sms_segments:
        return True
    which = f"SMS {send.template!r}" + (f" ({variant} variant)" if variant else "")
    located.problems.append(
        located.at(
            (*where, "template"),
            f"{which} is {counted.segments} segments ({counted.encoding}, "
            f"{counted.characters} characters with the opt-out hint) but the playbook allows "
            f"{spec.max_sms_segments}",
        )
    )
    return False


def _template_problem(
    located: Located, where: tuple[Any, ...], templates: TemplateStore, exc: TemplateError
) -> SourceProblem:
    """At the template's own file and line when the error has one (a line of a template
    that fails or does too much work), else at the step that names the template."""
    step = located.at(where, "")
    if exc.line is None:
        return located.at(where, f"template does not render: {exc}")
    path = _display(templates.directory / exc.template)
    used_by = f"{step.path}:{step.line}:{step.column}"
    return SourceProblem(
        path, exc.line, 1, f"template does not render: {exc.message} (used by {used_by})"
    )


def _check_escalate(
    located: Located,
    where: tuple[Any, ...],
    spec: EscalateSpec | None,
    catalog: FactCatalog,
    on_entry: bool,
) -> Escalate | None:
    """``on_entry``: the step runs as the playbook is entered on an event (no wait before
    it), so the event's properties are known to it."""
    if spec is None:
        return None
    priority_by: PriorityBy | None = None
    if isinstance(spec.priority, dict):
        priority_by = _priority_by(located, (*where, "priority"), spec.priority, catalog, on_entry)
        ok = priority_by is not None
        priority = priority_by.otherwise if priority_by is not None else "normal"
    else:
        priority = str(spec.priority)
        ok = _known_priority(located, (*where, "priority"), priority)
    sla = _duration(located, (*where, "sla"), spec.sla)
    if sla is None or not ok:
        return None
    return Escalate(priority, spec.queue, sla, priority_by)


def _known_priority(located: Located, where: tuple[Any, ...], priority: object) -> bool:
    if priority in PRIORITIES:
        return True
    hint = _did_you_mean(str(priority), list(PRIORITIES))
    located.problems.append(
        located.at(
            where,
            f"unknown priority {priority!r}{hint}; write one of {', '.join(PRIORITIES)}",
        )
    )
    return False


_PRIORITY_BY_TYPES = (FactType.INT, FactType.STRING, FactType.BOOL)
_WHOLE_NUMBER = re.compile(r"^-?\d+$")


def _priority_by(
    located: Located,
    where: tuple[Any, ...],
    raw: dict[str, Any],
    catalog: FactCatalog,
    on_entry: bool,
) -> PriorityBy | None:
    """``priority: {by: <fact>, map: {<value>: <priority>}, otherwise: <priority>}``: the
    fact must exist and be a number, text or true/false; each key a value of its type;
    each priority one of PRIORITIES; an event property only where the event is known."""
    try:
        spec = PriorityBySpec.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors():
            loc = (*where, *error["loc"])
            if error["type"] == "extra_forbidden":
                name = str(error["loc"][-1])
                hint = _did_you_mean(name, list(PriorityBySpec.model_fields))
                message = f"unknown key {name!r}{hint}; allowed: by, map, otherwise"
                located.problems.append(located.at(loc, message, key=True))
            elif error["type"] == "missing":
                located.problems.append(
                    located.at(where, f"missing required key {error['loc'][-1]!r}")
                )
            else:
                label = ".".join(str(part) for part in error["loc"])
                located.problems.append(located.at(loc, f"priority.{label}: {error['msg']}"))
        return None
    before = _error_count(located)
    fact = catalog.get(spec.by)
    kind = fact.type if fact is not None else None
    if fact is None:
        hint = _did_you_mean(spec.by, catalog.names())
        located.problems.append(located.at((*where, "by"), f"unknown fact {spec.by!r}{hint}"))
    elif kind not in _PRIORITY_BY_TYPES:
        located.problems.append(
            located.at(
                (*where, "by"),
                f"{spec.by!r} is {kind}: a priority can be chosen by a number, text or "
                "true/false fact",
            )
        )
        kind = None
    elif (
        spec.by in EVENT_ONLY_FACTS or spec.by.startswith(EVENT_PROPERTY_PREFIX)
    ) and not on_entry:
        located.problems.append(
            located.at(
                (*where, "by"),
                f"{spec.by!r} is only known while the playbook is entered on an event: use it "
                "in a step that runs then (entered with enter.on, no wait before the step)",
            )
        )
    values: list[tuple[bool | int | str, str]] = []
    for key, priority in spec.map.items():
        value = _priority_key(located, (*where, "map", key), key, spec.by, kind)
        if _known_priority(located, (*where, "map", key), priority) and value is not None:
            values.append((value, priority))
    _known_priority(located, (*where, "otherwise"), spec.otherwise)
    if _error_count(located) > before:
        return None
    return PriorityBy(spec.by, tuple(values), spec.otherwise)


def _priority_key(
    located: Located, where: tuple[Any, ...], key: str, fact: str, kind: FactType | None
) -> bool | int | str | None:
    """A key of a priority map as a value of ``fact``'s type (keys are read as text)."""
    if kind is FactType.INT and _WHOLE_NUMBER.match(key):
        return int(key)
    if kind is FactType.BOOL and key in ("true", "false"):
        return key == "true"
    if kind is FactType.STRING:
        return key
    if kind is not None:
        expected = "a whole number" if kind is FactType.INT else "true or false"
        located.problems.append(
            located.at(where, f"{key!r} is not a value of {fact!r}: write {expected}", key=True)
        )
    return None


STAGES_FILE = "stages.yaml"
RESERVED_FILES = ("catalog.yaml", "policies.yaml", ROSTER_FILE, STAGES_FILE)
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def load_stages(
    directory: Path, catalog: FactCatalog, problems: list[SourceProblem]
) -> StageModel | None:
    """The stage model of ``stages.yaml``, or None when the directory has none (then no
    stage is recorded and the stage facts are unknown)."""
    path = directory / STAGES_FILE
    if not path.is_file():
        return None
    located = _read(path, problems, _display(path))
    if located is None:
        return None
    spec: StagesSpec | None = _validate(located, StagesSpec) if not located.problems else None
    if spec is None:
        problems.extend(located.problems)
        return None
    before = _error_count(located)
    checker = _ConditionChecker(located, catalog, check_stages=False)  # checked below
    stages: list[Stage] = []
    seen: set[str] = set()
    if not spec.stages:
        located.problems.append(located.at(("stages",), "list at least one stage"))
    for i, stage in enumerate(spec.stages):
        where = ("stages", i)
        if not _STAGE_NAME.match(stage.stage):
            located.problems.append(
                located.at(
                    (*where, "stage"),
                    f"stage {stage.stage!r}: write a name of lower-case letters, digits and _,"
                    " like at_risk",
                )
            )
        elif stage.stage in seen:
            located.problems.append(
                located.at((*where, "stage"), f"stage {stage.stage!r} is listed twice")
            )
        seen.add(stage.stage)
        last = i == len(spec.stages) - 1
        condition = None
        if stage.when is None and not last:
            located.problems.append(
                located.at(
                    (*where, "stage"),
                    f"stage {stage.stage!r} has no when: only the last stage is the catch-all "
                    "(the stages after it could never match)",
                )
            )
        elif stage.when is not None and last:
            located.problems.append(
                located.at(
                    (*where, "when"),
                    f"the last stage ({stage.stage!r}) is the catch-all: leave out its when, so "
                    "that every customer has a stage",
                )
            )
        elif stage.when is not None:
            condition = checker.compile((*where, "when"), stage.when, allow_event=False)
            for name in sorted(condition.facts & set(STAGE_FACTS)) if condition else ():
                checker._report(
                    (*where, "when"),
                    max(str(stage.when).find(name), 0),
                    f"{name!r} is decided by the stages themselves; a stage's when cannot use it",
                )
        label = stage.label or stage.stage.replace("_", " ").capitalize()
        stages.append(Stage(stage.stage, label, stage.description.strip(), condition))
    funnel = tuple(spec.funnel) if spec.funnel is not None else tuple(s.stage for s in spec.stages)
    if spec.funnel is not None:
        names = [s.stage for s in spec.stages]
        for i, name in enumerate(spec.funnel):
            if name not in names:
                hint = _did_you_mean(name, names)
                located.problems.append(located.at(("funnel", i), f"unknown stage {name!r}{hint}"))
            elif spec.funnel.index(name) != i:
                located.problems.append(located.at(("funnel", i), f"{name!r} is listed twice"))
        missing = [name for name in names if name not in spec.funnel]
        if missing:
            located.problems.append(
                located.at(("funnel",), "the funnel leaves out " + ", ".join(missing))
            )
    problems.extend(located.problems)
    if _error_count(located) > before or not stages:
        return None
    return StageModel(tuple(stages), funnel, located.path)


def load_rules(
    directory: Path | str, templates_dir: Path | str, *, roster_file: Path | str | None = None
) -> RuleSet:
    """Load every file of a rules directory, or raise RulesInvalid with every problem.

    The support roster is ``roster_file`` when given, else ``support_roster.yaml`` in
    ``directory``.

    The files are read more than once (the catalog and policies first, then each playbook),
    so a marketer saving while the scheduler or the web app reloads could otherwise give
    rules that mix old and new files under the new version. A load counts only when the
    files hashed before it are the files hashed after it; otherwise it starts again.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise RulesInvalid([SourceProblem(str(directory), 1, 1, "rules directory not found")])
    roster_path = Path(roster_file) if roster_file is not None else directory / ROSTER_FILE
    for _ in range(CONSISTENT_READ_TRIES):
        before = _fingerprint(directory, roster_path)
        try:
            rules = _load_once(directory, Path(templates_dir), roster_path, before)
        except RulesInvalid:
            if _fingerprint(directory, roster_path) == before:
                raise
            continue  # a half-saved file: read the finished one
        if _fingerprint(directory, roster_path) == before:
            return rules
    raise RulesInvalid(
        [
            SourceProblem(
                str(directory),
                1,
                1,
                f"the rule files kept changing while being read ({CONSISTENT_READ_TRIES} tries);"
                " load them again when the edit is saved",
            )
        ]
    )


CONSISTENT_READ_TRIES = 5


def _fingerprint(directory: Path, roster_path: Path) -> str:
    """The rules version: a digest of every rule file's name and bytes (and the roster's)."""
    digest = hashlib.sha256()
    if roster_path.is_file() and roster_path.parent.resolve() != directory.resolve():
        digest.update(b"roster\0" + roster_path.read_bytes())
    for path in sorted(directory.glob("*.yaml")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _load_once(directory: Path, templates_dir: Path, roster_path: Path, version: str) -> RuleSet:
    problems: list[SourceProblem] = []
    catalog, _ = load_catalog(directory, problems)
    policies = load_policies(directory, problems)
    stages = load_stages(directory, catalog, problems)
    roster, roster_located = load_roster(roster_path, problems)
    templates = TemplateStore(Path(templates_dir))
    problems.extend(
        SourceProblem(_display(templates.directory / path), line, 1, message)
        for path, line, message in templates.variant_problems()
    )
    playbooks: dict[str, Playbook] = {}
    seen: dict[str, str] = {}
    files: dict[str, str] = {}
    escalating: list[tuple[Located, int, str, str]] = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name in RESERVED_FILES or path.resolve() == roster_path.resolve():
            continue
        located = _read(path, problems, _display(path))
        if located is None:
            continue
        spec: PlaybookSpec | None = (
            _validate(located, PlaybookSpec) if not located.problems else None
        )
        if spec is not None:
            playbook = _compile_playbook(
                located,
                spec,
                catalog,
                templates,
                policies,
                seen,
                stages,
                # A broken stages.yaml has said what is wrong with it; the playbooks'
                # stage names are checked once it loads.
                check_stages=stages is not None or not (directory / STAGES_FILE).is_file(),
            )
            if playbook is not None:
                playbooks[playbook.id] = playbook
                files[playbook.id] = path.read_text(encoding="utf-8")
            seen.setdefault(spec.playbook, located.path)
            escalating.extend(
                (located, index, spec.playbook, step.id)
                for index, step in enumerate(spec.steps)
                if step.escalate is not None
            )
        problems.extend(located.problems)
    _check_roster_needed(roster, roster_located, roster_path, escalating, problems)
    warnings = tuple(p for p in problems if p.warning)
    problems = [p for p in problems if not p.warning]
    if not seen and not problems:
        problems.append(SourceProblem(str(directory), 1, 1, "no playbook files (*.yaml) found"))
    if problems:
        raise RulesInvalid(problems, warnings)
    return RuleSet(
        playbooks=playbooks,
        catalog=catalog,
        policies=policies,
        version=version,
        roster=roster,
        directory=str(directory),
        files=files,
        warnings=tuple(sorted(warnings)),
        stages=stages,
    )

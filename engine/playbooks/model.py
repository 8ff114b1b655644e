"""The compiled playbooks: what the engine runs once the rule files have been validated.

Every object here is valid by construction (``engine.playbooks.loader`` builds them only
from files that passed every check) and immutable. Rule ids (``<playbook>.enter``,
``<playbook>.exit``, ``<playbook>.goal``, ``<playbook>.step.<id>``) name the conditions the
evaluators decide.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time, timedelta
from functools import cached_property

from engine.errors import SourceProblem
from engine.language.catalog import FactCatalog
from engine.language.conditions import Condition
from engine.stages.model import StageModel

CHANNELS = ("email", "sms")
PRIORITIES = ("urgent", "high", "normal", "low")


@dataclass(frozen=True)
class SendWindow:
    """Sending is allowed from ``start`` up to ``end`` local time; the rest is quiet hours
    (a message due then waits for the window to open). ``end`` before ``start`` spans
    midnight."""

    start: time
    end: time

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


@dataclass(frozen=True)
class FrequencyCap:
    channel: str  # "any", "email" or "sms"
    max: int
    per: timedelta


@dataclass(frozen=True)
class Policies:
    send_window: dict[str, SendWindow | None]  # per channel; None: any time
    frequency_caps: tuple[FrequencyCap, ...]
    brand: dict[str, str]
    control_group: float = 0.0  # the share of all customers who get no marketing at all
    currency: str = "USD"  # every money fact is cents of it (templates: the money filter)


@dataclass(frozen=True)
class Lead:
    """A support lead who is notified of cases."""

    name: str
    email: str
    phone: str | None
    tier: int
    on_duty: bool


@dataclass(frozen=True)
class Roster:
    leads: tuple[Lead, ...]

    def on_duty(self, tier: int) -> Lead | None:
        """The on-duty lead of ``tier``, or of the nearest tier above it that has one."""
        for wanted in sorted({lead.tier for lead in self.leads if lead.tier >= tier}):
            for lead in self.leads:
                if lead.tier == wanted and lead.on_duty:
                    return lead
        return None

    def find(self, name: str) -> Lead | None:
        return next((lead for lead in self.leads if lead.name == name or lead.email == name), None)


@dataclass(frozen=True)
class Send:
    channel: str
    template: str


@dataclass(frozen=True)
class PriorityBy:
    """A case priority chosen by a fact's value (a complaint's severity): ``values`` pairs
    each value with its priority; ``otherwise`` is for any other value, or none."""

    fact: str
    values: tuple[tuple[bool | int | str, str], ...]
    otherwise: str

    def priority_for(self, facts: Mapping[str, object]) -> tuple[str, str]:
        """The priority for these facts and why, like ("high", "event.severity is 3")."""
        actual = facts.get(self.fact)
        for value, priority in self.values:
            # exact types: True is not 1, so a bool fact never matches a number
            if type(actual) is type(value) and actual == value:
                return priority, f"{self.fact} is {_shown(actual)}"
        if actual is None:
            return self.otherwise, f"{self.fact} is unknown"
        return self.otherwise, f"{self.fact} is {_shown(actual)}, not in the playbook's list"


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class Escalate:
    priority: str  # the case priority; with priority_by, the one for values it does not list
    queue: str
    sla: timedelta
    priority_by: PriorityBy | None = None

    def priority_for(self, facts: Mapping[str, object]) -> tuple[str, str | None]:
        """The case priority for these facts, and why when a fact chose it."""
        if self.priority_by is None:
            return self.priority, None
        return self.priority_by.priority_for(facts)


END = "end"  # as a step's successor: the journey ends there
HOLDOUT_ARM = "holdout"  # the playbook's held-out share: enrolled, sent nothing
CONTROL_ARM = "control"  # the global control group: no marketing at all
RESERVED_ARMS = (HOLDOUT_ARM, CONTROL_ARM)


@dataclass(frozen=True)
class WaitFor:
    """Wait up to ``within`` for an event; then go to ``then`` (it came) or ``otherwise``."""

    event: str
    condition: Condition  # event == "<event>" and (<when>): decided on the event's facts
    within: timedelta
    then: str | None  # None: the journey ends
    otherwise: str | None


@dataclass(frozen=True)
class Branch:
    """The first case whose condition holds when the step is reached decides the next step."""

    cases: tuple[tuple[Condition, str | None], ...]
    otherwise: str | None


@dataclass(frozen=True)
class Arm:
    name: str
    weight: int
    goto: str | None


@dataclass(frozen=True)
class Split:
    """A random split, the same for a customer on every run: a hash of the customer,
    the playbook and the step picks the arm, with the arms' weights."""

    arms: tuple[Arm, ...]

    @property
    def total(self) -> int:
        return sum(arm.weight for arm in self.arms)


@dataclass(frozen=True)
class Step:
    """One node of a journey: an action (send, escalate, or both), a wait for an event, a
    branch or a split. ``following`` is where an action goes next (None: the end)."""

    id: str
    wait: timedelta
    when: Condition | None
    send: Send | None
    escalate: Escalate | None
    following: str | None = None
    wait_for: WaitFor | None = None
    branch: Branch | None = None
    split: Split | None = None

    @property
    def successors(self) -> tuple[str | None, ...]:
        """Every step this one can lead to (None: the end)."""
        if self.wait_for is not None:
            return (self.wait_for.then, self.wait_for.otherwise)
        if self.branch is not None:
            return (*(goto for _, goto in self.branch.cases), self.branch.otherwise)
        if self.split is not None:
            return tuple(arm.goto for arm in self.split.arms)
        return (self.following,)


@dataclass(frozen=True)
class Playbook:
    id: str
    stage: str
    description: str
    priority: int
    kind: str
    enter_on: str | None
    enter: Condition  # includes the event trigger: event == "<on>" and (<when>)
    reentry: timedelta | None  # None: never re-enter
    exit: Condition | None  # no longer eligible: the journey ends, queued messages cancelled
    goal: Condition | None  # reached: the journey ends as converted, queued messages cancelled
    goal_on: str | None  # the goal as an event of this type...
    goal_event: Condition | None  # ...that meets this: event == "<type>" and (<when>)
    goal_within: timedelta  # the attribution window after the last message
    goal_text: str | None  # the goal as written: "order_placed within 7d"
    holdout: float  # the share of entrants held out: enrolled, sent nothing
    when_capped: str
    send_window: dict[str, SendWindow | None]  # per-channel overrides of the policies
    sms_opt_out_hint: str | None
    max_sms_segments: int
    steps: tuple[Step, ...]
    source: str
    topic: str | None = None  # its messages need the customer's topic.<topic> (marketing)

    @property
    def marketing(self) -> bool:
        return self.kind == "marketing"

    def step(self, step_id: str) -> Step | None:
        """The step with this id, or None when the playbook has none (any more)."""
        return self._steps.get(step_id)

    @cached_property
    def _steps(self) -> dict[str, Step]:
        return {s.id: s for s in self.steps}


def enter_rule(playbook: str) -> str:
    return f"{playbook}.enter"


def exit_rule(playbook: str) -> str:
    return f"{playbook}.exit"


def goal_rule(playbook: str) -> str:
    return f"{playbook}.goal"


def goal_event_rule(playbook: str) -> str:
    return f"{playbook}.goal_event"


def wait_rule(playbook: str, step: str) -> str:
    return f"{playbook}.wait.{step}"


def branch_rule(playbook: str, step: str, case: int) -> str:
    return f"{playbook}.branch.{step}.{case}"


def step_rule(playbook: str, step: str) -> str:
    return f"{playbook}.step.{step}"


@dataclass(frozen=True)
class RuleSet:
    """Every playbook, the catalog and the policies of one rules directory, all valid."""

    playbooks: dict[str, Playbook]
    catalog: FactCatalog
    policies: Policies
    version: str  # a digest of the files, recorded on every enrollment
    roster: Roster = Roster(())
    directory: str = ""
    files: dict[str, str] = field(default_factory=dict)  # playbook id -> file text
    # Things that load but should change (a deprecated key): `rules check` prints them
    warnings: tuple[SourceProblem, ...] = ()
    stages: StageModel | None = None  # rules/stages.yaml; None: no stage is recorded

    def conditions(self) -> dict[str, Condition]:
        """Every condition to evaluate, by rule id (enter, exit, goal, each step's when)."""
        rules: dict[str, Condition] = {}
        for pb in self.playbooks.values():
            rules[enter_rule(pb.id)] = pb.enter
            if pb.exit is not None:
                rules[exit_rule(pb.id)] = pb.exit
            if pb.goal is not None:
                rules[goal_rule(pb.id)] = pb.goal
            if pb.goal_event is not None:
                rules[goal_event_rule(pb.id)] = pb.goal_event
            for step in pb.steps:
                if step.when is not None:
                    rules[step_rule(pb.id, step.id)] = step.when
                if step.wait_for is not None:
                    rules[wait_rule(pb.id, step.id)] = step.wait_for.condition
                if step.branch is not None:
                    for i, (condition, _) in enumerate(step.branch.cases):
                        rules[branch_rule(pb.id, step.id, i)] = condition
        return rules

    def send_window(self, playbook: Playbook, channel: str) -> SendWindow | None:
        """When ``playbook`` may send on ``channel``: its own window, else the policies'."""
        if channel in playbook.send_window:
            return playbook.send_window[channel]
        return self.policies.send_window.get(channel)

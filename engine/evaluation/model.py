"""What evaluation takes and gives, as plain data: subjects in, the rules that hold out.

No I/O here: the facts builder (engine.data.facts) makes subjects, the evaluators decide
which rules fire, and the journey planner reads evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.playbooks.model import RuleSet, enter_rule, exit_rule, goal_rule, step_rule
from engine.stages.model import StageChange


@dataclass(frozen=True)
class Subject:
    """One thing to evaluate: a customer's facts, and the event that triggered it if any."""

    customer_id: str
    facts: dict[str, Any]
    event_id: str | None = None
    event_type: str | None = None
    occurred_at: datetime | None = None  # of the event
    # The customer's stage changes at this evaluation (a sweep's subject only; None: it
    # stays, or there is no stage model): the planner records it.
    stage_change: StageChange | None = None

    @property
    def key(self) -> str:
        return f"{self.customer_id}|{self.event_id}" if self.event_id else self.customer_id


@dataclass(frozen=True)
class PlaybookMatch:
    """What one subject matched in one playbook."""

    playbook: str
    entered: bool  # the enter condition (with its event trigger) holds
    exited: bool  # the exit condition holds: no longer eligible
    goal: bool  # the goal holds
    steps: tuple[str, ...]  # steps whose own condition holds (steps without one always do)


@dataclass(frozen=True)
class Evaluation:
    subject: Subject
    fired: frozenset[str]

    def match(self, rules: RuleSet, playbook_id: str) -> PlaybookMatch:
        playbook = rules.playbooks[playbook_id]
        steps = tuple(
            s.id
            for s in playbook.steps
            if s.when is None or step_rule(playbook.id, s.id) in self.fired
        )
        return PlaybookMatch(
            playbook=playbook.id,
            entered=enter_rule(playbook.id) in self.fired,
            exited=exit_rule(playbook.id) in self.fired,
            goal=goal_rule(playbook.id) in self.fired,
            steps=steps,
        )

    def entered(self, rules: RuleSet) -> list[PlaybookMatch]:
        """The playbooks this subject would start: a customer (sweep) starts those with no
        ``enter.on``, a pending event those it triggers (the planner's rule)."""
        event_type = self.subject.event_type if self.subject.event_id is not None else None
        return [
            m
            for m in (
                self.match(rules, pid)
                for pid, p in rules.playbooks.items()
                if p.enter_on == event_type
            )
            if m.entered
        ]


@dataclass
class Summary:
    """Counts per playbook over an evaluation: what `lifecycle evaluate` prints.

    A playbook with no ``enter.on`` is counted in customers (the sweep evaluates each
    once); one that starts on an event is counted in the pending events of that type, as
    the planner starts it. Goals and exits are the customers'. (Counting every subject
    made one customer with six pending events "match" a sweep playbook seven times.)
    """

    subjects: int = 0
    customers: int = 0

    def __post_init__(self) -> None:
        self.entered: dict[str, int] = {}
        self.exited: dict[str, int] = {}
        self.goals: dict[str, int] = {}
        self.steps: dict[str, dict[str, int]] = {}

    def merge(self, other: Summary) -> None:
        self.subjects += other.subjects
        self.customers += other.customers
        for mine, theirs in (
            (self.entered, other.entered),
            (self.exited, other.exited),
            (self.goals, other.goals),
        ):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        for playbook, steps in other.steps.items():
            per_step = self.steps.setdefault(playbook, {})
            for step, count in steps.items():
                per_step[step] = per_step.get(step, 0) + count

    @property
    def pending_events(self) -> int:
        return self.subjects - self.customers

    def add(self, rules: RuleSet, evaluation: Evaluation) -> None:
        self.subjects += 1
        subject = evaluation.subject
        sweep = subject.event_id is None
        if sweep:
            self.customers += 1
        fired = evaluation.fired
        for playbook, enter_on, enter, exit_, goal, steps in _rule_ids(rules):
            starts = enter_on is None if sweep else enter_on == subject.event_type
            if starts and enter in fired:
                self.entered[playbook] = self.entered.get(playbook, 0) + 1
                per_step = self.steps.setdefault(playbook, {})
                for step, rule in steps:
                    if rule is None or rule in fired:
                        per_step[step] = per_step.get(step, 0) + 1
            if not sweep:
                continue
            if exit_ in fired:
                self.exited[playbook] = self.exited.get(playbook, 0) + 1
            if goal in fired:
                self.goals[playbook] = self.goals.get(playbook, 0) + 1


_RuleIds = tuple[str, str | None, str, str, str, tuple[tuple[str, str | None], ...]]
_RULE_IDS: dict[str, tuple[_RuleIds, ...]] = {}


def _rule_ids(rules: RuleSet) -> tuple[_RuleIds, ...]:
    """Each playbook's rule ids, worked out once per rules version (a sweep adds a
    million evaluations)."""
    found = _RULE_IDS.get(rules.version)
    if found is None:
        found = _RULE_IDS[rules.version] = tuple(
            (
                p.id,
                p.enter_on,
                enter_rule(p.id),
                exit_rule(p.id),
                goal_rule(p.id),
                tuple((s.id, step_rule(p.id, s.id) if s.when else None) for s in p.steps),
            )
            for p in rules.playbooks.values()
        )
    return found

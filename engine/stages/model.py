"""The stage model: ordered stages, each a condition over facts, the first match wins.

Pure: no I/O. ``StageModel.assign`` takes a customer's facts and the stage recorded at
the previous evaluation and says where the customer stands now, whether that is a
change, and the stage facts the playbooks see (``stage``, ``days_in_stage``,
``previous_stage``). The facts builder (engine.data.facts) calls it for every customer,
so a sweep, ``evaluate``, ``explain`` and the console all see the same stage; the
planner turns a change into a ``RecordStage`` effect and the store writes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from engine.clock import whole_days_between
from engine.language.catalog import FactType
from engine.language.conditions import Condition, canonical_value, compile_predicate

# The facts this model computes: a stage's own condition cannot use them (the stage is
# decided from the other facts; see the loader's check).
STAGE_FACTS = ("stage", "days_in_stage", "previous_stage")


@dataclass(frozen=True)
class Stage:
    """One stage: its name (used in conditions: ``stage == "at_risk"``), how it is shown,
    what it means, and its condition (None: the catch-all, always last)."""

    name: str
    label: str
    description: str
    condition: Condition | None


@dataclass(frozen=True)
class StageChange:
    """A customer moved from one stage (None: no stage recorded yet) to another."""

    from_stage: str | None
    to_stage: str


@dataclass(frozen=True)
class Recorded:
    """The stage recorded for a customer at an earlier evaluation (all None: never)."""

    stage: str | None = None
    since: datetime | None = None
    previous: str | None = None


@dataclass(frozen=True)
class Assignment:
    """Where a customer stands at ``now``: the stage facts, and the change if any."""

    stage: str
    since: datetime
    previous: str | None
    change: StageChange | None

    def facts(self, now: datetime) -> dict[str, object]:
        return {
            "stage": self.stage,
            "days_in_stage": whole_days_between(self.since, now),
            "previous_stage": self.previous,
        }


@dataclass(frozen=True)
class StageModel:
    """The stages of ``rules/stages.yaml`` in matching order, and the order the funnel
    shows them in (the lifecycle's, which is not the matching order)."""

    stages: tuple[Stage, ...]
    funnel: tuple[str, ...]
    source: str = ""
    _tests: tuple[tuple[str, Callable[[Mapping[str, object]], bool] | None], ...] = field(
        init=False, repr=False, compare=False
    )
    _used: tuple[tuple[str, FactType | None], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.stages or self.stages[-1].condition is not None:
            raise ValueError("a stage model ends with its catch-all stage")
        tests = tuple(
            (s.name, compile_predicate(s.condition) if s.condition is not None else None)
            for s in self.stages
        )
        used: dict[str, FactType | None] = {}
        for stage in self.stages:
            if stage.condition is not None:
                for name in stage.condition.facts:
                    used[name] = stage.condition.types.get(name)
        object.__setattr__(self, "_tests", tests)
        object.__setattr__(self, "_used", tuple(sorted(used.items())))

    # The compiled predicates are closures: a worker process gets the stages and compiles
    # them again.
    def __getstate__(self) -> dict[str, object]:
        return {"stages": self.stages, "funnel": self.funnel, "source": self.source}

    def __setstate__(self, state: dict[str, object]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self.__post_init__()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def label(self, name: str | None) -> str:
        found = self.stage(name) if name is not None else None
        return found.label if found is not None else (name or "no stage yet")

    def classify(self, facts: Mapping[str, object]) -> str:
        """The first stage whose condition holds (the catch-all when none does)."""
        values: dict[str, object] = {}
        for name, kind in self._used:
            value = canonical_value(name, facts.get(name), kind)
            if value is not None:
                values[name] = value
        for name, test in self._tests:
            if test is None or test(values):
                return name
        raise AssertionError("unreachable: the last stage is the catch-all")

    def assign(self, facts: Mapping[str, object], recorded: Recorded, now: datetime) -> Assignment:
        """Where the customer stands at ``now``; a change starts the stage at ``now``."""
        stage = self.classify(facts)
        if recorded.stage == stage and recorded.since is not None:
            return Assignment(stage, recorded.since, recorded.previous, None)
        return Assignment(stage, now, recorded.stage, StageChange(recorded.stage, stage))

"""The shape of the rule files, as pydantic models: what each YAML file may say.

Pydantic checks the shape only; ``engine.playbooks.loader`` maps its errors back to
``path:line:col`` and does every check that needs more than one field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from engine.language.catalog import FactType


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class SendSpec(_Strict):
    channel: str
    template: str


class PriorityBySpec(_Strict):
    """``priority: {by: event.severity, map: {1: low, 3: high}, otherwise: normal}``."""

    by: str
    map: dict[str, str]
    otherwise: str = "normal"


class EscalateSpec(_Strict):
    # A priority ("high"), or a PriorityBySpec mapping: the loader tells them apart, so a
    # mistake in either is reported once, at its place (a pydantic union would report it
    # once per alternative).
    priority: Any = "normal"
    queue: str = "support"
    sla: str = "24h"


class WaitForSpec(_Strict):
    event: str
    when: str | None = None  # a condition on the event (event.<property>) and the facts
    within: str
    then: str  # a step id, or "end"
    otherwise: str  # a step id, or "end"


class CaseSpec(_Strict):
    when: str
    goto: str


class BranchSpec(_Strict):
    cases: list[CaseSpec]
    otherwise: str

    @field_validator("cases")
    @classmethod
    def _at_least_one(cls, cases: list[CaseSpec]) -> list[CaseSpec]:
        if not cases:
            raise ValueError("a branch needs at least one case")
        return cases


class ArmSpec(_Strict):
    arm: str
    weight: int = 1
    goto: str


class StepSpec(_Strict):
    id: str
    wait: str | None = None
    when: str | None = None
    send: SendSpec | None = None
    escalate: EscalateSpec | None = None
    next: str | None = None  # the step that follows (default: the next one listed), or "end"
    wait_for: WaitForSpec | None = None
    branch: BranchSpec | None = None
    split: list[ArmSpec] | None = None


class EnterSpec(_Strict):
    on: str | None = None
    when: str | None = None


class ExitSpec(_Strict):
    when: str


class GoalSpec(_Strict):
    when: str | None = None  # a condition over the facts, or...
    event: str | None = None  # ...an event type, with ``when`` a condition on it
    within: str = "7d"  # the attribution window after a message


class PlaybookSpec(_Strict):
    playbook: str
    stage: str
    description: str
    priority: int = 100
    kind: Literal["marketing", "transactional"] = "marketing"
    enter: EnterSpec
    reentry: str = "never"
    exit: ExitSpec | None = None
    goal: GoalSpec | None = None
    holdout: str | None = None  # a share of the customers who enter: sent nothing, e.g. 10%
    when_capped: Literal["defer", "drop"] = "defer"
    topic: str | None = None  # a subscription topic from catalog.yaml (marketing only)
    send_window: dict[str, str | None] | None = None
    quiet_hours: dict[str, str | None] | None = None  # the old name of send_window
    sms_opt_out_hint: str | None = None
    max_sms_segments: int = 2
    steps: list[StepSpec]

    @field_validator("steps")
    @classmethod
    def _at_least_one(cls, steps: list[StepSpec]) -> list[StepSpec]:
        if not steps:
            raise ValueError("a playbook needs at least one step")
        return steps


class AttributeSpec(_Strict):
    type: FactType
    description: str
    example: Any = None


class EventTypeSpec(_Strict):
    description: str
    properties: dict[str, AttributeSpec] = {}


class TopicSpec(_Strict):
    description: str
    default: Literal["opted_in", "opted_out"] = "opted_in"


class CatalogSpec(_Strict):
    attributes: dict[str, AttributeSpec] = {}
    events: dict[str, EventTypeSpec] = {}
    topics: dict[str, TopicSpec] = {}


class StageSpec(_Strict):
    stage: str
    label: str | None = None
    description: str = ""
    when: str | None = None  # None: the catch-all, which must come last


class StagesSpec(_Strict):
    """``rules/stages.yaml``: the stages in matching order (the first that holds wins)
    and, optionally, the order the funnel shows them in."""

    stages: list[StageSpec]
    funnel: list[str] | None = None


class CapSpec(_Strict):
    channel: Literal["any", "email", "sms"]
    max: int
    per: str


class BrandSpec(_Strict):
    name: str
    address: str


class LeadSpec(_Strict):
    name: str
    email: str
    phone: str | None = None
    tier: int = 1
    on_duty: bool = True


class RosterSpec(_Strict):
    leads: list[LeadSpec]


DEFAULT_SEND_WINDOW: dict[str, str | None] = {"sms": "08:00-21:00"}


class PoliciesSpec(_Strict):
    send_window: dict[str, str | None] | None = None  # None: DEFAULT_SEND_WINDOW
    quiet_hours: dict[str, str | None] | None = None  # the old name of send_window
    frequency_caps: list[CapSpec] = []
    brand: BrandSpec
    control_group: str | None = None  # a share of all customers who get no marketing
    currency: str = "USD"  # of every money fact (ISO 4217); the templates' money filter

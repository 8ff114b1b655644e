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


class EscalateSpec(_Strict):
    priority: str = "normal"
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
    quiet_hours: dict[str, str | None] = {}
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


class CatalogSpec(_Strict):
    attributes: dict[str, AttributeSpec] = {}
    events: dict[str, EventTypeSpec] = {}


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


class PoliciesSpec(_Strict):
    quiet_hours: dict[str, str | None] = {"sms": "08:00-21:00"}
    frequency_caps: list[CapSpec] = []
    brand: BrandSpec
    control_group: str | None = None  # a share of all customers who get no marketing

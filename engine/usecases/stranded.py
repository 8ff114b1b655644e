"""Which active journeys a change of the rules would strand, for `lifecycle rules check`.

A journey is stranded when its playbook is gone, or its next step is: the next tick
ends it (cancelled, with a decision saying which step or playbook went missing). A
marketer renaming a step should know that before shipping.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlmodel import Session

from engine.journeys.plan import resolve_step
from engine.playbooks.model import RuleSet


@dataclass(frozen=True)
class Stranded:
    """Active enrollments on a playbook or a step the rules no longer have."""

    playbook: str
    step_id: str | None
    count: int
    removed: str  # "playbook" or "step"

    def __str__(self) -> str:
        journeys = f"{self.count} active enrollment{'s' if self.count != 1 else ''}"
        if self.removed == "playbook":
            return (
                f"{journeys} of playbook {self.playbook!r}, which the rules no longer have, "
                "end (cancelled) at the next tick"
            )
        return (
            f"{journeys} of {self.playbook!r} wait for step {self.step_id!r}, which the "
            "playbook no longer has: they end (cancelled) at the next tick"
        )


_ACTIVE_STEPS = text(
    "SELECT playbook, step_id, count(*) AS n FROM enrollments "
    "WHERE status = 'active' GROUP BY playbook, step_id ORDER BY playbook, step_id"
)


def stranded_enrollments(session: Session, rules: RuleSet) -> list[Stranded]:
    """One grouped query over the active enrollments."""
    found: list[Stranded] = []
    for row in session.execute(_ACTIVE_STEPS):
        playbook = rules.playbooks.get(row.playbook)
        if playbook is None:
            found.append(Stranded(row.playbook, row.step_id, row.n, "playbook"))
            continue
        step_id = resolve_step(playbook, row.step_id)
        if step_id is not None and playbook.step(step_id) is None:
            found.append(Stranded(row.playbook, row.step_id, row.n, "step"))
    return found

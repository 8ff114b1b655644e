"""Playbook results: per playbook and arm, what was sent and what it brought, with uplift.

Shared by ``lifecycle report playbooks`` and the console's playbook pages. Counted for
the enrollments that entered in the period (``since`` inclusive, ``until`` exclusive):

    enrolled   enrollments of the arm (an arm is a split's arm; "holdout" is the
               playbook's held-out share, "control" the global control group; a
               playbook without a split or holdout has one arm, "all")
    sent       their messages handed to the provider (sent, delivered, bounced)
    delivered  of those, delivered; opened and clicked: messages with at least one open
               or click reported by the provider's webhooks
    converted  enrollments whose goal came within the attribution window after their
               last message (or held-out send): last touch, one conversion per enrollment
    rate       converted / enrolled

Uplift of an arm is its rate minus the comparison group's (the holdout, else the global
control group), with a 95% confidence interval by Newcombe's hybrid score method (the
difference of two Wilson score intervals; Newcombe 1998, method 10), which behaves well
for small rates and small groups, unlike the plain Wald interval. Below ``MIN_SAMPLE``
enrollments in either group the uplift is "not enough data" instead of a number.

Every count is one SQL aggregation pushed to the database; no rows are loaded.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlmodel import Session

from engine.data.moments import read_moment, session_moment
from engine.language.durations import format_duration
from engine.playbooks.model import CONTROL_ARM, HOLDOUT_ARM, RuleSet

MIN_SAMPLE = 30  # enrollments in each group before an uplift is worth a number
Z = 1.959963984540054  # the 97.5th percentile of the standard normal: a 95% interval
ALL = "all"  # the arm of an enrollment that took no split and was not held out


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class Uplift:
    """An arm's conversion rate minus its comparison group's, with a 95% interval."""

    against: str  # "holdout" or "control"
    difference: float | None  # None: not enough data
    interval: Interval | None
    sample: int  # enrolled in the arm
    comparison_sample: int  # enrolled in the comparison group

    @property
    def enough_data(self) -> bool:
        return self.difference is not None


@dataclass
class ArmResult:
    arm: str
    enrolled: int = 0
    sent: int = 0
    delivered: int = 0
    opened: int = 0
    clicked: int = 0
    converted: int = 0
    uplift: Uplift | None = None

    @property
    def rate(self) -> float | None:
        return self.converted / self.enrolled if self.enrolled else None


@dataclass
class PlaybookResult:
    playbook: str
    goal: str | None  # the goal as written, or None: conversions are not measured
    arms: dict[str, ArmResult] = field(default_factory=dict)


def wilson(successes: int, n: int, z: float = Z) -> Interval:
    """The Wilson score interval of a proportion."""
    if n == 0:
        return Interval(0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def newcombe(x1: int, n1: int, x2: int, n2: int, z: float = Z) -> tuple[float, Interval]:
    """p1 - p2 with Newcombe's hybrid score interval (method 10)."""
    p1, p2 = x1 / n1, x2 / n2
    a, b = wilson(x1, n1, z), wilson(x2, n2, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - a.low) ** 2 + (b.high - p2) ** 2)
    high = d + math.sqrt((a.high - p1) ** 2 + (p2 - b.low) ** 2)
    return d, Interval(low, high)


def uplift(arm: ArmResult, comparison: ArmResult, against: str) -> Uplift:
    if arm.enrolled < MIN_SAMPLE or comparison.enrolled < MIN_SAMPLE:
        return Uplift(against, None, None, arm.enrolled, comparison.enrolled)
    d, interval = newcombe(arm.converted, arm.enrolled, comparison.converted, comparison.enrolled)
    return Uplift(against, d, interval, arm.enrolled, comparison.enrolled)


_ENROLLED = text(
    "SELECT playbook, coalesce(arm, 'all') AS arm, count(*) AS enrolled, "
    "count(converted_at) AS converted FROM enrollments "
    "WHERE entered_at >= :since AND entered_at < :until GROUP BY playbook, coalesce(arm, 'all')"
)
_SENT = text(
    "SELECT e.playbook, coalesce(e.arm, 'all') AS arm, "
    "sum(CASE WHEN m.status IN ('sent', 'delivered', 'bounced') THEN 1 ELSE 0 END) AS sent, "
    "sum(CASE WHEN m.status = 'delivered' THEN 1 ELSE 0 END) AS delivered "
    "FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "
    "WHERE e.entered_at >= :since AND e.entered_at < :until "
    "GROUP BY e.playbook, coalesce(e.arm, 'all')"
)
_ENGAGED = text(
    "SELECT e.playbook, coalesce(e.arm, 'all') AS arm, "
    "count(DISTINCT CASE WHEN d.outcome = 'opened' THEN d.message_id END) AS opened, "
    "count(DISTINCT CASE WHEN d.outcome = 'clicked' THEN d.message_id END) AS clicked "
    "FROM decisions d JOIN messages m ON m.id = d.message_id "
    "JOIN enrollments e ON e.id = m.enrollment_id "
    "WHERE d.outcome IN ('opened', 'clicked') "
    "AND e.entered_at >= :since AND e.entered_at < :until "
    "GROUP BY e.playbook, coalesce(e.arm, 'all')"
)


def playbook_results(
    session: Session, rules: RuleSet, since: datetime, until: datetime
) -> list[PlaybookResult]:
    """Every playbook of the rules (and any with enrollments, removed since), by arm."""
    params = {"since": session_moment(session, since), "until": session_moment(session, until)}
    found: dict[str, dict[str, ArmResult]] = defaultdict(dict)

    def arm(playbook: str, name: str) -> ArmResult:
        return found[playbook].setdefault(name, ArmResult(name))

    for row in session.execute(_ENROLLED, params):
        result = arm(row.playbook, row.arm)
        result.enrolled, result.converted = int(row.enrolled), int(row.converted)
    for row in session.execute(_SENT, params):
        result = arm(row.playbook, row.arm)
        result.sent, result.delivered = int(row.sent or 0), int(row.delivered or 0)
    for row in session.execute(_ENGAGED, params):
        result = arm(row.playbook, row.arm)
        result.opened, result.clicked = int(row.opened or 0), int(row.clicked or 0)
    results = []
    for playbook_id in sorted(set(rules.playbooks) | set(found)):
        playbook = rules.playbooks.get(playbook_id)
        goal = None
        if playbook is not None and playbook.goal_event is not None:
            goal = f"{playbook.goal_event.source} within {_days(playbook.goal_within)}"
        elif playbook is not None and playbook.goal is not None:
            goal = f"{playbook.goal.source} within {_days(playbook.goal_within)}"
        arms = found.get(playbook_id, {})
        comparison_name = HOLDOUT_ARM if HOLDOUT_ARM in arms else CONTROL_ARM
        comparison = arms.get(comparison_name)
        if comparison is not None:
            for name, result in arms.items():
                if name not in (HOLDOUT_ARM, CONTROL_ARM):
                    result.uplift = uplift(result, comparison, comparison_name)
        results.append(PlaybookResult(playbook_id, goal, dict(sorted(arms.items()))))
    return results


def data_span(session: Session) -> tuple[datetime | None, datetime | None]:
    """The first and last entry on any journey: the default period of the charts and
    the report (a simulated March is shown as March, not as an empty last 30 days)."""
    row = session.execute(text("SELECT min(entered_at), max(entered_at) FROM enrollments")).one()
    return read_moment(row[0]), read_moment(row[1])


def as_json(results: list[PlaybookResult]) -> list[dict[str, Any]]:
    out = []
    for result in results:
        arms = []
        for arm in result.arms.values():
            entry: dict[str, Any] = {
                "arm": arm.arm,
                "enrolled": arm.enrolled,
                "sent": arm.sent,
                "delivered": arm.delivered,
                "opened": arm.opened,
                "clicked": arm.clicked,
                "converted": arm.converted,
                "conversion_rate": _round(arm.rate),
            }
            if arm.uplift is not None:
                u = arm.uplift
                entry["uplift"] = {
                    "against": u.against,
                    "difference": _round(u.difference),
                    "ci95": [_round(u.interval.low), _round(u.interval.high)]
                    if u.interval
                    else None,
                    "sample": u.sample,
                    "comparison_sample": u.comparison_sample,
                    "note": None
                    if u.enough_data
                    else f"not enough data (fewer than {MIN_SAMPLE} in a group)",
                }
            arms.append(entry)
        out.append({"playbook": result.playbook, "goal": result.goal, "arms": arms})
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _days(delta: timedelta) -> str:
    return format_duration(delta)

"""Simulation: the real engine on a fake clock, over a database, hour by hour.

Run it on a scratch copy (engine.bootstrap.simulation_app): it writes journeys, messages
and, when asked, synthetic activity into the database it is given.

Each simulated hour runs the same ticks the scheduler runs: incremental evaluation, SLA
check and dispatch (through the channels the app was built with). A full sweep runs once a
simulated day. Thirty days take seconds. With ``activity`` (``--activity synthetic``), new
activity happens before each tick (sign-ups, visits, orders, NPS answers, complaints,
drawn from a seeded random generator and ingested through engine.data.ingest like real
events), and a simulated support lead resolves open cases after a while, so paused
marketing resumes as it would in real life. Without it, only the clock moves over the
data as it is.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session, col

from engine.bootstrap import App
from engine.data.ingest import CustomerIn, EventIn, record_event, upsert_customer
from engine.data.models import (
    Customer,
    Decision,
    Enrollment,
    Escalation,
    EscalationStatus,
    Message,
    MessageStatus,
)
from engine.data.uow import reading, unit_of_work
from engine.errors import InvalidChoice, NotFound
from engine.escalations import cases as escalations
from engine.playbooks.model import RuleSet
from engine.runners.ticks import dispatch_tick, evaluation_tick, sla_tick

# Chance per customer per simulated day.
DAILY_RATES = {
    "site_visit": 0.04,
    "order_placed": 0.008,
    "nps_submitted": 0.002,
    "complaint": 0.0008,
}
NEW_SIGNUPS_PER_DAY = 0.004  # of the starting base
RESOLVE_AFTER = timedelta(hours=20)
SWEEP_HOUR = 3
ZONES = (
    "Europe/London",
    "America/New_York",
    "America/Los_Angeles",
    "Asia/Tokyo",
    "Australia/Sydney",
    "Europe/Berlin",
)


@dataclass
class PlaybookTally:
    enrolled: int = 0
    sent: Counter[str] = field(default_factory=Counter)
    deferred: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    exited: int = 0
    completed: int = 0
    escalated: int = 0


@dataclass
class SimulationReport:
    start: datetime
    end: datetime
    activity: bool = False  # synthetic activity was added
    hours: int = 0
    events: Counter[str] = field(default_factory=Counter)
    new_customers: int = 0
    cases_resolved: int = 0
    playbooks: dict[str, PlaybookTally] = field(default_factory=lambda: defaultdict(PlaybookTally))
    timeline: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "hours": self.hours,
            "activity": "synthetic" if self.activity else "none",
            "events": dict(self.events),
            "new_customers": self.new_customers,
            "cases_resolved": self.cases_resolved,
            "playbooks": {
                pid: {
                    "enrolled": t.enrolled,
                    "sent": dict(t.sent),
                    "deferred": dict(t.deferred),
                    "skipped": dict(t.skipped),
                    "exited_on_goal": t.exited,
                    "completed": t.completed,
                    "escalated": t.escalated,
                }
                for pid, t in sorted(self.playbooks.items())
            },
            "timeline": self.timeline,
        }


def _reason_key(reason: str) -> str:
    """Group decision reasons: 'quiet hours: 08:00-21:00 ... deferred to ...' -> 'quiet hours'."""
    head = reason.split(":", 1)[0]
    if head.startswith("dropped by frequency cap"):
        return "frequency cap (dropped)"
    return head if len(head) < 60 else head[:60]


class ActivityGenerator:
    """Seeded, believable activity for the customers in the database."""

    def __init__(self, app: App, rules: RuleSet, seed: int) -> None:
        self.app = app
        self.rules = rules
        self.rng = random.Random(seed)
        with reading(app.db) as session:
            self.customer_ids = list(
                session.scalars(select(col(Customer.id)).order_by(col(Customer.id)))
            )
        self.base = max(1, len(self.customer_ids))
        self.counter = 0
        # Ids of this run's customers and events: never one of the database's own.
        self.run = uuid.uuid4().hex[:8]

    def hour(self, start: datetime, report: SimulationReport) -> None:
        with unit_of_work(self.app.db) as session:
            for _ in range(self._count(self.base * NEW_SIGNUPS_PER_DAY / 24)):
                self._new_customer(session, start, report)
            for kind, rate in DAILY_RATES.items():
                for _ in range(self._count(len(self.customer_ids) * rate / 24)):
                    self._event(session, self.rng.choice(self.customer_ids), kind, start, report)

    def _count(self, expected: float) -> int:
        whole = int(expected)
        return whole + (1 if self.rng.random() < expected - whole else 0)

    def _moment(self, start: datetime) -> datetime:
        return start + timedelta(minutes=self.rng.randrange(60))

    def _new_customer(self, session: Session, start: datetime, report: SimulationReport) -> None:
        self.counter += 1
        at = self._moment(start)
        customer_id = f"sim-{self.run}-{start:%Y%m%d%H}-{self.counter}"
        phone = f"+4477009{self.rng.randrange(10**5):05d}" if self.rng.random() < 0.6 else None
        data = CustomerIn(
            id=customer_id,
            email=f"{customer_id}@example.com",
            phone=phone,
            first_name=self.rng.choice(("Alex", "Sam", "Priya", "Jonas", "Mei", "Lucas", "Ada")),
            timezone=self.rng.choice(ZONES),
            email_opt_in=self.rng.random() < 0.75,
            sms_opt_in=phone is not None and self.rng.random() < 0.5,
            signed_up_at=at,
        )
        upsert_customer(session, data, at)
        session.flush()
        self.customer_ids.append(customer_id)
        report.new_customers += 1
        self._event(session, customer_id, "signed_up", start, report, at=at)

    def _event(
        self,
        session: Session,
        customer_id: str,
        kind: str,
        start: datetime,
        report: SimulationReport,
        at: datetime | None = None,
    ) -> None:
        self.counter += 1
        properties: dict[str, Any] = {}
        if kind == "order_placed":
            properties = {"amount_cents": self.rng.randrange(1500, 25000)}
        elif kind == "nps_submitted":
            properties = {
                "score": self.rng.choices(range(11), weights=(1, 1, 1, 1, 2, 2, 3, 5, 8, 9, 7))[0]
            }
        elif kind == "complaint":
            properties = {
                "reason": self.rng.choice(
                    ("Parcel arrived damaged", "Charged twice", "Late delivery", "Rude courier")
                ),
                "severity": self.rng.randint(1, 3),
            }
        moment = at or self._moment(start)
        event = EventIn(
            id=f"sim-{self.run}-{self.counter}",
            customer_id=customer_id,
            type=kind,
            occurred_at=moment,
            properties=properties,
        )
        if record_event(session, event, moment) is not None:
            report.events[kind] += 1


@dataclass(frozen=True)
class Experiment:
    """A known truth to test a playbook's report against: after the first message (or
    held-out send) of an enrollment, its customer places an order within the playbook's
    attribution window with probability ``base_rate`` plus the lift of their arm (the
    holdout and the control group get the base rate). Written on the command line as
    ``PLAYBOOK:BASE[,ARM=+LIFT...]``, e.g. ``re_engagement:0.05,b=+0.05``."""

    playbook: str
    base_rate: float
    lifts: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Experiment:
        try:
            playbook, rest = text.split(":", 1)
            base, *arms = rest.split(",")
            lifts = {}
            for arm in arms:
                name, lift = arm.split("=", 1)
                lifts[name.strip()] = float(lift)
            experiment = cls(playbook.strip(), float(base), lifts)
        except ValueError:
            raise InvalidChoice(
                "experiment",
                text,
                ["PLAYBOOK:BASE[,ARM=+LIFT...], e.g. re_engagement:0.05,b=+0.05"],
            ) from None
        for arm, rate in {"base": experiment.base_rate, **experiment.rates()}.items():
            if not 0 <= rate <= 1:
                raise InvalidChoice(f"conversion rate of {arm}", rate, ["a rate from 0 to 1"])
        return experiment

    def rates(self) -> dict[str, float]:
        return {arm: self.base_rate + lift for arm, lift in self.lifts.items()}

    def rate(self, arm: str | None) -> float:
        return self.base_rate + self.lifts.get(arm or "", 0.0)


class Responses:
    """Simulated customers answering a playbook's messages as an Experiment says."""

    def __init__(self, app: App, experiment: Experiment, seed: int) -> None:
        playbook = app.rules.playbooks.get(experiment.playbook)
        if playbook is None:
            raise NotFound("playbook", experiment.playbook)
        self.app = app
        self.experiment = experiment
        self.window = playbook.goal_within
        self.rng = random.Random(seed)
        self.answered: set[int] = set()
        self.due: list[tuple[datetime, int, str]] = []  # (when, enrollment id, customer)
        self.run = uuid.uuid4().hex[:8]

    def hour(self, start: datetime, end: datetime, report: SimulationReport) -> None:
        """Draw the answers to the touches of the hour before ``end``, and place the orders
        that fall in it."""
        statement = select(
            col(Enrollment.id),
            col(Enrollment.customer_id),
            col(Enrollment.arm),
            col(Enrollment.last_touch_at),
        ).where(
            col(Enrollment.playbook) == self.experiment.playbook,
            col(Enrollment.last_touch_at) >= start,
            col(Enrollment.last_touch_at) < end,
        )
        with reading(self.app.db) as session:
            touched = list(session.execute(statement))
        for enrollment_id, customer_id, arm, touch in touched:
            if enrollment_id in self.answered:
                continue  # an enrollment answers its first touch only
            self.answered.add(enrollment_id)
            if self.rng.random() < self.experiment.rate(arm):
                # Well inside the window, so that the order counts whatever the tick grid.
                delay = self.window * (0.1 + 0.7 * self.rng.random())
                self.due.append((touch + delay, enrollment_id, customer_id))
        ready = [d for d in self.due if d[0] < end]
        self.due = [d for d in self.due if d[0] >= end]
        with unit_of_work(self.app.db) as session:
            for at, enrollment_id, customer_id in ready:
                event = EventIn(
                    id=f"sim-{self.run}-answer-{enrollment_id}",
                    customer_id=customer_id,
                    type="order_placed",
                    occurred_at=at,
                    properties={"amount_cents": 4200},
                )
                if record_event(session, event, at) is not None:
                    report.events["order_placed (experiment)"] += 1


def resolve_old_cases(app: App, now: datetime) -> int:
    """The simulated support lead resolves cases some hours after they open."""
    with unit_of_work(app.db) as session:
        cases = session.scalars(
            select(Escalation).where(
                col(Escalation.status) != EscalationStatus.RESOLVED,
                col(Escalation.opened_at) <= now - RESOLVE_AFTER,
            )
        ).all()
        for case in cases:
            assert case.id is not None
            escalations.resolve(session, case.id, "resolved in simulation", "simulated-lead", now)
    return len(cases)


def simulate(
    app: App,
    start: datetime,
    days: int,
    *,
    seed: int = 11,
    customer: str | None = None,
    activity: bool = False,
    experiment: Experiment | None = None,
) -> SimulationReport:
    """Run ``days`` of ticks from ``start`` over ``app``'s database (a copy: see above).
    ``experiment``: simulated customers also answer a playbook's messages as it says."""
    rules = app.rules
    report = SimulationReport(start=start, end=start + timedelta(days=days), activity=activity)
    generator = ActivityGenerator(app, rules, seed) if activity else None
    responses = Responses(app, experiment, seed) if experiment is not None else None
    now = start
    for hour in range(days * 24):
        now = start + timedelta(hours=hour)
        if generator is not None and hour:  # the first tick sees the database as given
            generator.hour(now - timedelta(hours=1), report)
        if responses is not None and hour:
            responses.hour(now - timedelta(hours=1), now, report)
        evaluation_tick(
            app, now, full=(now.hour == SWEEP_HOUR or hour == 0), workers=0, rules=rules
        )
        sla_tick(app, now, rules=rules)
        dispatch_tick(app, now, rules=rules)
        if generator is not None:
            report.cases_resolved += resolve_old_cases(app, now)
        report.hours += 1
    _tally(app, report, start, now, customer)
    return report


def _tally(
    app: App, report: SimulationReport, start: datetime, end: datetime, customer: str | None
) -> None:
    with reading(app.db) as session:
        rows = session.execute(
            select(
                col(Decision.playbook), col(Decision.outcome), col(Decision.reason), func.count()
            )
            .where(col(Decision.at) >= start, col(Decision.at) <= end)
            .group_by(col(Decision.playbook), col(Decision.outcome), col(Decision.reason))
        )
        for playbook, outcome, reason, count in rows:
            tally = report.playbooks[playbook]
            if outcome == "enrolled":
                tally.enrolled += count
            elif outcome == "deferred":
                tally.deferred[_reason_key(reason)] += count
            elif outcome in ("skipped", "cancelled", "failed"):
                tally.skipped[_reason_key(reason)] += count
            elif outcome == "exited":
                tally.exited += count
            elif outcome == "completed":
                tally.completed += count
            elif outcome == "escalated":
                tally.escalated += count
        sent = session.execute(
            select(col(Message.playbook), col(Message.channel), col(Message.kind), func.count())
            .where(
                col(Message.sent_at) >= start,
                col(Message.sent_at) <= end,
                col(Message.status).in_((MessageStatus.SENT, MessageStatus.DELIVERED)),
            )
            .group_by(col(Message.playbook), col(Message.channel), col(Message.kind))
        )
        for playbook, channel, kind, count in sent:
            label = channel if kind != "staff" else f"{channel} to staff"
            report.playbooks[playbook or "-"].sent[label] += count
        if customer:
            decisions = session.scalars(
                select(Decision)
                .where(
                    col(Decision.customer_id) == customer,
                    col(Decision.at) >= start,
                    col(Decision.at) <= end,
                )
                .order_by(col(Decision.at), col(Decision.id))
            )
            report.timeline = [
                {
                    "at": d.at.isoformat(),
                    "playbook": d.playbook,
                    "step": d.step_id,
                    "outcome": d.outcome,
                    "reason": d.reason,
                    "until": d.until.isoformat() if d.until else None,
                }
                for d in decisions
            ]

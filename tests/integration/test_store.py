"""The journey store on SQLite and PostgreSQL: snapshots read back what plans wrote, and a
plan whose guards fail leaves that customer out and nothing of them behind."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlmodel import Session

from engine.data.ingest import CustomerIn, EventIn, record_event, upsert_customer
from engine.data.models import Decision, Enrollment, Escalation, EscalationNote, Event, Message
from engine.data.uow import reading, unit_of_work
from engine.evaluation.evaluators import ReferenceEvaluator
from engine.evaluation.model import Evaluation, Subject
from engine.journeys.plan import plan
from engine.journeys.run import advance_journeys
from engine.journeys.store import load_context, load_journeys, write
from engine.playbooks.loader import load_rules
from engine.playbooks.model import RuleSet
from engine.statuses import EnrollmentStatus
from tests.support.paths import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "journeys"


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return load_rules(FIXTURES / "rules", FIXTURES / "templates")


def customer(db: Engine, customer_id: str, now: datetime, **fields: Any) -> None:
    data = {"id": customer_id, "email": f"{customer_id}@example.com", "email_opt_in": True}
    with unit_of_work(db) as session:
        upsert_customer(session, CustomerIn(**{**data, **fields}, signed_up_at=now), now)


def evaluation(rules: RuleSet, customer_id: str, **facts: Any) -> Evaluation:
    base = {
        "days_since_signup": 100,
        "days_since_last_activity": 1,
        "orders_count": 6,
        "total_spend_cents": 9000,
        "open_complaints": 0,
        "email_opt_in": True,
        "sms_opt_in": False,
        "has_email": True,
        "has_phone": False,
        "timezone": "Europe/London",
        "locale": "en-GB",
        **facts,
    }
    fired = ReferenceEvaluator(rules.conditions()).evaluate(base)
    return Evaluation(Subject(customer_id, base), fired)


def event_evaluation(
    db: Engine,
    rules: RuleSet,
    customer_id: str,
    event_id: str,
    kind: str,
    at: datetime,
    **facts: Any,
) -> Evaluation:
    """An event recorded (pending) and its evaluation, as a tick would make it."""
    with unit_of_work(db) as session:
        record_event(
            session, EventIn(id=event_id, customer_id=customer_id, type=kind, occurred_at=at), at
        )
    plain = evaluation(rules, customer_id, event=kind, event_days_ago=0, **facts)
    return Evaluation(Subject(customer_id, plain.subject.facts, event_id, kind, at), plain.fired)


def count(db: Engine, model: Any) -> int:
    with Session(db) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_a_plan_is_written_and_read_back_as_the_next_snapshot(
    db: Engine, rules: RuleSet, now: datetime
) -> None:
    customer(db, "ann", now)
    report = advance_journeys(db, rules, [evaluation(rules, "ann")], now)
    assert report.total("enrolled") == 1 and report.total("queued") == 1
    with reading(db) as session:
        snapshot = load_journeys(session, ["ann"])["ann"]
        (message,) = session.scalars(select(Message))
        (enrollment,) = session.scalars(select(Enrollment))
        decisions = list(session.scalars(select(Decision).order_by(Decision.id)))
    journey = snapshot.active["reward"]
    assert (journey.id, journey.step_id, journey.version, journey.queued_count) == (
        enrollment.id,
        "reward_text",
        0,
        1,
    )
    assert journey.due_at == now + timedelta(days=1)
    assert snapshot.entries["reward"].last_number == 1
    assert snapshot.entries["reward"].cooldown_from == now
    assert message.enrollment_id == enrollment.id and message.dedupe_key == (
        "journey:ann:reward:1:reward"
    )
    assert [d.outcome for d in decisions] == ["enrolled", "queued"]
    assert all(d.enrollment_id == enrollment.id for d in decisions)
    assert decisions[0].facts["orders_count"] == 6 and decisions[0].rules_version == rules.version
    with reading(db) as session:
        context = load_context(session, {"ann": snapshot}, ["ann"], rules, now)["ann"]
    assert context.recent == ((now, "email"),)
    # The next day the step moves on: one guarded update, version 1.
    advance_journeys(
        db,
        rules,
        [evaluation(rules, "ann", sms_opt_in=True, has_phone=True)],
        now + timedelta(days=1),
    )
    with reading(db) as session:
        (moved,) = session.scalars(select(Enrollment))
    assert (moved.version, moved.status) == (1, EnrollmentStatus.COMPLETED)
    assert moved.active_key is None


def test_a_stale_snapshot_loses_the_race_and_leaves_nothing_behind(
    db: Engine, rules: RuleSet, now: datetime
) -> None:
    customer(db, "ann", now)
    customer(db, "bob", now)
    advance_journeys(db, rules, [evaluation(rules, "ann")], now)
    later = now + timedelta(days=1)
    evaluations = [evaluation(rules, "ann"), evaluation(rules, "bob")]
    with reading(db) as session:
        snapshots = load_journeys(session, ["ann", "bob"])
        snapshots.update(load_context(session, snapshots, ["ann", "bob"], rules, later))
    stale = plan(snapshots, evaluations, rules, later)
    # Another evaluator moves ann's journey first.
    advance_journeys(db, rules, [evaluation(rules, "ann")], later)
    before = count(db, Decision), count(db, Message)
    with unit_of_work(db) as session:
        written = write(session, stale, rules, later)
    assert written.lost == ["ann"]
    # bob's part of the plan stands; nothing of ann's stale plan was written.
    with reading(db) as session:
        bob = session.scalars(select(Enrollment).where(Enrollment.customer_id == "bob")).all()
        ann_decisions = list(
            session.scalars(
                select(Decision.outcome).where(Decision.customer_id == "ann").order_by(Decision.id)
            )
        )
    assert len(bob) == 1
    assert count(db, Decision) == before[0] + 2 and count(db, Message) == before[1] + 1
    # The winner's decisions only: its SMS step was skipped (no consent), then it completed.
    assert ann_decisions == ["enrolled", "queued", "skipped", "completed"]


def test_a_unique_key_collision_leaves_that_customer_out(
    db: Engine, rules: RuleSet, now: datetime
) -> None:
    customer(db, "ann", now)
    customer(db, "bob", now)
    evaluations = [evaluation(rules, "ann"), evaluation(rules, "bob")]
    with reading(db) as session:
        snapshots = load_journeys(session, ["ann", "bob"])
        snapshots.update(load_context(session, snapshots, ["ann", "bob"], rules, now))
    first = plan(snapshots, evaluations, rules, now)
    advance_journeys(db, rules, [evaluation(rules, "ann")], now)  # ann entered meanwhile
    with unit_of_work(db) as session:
        written = write(session, first, rules, now)
    assert written.lost == ["ann"]
    assert count(db, Enrollment) == 2 and count(db, Message) == 2


def test_claimed_events_and_cases_are_written_with_their_ids(
    db: Engine, rules: RuleSet, now: datetime
) -> None:
    customer(db, "ann", now)
    with unit_of_work(db) as session:
        record_event(
            session,
            EventIn(
                id="e1",
                customer_id="ann",
                type="complaint",
                occurred_at=now,
                properties={"reason": "Broken"},
            ),
            now,
        )
    facts = {"event": "complaint", "event.reason": "Broken", "event_days_ago": 0}
    complaint = evaluation(rules, "ann", **facts)
    complaint = Evaluation(
        Subject("ann", complaint.subject.facts, "e1", "complaint", now), complaint.fired
    )
    advance_journeys(db, rules, [evaluation(rules, "ann", orders_count=1), complaint], now)
    with reading(db) as session:
        (event,) = session.scalars(select(Event))
        (case,) = session.scalars(select(Escalation))
        notes = list(session.scalars(select(EscalationNote)))
        staff = list(session.scalars(select(Message).where(Message.kind == "staff")))
        (customer_row,) = session.execute(select(Event.evaluated_at))
    assert event.evaluated_at == now
    assert (case.reason, case.trigger_event_id, case.notified_tier) == ("Broken", "e1", 1)
    assert [(n.escalation_id, n.action) for n in notes] == [(case.id, "opened")]
    assert {m.escalation_id for m in staff} == {case.id}
    assert all(m.context["case"]["id"] == case.id for m in staff)
    # A second delivery of the same plan finds the event claimed and writes nothing.
    again = advance_journeys(db, rules, [evaluation(rules, "ann", orders_count=1), complaint], now)
    assert count(db, Escalation) == 1 and again.lost_races == 1


def test_a_journey_started_and_ended_by_one_batch_cancels_what_it_queued(
    db: Engine, rules: RuleSet, now: datetime
) -> None:
    """A sign-up and an order in the same batch: the journey the sign-up starts is ended
    by the order's goal in the same plan, so the message it queued a moment before is
    cancelled in the same write (it once failed: the cancel ran before the insert, with
    no id for the new journey)."""
    customer(db, "sam", now, attributes={"plan": "signup"})
    signed_up = event_evaluation(
        db, rules, "sam", "s1", "signed_up", now - timedelta(minutes=9), plan="signup"
    )
    ordered = event_evaluation(
        db, rules, "sam", "o1", "order_placed", now - timedelta(minutes=4), plan="signup"
    )
    advance_journeys(db, rules, [evaluation(rules, "sam", plan="signup"), signed_up, ordered], now)
    with reading(db) as session:
        (enrollment,) = session.scalars(
            select(Enrollment).where(Enrollment.playbook == "signup_offer")
        )
        (message,) = session.scalars(select(Message).where(Message.playbook == "signup_offer"))
        outcomes = [
            d.outcome
            for d in session.scalars(
                select(Decision).where(Decision.playbook == "signup_offer").order_by(Decision.id)
            )
        ]
    assert enrollment.status == EnrollmentStatus.CONVERTED
    assert (message.status, message.last_error) == ("cancelled", "journey converted: goal reached")
    assert outcomes[:2] == ["enrolled", "queued"] and "cancelled" in outcomes

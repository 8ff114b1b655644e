"""The journey planner on plain data: every journey rule, no database.

Playbooks: tests/fixtures/journeys (written for these tests). Which rules fire is decided
by the reference evaluator over the facts each test gives, as in a real tick.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest

from engine.evaluation.evaluators import ReferenceEvaluator
from engine.evaluation.model import Evaluation, Subject
from engine.journeys.effects import (
    CancelQueued,
    CaseNote,
    ClaimEvents,
    CustomerSnapshot,
    Decide,
    Effect,
    Enroll,
    Entries,
    JoinCase,
    Journey,
    Move,
    OpenCase,
    OpenCaseEffect,
    Plan,
    Queue,
    TouchCustomer,
)
from engine.journeys.plan import has_work, message_id_for, plan
from engine.playbooks.loader import load_rules
from engine.playbooks.model import RuleSet
from engine.statuses import EnrollmentStatus
from tests.support.paths import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "journeys"
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a Monday, noon UTC
E = TypeVar("E", bound=Effect)


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return load_rules(FIXTURES / "rules", FIXTURES / "templates")


@pytest.fixture(scope="module")
def evaluator(rules: RuleSet) -> ReferenceEvaluator:
    return ReferenceEvaluator(rules.conditions())


def facts(**values: Any) -> dict[str, Any]:
    """A customer who matches nothing, with ``values`` changed."""
    base: dict[str, Any] = {
        "days_since_signup": 100,
        "days_since_last_activity": 1,
        "orders_count": 1,
        "total_spend_cents": 5000,
        "last_order_days_ago": 1,
        "nps_score": None,
        "open_complaints": 0,
        "email_opt_in": True,
        "sms_opt_in": True,
        "has_email": True,
        "has_phone": True,
        "locale": "en-GB",
        "timezone": "Europe/London",
        "event": None,
        "event_days_ago": None,
        "plan": None,
        "event.amount_cents": None,
        "event.reason": None,
        "event.severity": None,
    }
    base.update(values)
    return base


def sweep(evaluator: ReferenceEvaluator, customer: str = "c1", **values: Any) -> Evaluation:
    subject = Subject(customer, facts(**values))
    return Evaluation(subject, evaluator.evaluate(subject.facts))


def event(
    evaluator: ReferenceEvaluator,
    kind: str,
    at: datetime,
    customer: str = "c1",
    event_id: str | None = None,
    **values: Any,
) -> Evaluation:
    properties = {k: v for k, v in values.items() if k.startswith("event.")}
    others = {k: v for k, v in values.items() if not k.startswith("event.")}
    subject = Subject(
        customer,
        facts(event=kind, event_days_ago=0, **others, **properties),
        event_id or f"{customer}-{kind}-{at:%H%M}",
        kind,
        at,
    )
    return Evaluation(subject, evaluator.evaluate(subject.facts))


def journey(playbook: str, step_id: str | None, due_at: datetime | None, **values: Any) -> Journey:
    fields: dict[str, Any] = {
        "id": 7,
        "playbook": playbook,
        "step_id": step_id,
        "due_at": due_at,
        "version": 3,
        "hold_reason": None,
        "entry_number": 1,
        "entered_at": NOW - timedelta(days=10),
        "queued_count": 1,
        "trigger_event_id": None,
    }
    fields.update(values)
    return Journey(**fields)


def snapshot(customer: str = "c1", **values: Any) -> dict[str, CustomerSnapshot]:
    return {customer: CustomerSnapshot(customer, **values)}


def only(effects: Iterable[Effect], kind: type[E]) -> list[E]:
    return [e for e in effects if isinstance(e, kind)]


def outcomes(result: Plan) -> list[tuple[str, str | None, str]]:
    return [(d.playbook, d.step_id, d.outcome) for d in only(result.effects(), Decide)]


# ---------------------------------------------------------------- entering


def test_an_entry_enrolls_and_runs_the_first_step_at_once(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    result = plan({}, [sweep(evaluator, orders_count=5)], rules, NOW)
    (enroll,) = only(result.effects(), Enroll)
    assert (enroll.playbook, enroll.entry_number, enroll.key) == ("reward", 1, "c1|reward|1")
    assert enroll.state.status is EnrollmentStatus.ACTIVE
    assert (enroll.state.step_id, enroll.state.due_at) == ("reward_text", NOW + timedelta(days=1))
    assert enroll.state.queued_count == 1
    (queued,) = only(result.effects(), Queue)
    assert (queued.step_id, queued.channel, queued.due_at) == ("reward", "email", NOW)
    assert queued.dedupe_key == "journey:c1:reward:1:reward"
    assert queued.message_id == message_id_for(queued.dedupe_key)
    assert queued.enrollment == "c1|reward|1"
    assert outcomes(result) == [("reward", None, "enrolled"), ("reward", "reward", "queued")]
    enrolled = only(result.effects(), Decide)[0]
    assert enrolled.reason == "(orders_count >= 5 and email_opt_in)"
    assert "nps_score" not in enrolled.facts  # unknown facts are left out of the log


def test_an_event_entry_claims_the_event_and_uses_its_facts(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    signup = event(evaluator, "signed_up", NOW - timedelta(minutes=5), orders_count=0)
    result = plan({}, [sweep(evaluator, orders_count=0), signup], rules, NOW)
    (claim,) = only(result.effects(), ClaimEvents)
    assert claim.event_ids == ("c1-signed_up-1155",)
    (enroll,) = only(result.effects(), Enroll)
    assert (enroll.playbook, enroll.trigger_event_id) == ("greet", "c1-signed_up-1155")
    enrolled = only(result.effects(), Decide)[0]
    assert (
        enrolled.reason
        == 'signed_up event c1-signed_up-1155; event == "signed_up" and (email_opt_in)'
    )
    assert enrolled.facts["event"] == "signed_up"


def test_no_entry_while_on_the_journey_or_when_the_goal_already_holds(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    on_it = snapshot(active={"reward": journey("reward", "reward_text", NOW + timedelta(hours=1))})
    assert only(plan(on_it, [sweep(evaluator, orders_count=5)], rules, NOW).effects(), Enroll) == []
    # The sign-up of a customer who has already ordered: greeting would only convert at once.
    signup = event(evaluator, "signed_up", NOW, orders_count=1)
    result = plan({}, [sweep(evaluator, orders_count=1), signup], rules, NOW)
    assert only(result.effects(), Enroll) == []
    assert only(result.effects(), ClaimEvents)  # the event is consumed all the same


def test_reentry_never_means_never_after_an_entry_that_counts(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    done = snapshot(entries={"reward": Entries(1, NOW - timedelta(days=400))})
    result = plan(done, [sweep(evaluator, orders_count=9)], rules, NOW)
    assert only(result.effects(), Enroll) == []


def test_reentry_waits_for_the_cooldown(rules: RuleSet, evaluator: ReferenceEvaluator) -> None:
    quiet = {"days_since_last_activity": 40}
    inside = snapshot(entries={"nudge": Entries(2, NOW - timedelta(days=89))})
    assert only(plan(inside, [sweep(evaluator, **quiet)], rules, NOW).effects(), Enroll) == []
    after = snapshot(entries={"nudge": Entries(2, NOW - timedelta(days=90))})
    (enroll,) = only(plan(after, [sweep(evaluator, **quiet)], rules, NOW).effects(), Enroll)
    assert enroll.entry_number == 3


def test_an_entry_left_before_it_sent_anything_starts_no_cooldown(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    # The store reads no cooldown for an entry that exited before queueing anything.
    left = snapshot(entries={"ask": Entries(1, None)})
    (enroll,) = only(plan(left, [sweep(evaluator, nps_score=10)], rules, NOW).effects(), Enroll)
    assert enroll.entry_number == 2


# ---------------------------------------------------------------- waits and steps


def test_a_step_waits_until_it_is_due(rules: RuleSet, evaluator: ReferenceEvaluator) -> None:
    later = snapshot(active={"greet": journey("greet", "tips", NOW + timedelta(hours=3))})
    evaluations = [sweep(evaluator, orders_count=0)]
    assert not has_work(later["c1"], evaluations, rules, NOW)
    assert list(plan(later, evaluations, rules, NOW).effects()) == []
    due = snapshot(active={"greet": journey("greet", "tips", NOW)})
    assert has_work(due["c1"], evaluations, rules, NOW)
    result = plan(due, evaluations, rules, NOW)
    (move,) = only(result.effects(), Move)
    assert (move.enrollment_id, move.version, move.kind) == (7, 3, "advance")
    assert (move.state.step_id, move.state.due_at) == ("offer", NOW + timedelta(days=3))
    assert [q.step_id for q in only(result.effects(), Queue)] == ["tips"]


def test_a_step_whose_condition_is_false_is_skipped_with_the_reason(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    due = snapshot(active={"greet": journey("greet", "offer", NOW)})
    result = plan(due, [sweep(evaluator, orders_count=0, email_opt_in=True)], rules, NOW)
    assert only(result.effects(), Queue) != []  # offer is sent when orders_count == 0
    ordered = plan(due, [sweep(evaluator, orders_count=2)], rules, NOW)
    # orders_count >= 1 is greet's goal: the journey converts instead of skipping.
    assert outcomes(ordered) == [("greet", None, "converted")]
    other = snapshot(active={"nudge": journey("nudge", "text", NOW)})
    skipped = plan(
        other, [sweep(evaluator, days_since_last_activity=40, sms_opt_in=False)], rules, NOW
    )
    decision = only(skipped.effects(), Decide)[0]
    assert (decision.step_id, decision.outcome) == ("text", "skipped")
    assert decision.reason == "condition false: sms_opt_in is false"
    (move,) = only(skipped.effects(), Move)
    assert move.kind == "end" and move.state.status is EnrollmentStatus.COMPLETED


# ---------------------------------------------------------------- goal and exit


def test_a_reached_goal_converts_and_cancels_what_is_queued(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    on_it = snapshot(active={"greet": journey("greet", "tips", NOW + timedelta(days=1))})
    result = plan(on_it, [sweep(evaluator, orders_count=1)], rules, NOW)
    (move,) = only(result.effects(), Move)
    assert move.kind == "end" and move.state.status is EnrollmentStatus.CONVERTED
    assert move.state.end_reason == "goal reached: orders_count >= 1"
    (cancel,) = only(result.effects(), CancelQueued)
    assert (cancel.enrollment, cancel.reason) == (7, "journey converted: goal reached")
    assert outcomes(result) == [("greet", None, "converted")]


def test_an_exit_is_named_as_no_longer_eligible(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    on_it = snapshot(active={"ask": journey("ask", "reminder", NOW + timedelta(days=2))})
    result = plan(on_it, [sweep(evaluator, nps_score=10, open_complaints=1)], rules, NOW)
    (move,) = only(result.effects(), Move)
    assert move.state.status is EnrollmentStatus.EXITED
    assert move.state.end_reason == "no longer eligible: open_complaints > 0"
    assert only(result.effects(), CancelQueued)[0].reason == "journey exited: no longer eligible"


# ---------------------------------------------------------------- caps


def test_a_cap_lets_the_lower_priority_number_go_first_and_defers_the_other(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    # Loyal (reward, priority 30) and quiet (nudge, priority 40): one email a day.
    result = plan({}, [sweep(evaluator, orders_count=6, days_since_last_activity=40)], rules, NOW)
    assert [q.playbook for q in only(result.effects(), Queue)] == ["reward"]
    held = [d for d in only(result.effects(), Decide) if d.outcome == "deferred"]
    assert [(d.playbook, d.reason, d.until) for d in held] == [
        ("nudge", "frequency cap: at most 1 email message per 1d", NOW + timedelta(days=1))
    ]
    nudge = next(e for e in only(result.effects(), Enroll) if e.playbook == "nudge")
    assert (nudge.state.step_id, nudge.state.due_at) == ("first", NOW + timedelta(days=1))
    assert nudge.state.hold_reason == "frequency cap: at most 1 email message per 1d"


def test_recent_sends_count_against_the_caps(rules: RuleSet, evaluator: ReferenceEvaluator) -> None:
    busy = snapshot(recent=((NOW - timedelta(hours=2), "email"),))
    result = plan(busy, [sweep(evaluator, orders_count=6)], rules, NOW)
    assert only(result.effects(), Queue) == []
    (enroll,) = only(result.effects(), Enroll)
    assert enroll.state.due_at == NOW + timedelta(hours=22)


def test_a_dropped_send_ends_the_journey_so_no_reminder_follows(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    busy = snapshot(recent=((NOW - timedelta(hours=2), "email"),))
    result = plan(busy, [sweep(evaluator, nps_score=10)], rules, NOW)
    assert only(result.effects(), Queue) == []
    (enroll,) = only(result.effects(), Enroll)
    assert enroll.state.status is EnrollmentStatus.DROPPED
    assert enroll.state.end_reason == (
        "its 'ask' message was dropped by a frequency cap, so no later step follows up on it"
    )
    assert outcomes(result) == [
        ("ask", None, "enrolled"),
        ("ask", "ask", "skipped"),
        ("ask", None, "dropped"),
    ]
    assert only(result.effects(), Decide)[1].reason == (
        "dropped by frequency cap: at most 1 email message per 1d"
    )


# ---------------------------------------------------------------- quiet hours


def test_an_sms_due_at_night_waits_for_the_morning_across_the_dst_change(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    # New York springs forward in the night of 7 to 8 March 2026: due 23:00 EST on the
    # 7th, the SMS goes at 08:00 EDT on the 8th, which is 12:00 UTC (not 13:00).
    night = datetime(2026, 3, 8, 4, 0, tzinfo=UTC)
    assert night.astimezone(ZoneInfo("America/New_York")).hour == 23
    due = snapshot(active={"reward": journey("reward", "reward_text", night)})
    result = plan(
        due, [sweep(evaluator, orders_count=6, timezone="America/New_York")], rules, night
    )
    (queued,) = only(result.effects(), Queue)
    assert queued.due_at == datetime(2026, 3, 8, 12, 0, tzinfo=UTC)
    deferred = [d for d in only(result.effects(), Decide) if d.outcome == "deferred"]
    assert deferred[0].reason == (
        "quiet hours: the sending window is 08:00-21:00 local time in America/New_York; deferred to 2026-03-08 08:00 EDT"
    )


def test_a_journey_whose_last_message_waits_completes_when_it_is_due(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    night = datetime(2026, 6, 9, 14, 0, tzinfo=UTC)  # 23:00 in Tokyo
    due = snapshot(active={"reward": journey("reward", "reward_text", night)})
    result = plan(due, [sweep(evaluator, orders_count=6, timezone="Asia/Tokyo")], rules, night)
    (move,) = only(result.effects(), Move)
    morning = datetime(2026, 6, 9, 23, 0, tzinfo=UTC)  # 08:00 in Tokyo
    assert move.state.status is EnrollmentStatus.ACTIVE
    assert (move.state.step_id, move.state.due_at) == (None, morning)
    finishing = snapshot(active={"reward": journey("reward", None, morning)})
    later = plan(
        finishing, [sweep(evaluator, orders_count=6, timezone="Asia/Tokyo")], rules, morning
    )
    (done,) = only(later.effects(), Move)
    assert done.state.status is EnrollmentStatus.COMPLETED
    assert done.state.end_reason == "every step done"


# ---------------------------------------------------------------- consent


def test_missing_consent_skips_the_step_and_the_journey_goes_on(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    due = snapshot(active={"reward": journey("reward", "reward_text", NOW)})
    result = plan(due, [sweep(evaluator, orders_count=6, sms_opt_in=False)], rules, NOW)
    assert only(result.effects(), Queue) == []
    decision = only(result.effects(), Decide)[0]
    assert (decision.outcome, decision.reason) == (
        "skipped",
        "no SMS consent (never opted in, or sent STOP)",
    )
    (move,) = only(result.effects(), Move)
    assert move.state.status is EnrollmentStatus.COMPLETED
    suppressed = plan(
        snapshot(active={"greet": journey("greet", "tips", NOW)}),
        [sweep(evaluator, orders_count=0, has_email=False)],
        rules,
        NOW,
    )
    assert only(suppressed.effects(), Decide)[0].reason == (
        "no email address, or the address is suppressed"
    )


# ---------------------------------------------------------------- the complaint pause


def test_an_open_complaint_holds_marketing_with_one_decision(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    reason = "paused: the customer has an open complaint case"
    due = snapshot(active={"greet": journey("greet", "tips", NOW)})
    result = plan(due, [sweep(evaluator, orders_count=0, open_complaints=1)], rules, NOW)
    assert only(result.effects(), Queue) == []
    (move,) = only(result.effects(), Move)
    assert (move.kind, move.state.step_id, move.state.hold_reason) == ("hold", "tips", reason)
    assert outcomes(result) == [("greet", "tips", "deferred")]
    held = snapshot(active={"greet": journey("greet", "tips", NOW, hold_reason=reason)})
    again = plan(held, [sweep(evaluator, orders_count=0, open_complaints=1)], rules, NOW)
    assert list(again.effects()) == []  # still held: nothing new to say or write


def test_a_complaint_in_the_same_batch_as_an_entry_pauses_it_before_it_is_queued(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    # The sweep was evaluated before the case existed (open_complaints 0), so ask enters;
    # the complaint came first in the batch and opened a case: the ask must wait.
    complaint = event(
        evaluator,
        "complaint",
        NOW - timedelta(minutes=1),
        nps_score=10,
        **{"event.reason": "Broken"},
    )
    result = plan({}, [sweep(evaluator, nps_score=10), complaint], rules, NOW)
    assert [q.playbook for q in only(result.effects(), Queue) if q.kind != "staff"] == ["complaint"]
    ask = next(e for e in only(result.effects(), Enroll) if e.playbook == "ask")
    assert (ask.state.step_id, ask.state.queued_count) == ("ask", 0)
    assert ask.state.hold_reason == "paused: the customer has an open complaint case"
    # Next tick the case is open: no longer eligible, and nothing was sent...
    on_it = snapshot(active={"ask": journey("ask", "ask", NOW, queued_count=0)})
    left = plan(on_it, [sweep(evaluator, nps_score=10, open_complaints=1)], rules, NOW)
    assert only(left.effects(), Move)[0].state.status is EnrollmentStatus.EXITED
    # ...so once the case is resolved the customer is asked: no cooldown was started.
    resolved = snapshot(entries={"ask": Entries(1, None)})
    back = plan(resolved, [sweep(evaluator, nps_score=10)], rules, NOW + timedelta(days=2))
    assert [q.step_id for q in only(back.effects(), Queue)] == ["ask"]


# ---------------------------------------------------------------- escalation


def test_a_complaint_opens_a_case_notifies_the_lead_and_apologises(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    complaint = event(evaluator, "complaint", NOW, **{"event.reason": "Parcel broken"})
    result = plan({}, [sweep(evaluator), complaint], rules, NOW)
    (case,) = only(result.effects(), OpenCaseEffect)
    assert (case.key, case.reason, case.priority, case.queue) == (
        "case:c1:c1-complaint-1200",
        "Parcel broken",
        "normal",
        "complaints",
    )
    assert (case.sla_due_at, case.notified_tier) == (NOW + timedelta(hours=4), 1)
    (note,) = only(result.effects(), CaseNote)
    assert (note.case, note.action, note.note) == (case.key, "opened", "Parcel broken")
    assert only(result.effects(), TouchCustomer) == [TouchCustomer("c1")]
    staff = [q for q in only(result.effects(), Queue) if q.kind == "staff"]
    assert [(q.channel, q.to_address, q.case) for q in staff] == [
        ("email", "one@example.com", case.key),
        ("sms", "+447700900001", case.key),
    ]
    (apology,) = [q for q in only(result.effects(), Queue) if q.kind == "transactional"]
    assert apology.context == {"event": {"reason": "Parcel broken"}}
    escalated = [d for d in only(result.effects(), Decide) if d.outcome == "escalated"]
    assert escalated[0].reason == "case opened (normal, queue complaints); SLA 2026-03-02 16:00 UTC"


def test_a_repeat_complaint_joins_the_open_case(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    complaint = event(evaluator, "complaint", NOW, **{"event.reason": "Still broken"})
    open_case = snapshot(open_case=OpenCase(12, "low"))
    result = plan(open_case, [sweep(evaluator, open_complaints=1), complaint], rules, NOW)
    assert only(result.effects(), OpenCaseEffect) == []
    assert only(result.effects(), JoinCase) == [JoinCase(12, "normal")]
    (note,) = only(result.effects(), CaseNote)
    assert (note.case, note.action, note.note) == (12, "joined", "repeat complaint: Still broken")
    assert [q.kind for q in only(result.effects(), Queue)] == ["transactional"]  # no staff mail


@pytest.fixture(scope="module")
def by_severity(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    """The fixture rules, with the case priority chosen by the complaint's severity."""
    directory = tmp_path_factory.mktemp("severity") / "rules"
    shutil.copytree(FIXTURES / "rules", directory)
    path = directory / "complaint.yaml"
    path.write_text(
        path.read_text().replace(
            "escalate: {priority: normal,",
            "escalate: {priority: {by: event.severity, map: {1: low, 3: urgent}, "
            "otherwise: normal},",
        )
    )
    return load_rules(directory, FIXTURES / "templates")


@pytest.mark.parametrize(
    ("severity", "priority", "why"),
    [
        (1, "low", "event.severity is 1"),
        (3, "urgent", "event.severity is 3"),
        (2, "normal", "event.severity is 2, not in the playbook's list"),
        (None, "normal", "event.severity is unknown"),
    ],
)
def test_the_complaint_severity_sets_the_case_priority(
    by_severity: RuleSet, severity: int | None, priority: str, why: str
) -> None:
    evaluator = ReferenceEvaluator(by_severity.conditions())
    complaint = event(
        evaluator, "complaint", NOW, **{"event.reason": "Broken", "event.severity": severity}
    )
    result = plan({}, [sweep(evaluator), complaint], by_severity, NOW)
    (case,) = only(result.effects(), OpenCaseEffect)
    assert case.priority == priority
    staff = next(q for q in only(result.effects(), Queue) if q.kind == "staff")
    assert staff.context["case"]["priority"] == priority
    escalated = [d for d in only(result.effects(), Decide) if d.outcome == "escalated"]
    assert escalated[0].reason == (
        f"case opened ({priority} as {why}, queue complaints); SLA 2026-03-02 16:00 UTC"
    )


def test_a_more_severe_repeat_complaint_raises_the_open_case(by_severity: RuleSet) -> None:
    evaluator = ReferenceEvaluator(by_severity.conditions())
    worse = event(evaluator, "complaint", NOW, **{"event.reason": "Worse", "event.severity": 3})
    open_case = snapshot(open_case=OpenCase(12, "low"))
    result = plan(open_case, [sweep(evaluator, open_complaints=1), worse], by_severity, NOW)
    assert only(result.effects(), JoinCase) == [JoinCase(12, "urgent")]
    milder = event(evaluator, "complaint", NOW, **{"event.reason": "Meh", "event.severity": 1})
    urgent_case = snapshot(open_case=OpenCase(12, "urgent"))
    result = plan(urgent_case, [sweep(evaluator, open_complaints=1), milder], by_severity, NOW)
    assert only(result.effects(), JoinCase) == []  # a milder one never lowers it


def test_two_complaints_in_one_batch_open_one_case(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    first = event(evaluator, "complaint", NOW - timedelta(minutes=9), **{"event.reason": "A"})
    second = event(evaluator, "complaint", NOW - timedelta(minutes=2), **{"event.reason": "B"})
    result = plan({}, [sweep(evaluator), second, first], rules, NOW)
    (case,) = only(result.effects(), OpenCaseEffect)
    assert case.reason == "A"  # events are planned in the order they happened
    notes = only(result.effects(), CaseNote)
    assert [(n.case, n.action) for n in notes] == [(case.key, "opened"), (case.key, "joined")]
    assert [e.entry_number for e in only(result.effects(), Enroll)] == [1, 2]


# ---------------------------------------------------------------- rules that changed


def test_a_journey_on_a_removed_playbook_or_step_is_cancelled(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    gone = snapshot(active={"retired": journey("retired", "x", NOW + timedelta(days=1))})
    removed = list(plan(gone, [sweep(evaluator)], rules, NOW).effects())
    (move,) = only(removed, Move)
    assert (move.state.status, move.state.end_reason) == (
        EnrollmentStatus.CANCELLED,
        "the playbook was removed",
    )
    # what the journey still had queued goes with it, not out to the customer
    (cancel,) = only(removed, CancelQueued)
    assert cancel.reason == "journey cancelled: the playbook was removed"
    renamed = snapshot(active={"greet": journey("greet", "old_tips", NOW + timedelta(days=1))})
    result = plan(renamed, [sweep(evaluator, orders_count=0)], rules, NOW)
    (move,) = only(result.effects(), Move)
    assert move.state.end_reason == "its next step 'old_tips' is no longer in the playbook"
    assert outcomes(result) == [("greet", None, "cancelled")]
    assert len(only(result.effects(), CancelQueued)) == 1


def test_a_step_kept_by_position_in_the_first_schema_resolves_to_its_id(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    legacy = snapshot(active={"greet": journey("greet", "#1", NOW)})
    result = plan(legacy, [sweep(evaluator, orders_count=0)], rules, NOW)
    assert [q.step_id for q in only(result.effects(), Queue)] == ["tips"]
    (move,) = only(result.effects(), Move)
    assert move.state.step_id == "offer"
    beyond = snapshot(active={"greet": journey("greet", "#9", NOW)})
    (end,) = only(plan(beyond, [sweep(evaluator, orders_count=0)], rules, NOW).effects(), Move)
    assert end.state.end_reason == "its next step '#9' is no longer in the playbook"


# ---------------------------------------------------------------- the plan as a whole


def test_nothing_to_do_means_no_work_and_an_empty_plan(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    steady = snapshot(
        active={"reward": journey("reward", "reward_text", NOW + timedelta(hours=5))},
        entries={"reward": Entries(1, NOW - timedelta(days=1))},
    )
    evaluations = [sweep(evaluator, orders_count=6)]
    assert not has_work(steady["c1"], evaluations, rules, NOW)
    assert list(plan(steady, evaluations, rules, NOW).effects()) == []


def test_the_same_input_gives_the_same_plan(rules: RuleSet, evaluator: ReferenceEvaluator) -> None:
    evaluations = [
        sweep(evaluator, "a", orders_count=6, days_since_last_activity=40),
        sweep(evaluator, "b", nps_score=9),
        event(evaluator, "complaint", NOW, customer="b", nps_score=9),
    ]
    assert plan({}, evaluations, rules, NOW) == plan({}, evaluations, rules, NOW)


def test_the_planner_imports_no_database_library() -> None:
    code = (
        "import sys, engine.journeys.plan; "
        "found = sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'sqlmodel', 'psycopg')); "
        "print(found); sys.exit(1 if found else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- the journey graph


def test_a_wait_for_an_event_opens_when_reached_and_the_event_leads_on(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    entered = plan({}, [sweep(evaluator, plan="wait")], rules, NOW)
    (enroll,) = only(entered.effects(), Enroll)
    assert [q.step_id for q in only(entered.effects(), Queue)] == ["offer"]
    assert (enroll.state.step_id, enroll.state.waiting_since) == ("await_order", NOW)
    assert enroll.state.due_at == NOW + timedelta(days=3)  # the timeout
    waiting = only(entered.effects(), Decide)[-1]
    assert (waiting.outcome, waiting.reason) == (
        "waiting",
        "for order_placed until 2026-03-05 12:00 UTC",
    )
    on_it = snapshot(
        active={
            "first_order": journey(
                "first_order",
                "await_order",
                NOW + timedelta(days=3),
                waiting_since=NOW,
                last_touch_at=NOW,
                last_touch_step="offer",
            )
        }
    )
    later = NOW + timedelta(days=1)
    order = event(evaluator, "order_placed", later, plan="wait", **{"event.amount_cents": 4500})
    result = plan(on_it, [sweep(evaluator, plan="wait"), order], rules, later)
    assert [q.step_id for q in only(result.effects(), Queue)] == ["thanks"]
    (move,) = only(result.effects(), Move)
    assert move.state.status is EnrollmentStatus.COMPLETED
    # The order was also the goal: credited to the offer, the last message before it.
    assert (move.state.converted_at, move.state.conversion_step) == (later, "offer")
    assert move.state.conversion_event_id == order.subject.event_id
    assert outcomes(result)[0] == ("first_order", "await_order", "event came")


def test_an_event_that_does_not_meet_the_wait_leaves_it_waiting_until_the_timeout(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    waiting = journey("first_order", "await_order", NOW + timedelta(days=3), waiting_since=NOW)
    on_it = snapshot(active={"first_order": waiting})
    small = event(
        evaluator,
        "order_placed",
        NOW + timedelta(hours=2),
        plan="wait",
        **{"event.amount_cents": 1500},
    )
    result = plan(on_it, [sweep(evaluator, plan="wait"), small], rules, NOW + timedelta(hours=2))
    assert only(result.effects(), Queue) == []  # $15 is not more than $20: still waiting
    timeout = NOW + timedelta(days=3)
    later = plan(on_it, [sweep(evaluator, plan="wait")], rules, timeout)
    assert [q.step_id for q in only(later.effects(), Queue)] == ["reminder"]
    timed_out = only(later.effects(), Decide)[0]
    assert (timed_out.outcome, timed_out.reason) == ("timed out", "no order_placed within 3d")


def test_a_branch_goes_to_the_first_case_that_holds_or_otherwise(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    regular = plan({}, [sweep(evaluator, plan="branch", orders_count=3)], rules, NOW)
    assert [q.step_id for q in only(regular.effects(), Queue)] == ["regulars"]
    assert only(regular.effects(), Decide)[1].reason == "orders_count >= 2 -> regulars"
    newcomer = plan({}, [sweep(evaluator, plan="branch", orders_count=1)], rules, NOW)
    assert [q.step_id for q in only(newcomer.effects(), Queue)] == ["newcomers"]
    assert only(newcomer.effects(), Decide)[1].reason == "no case held -> newcomers"


def test_a_split_is_the_same_for_a_customer_on_every_run(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    arms = {}
    for n in range(40):
        customer = f"c{n}"
        first = plan({}, [sweep(evaluator, customer, plan="ab")], rules, NOW)
        again = plan({}, [sweep(evaluator, customer, plan="ab")], rules, NOW + timedelta(days=9))
        (enroll,) = only(first.effects(), Enroll)
        assert only(again.effects(), Enroll)[0].state.arm == enroll.state.arm
        arms[customer] = enroll.state.arm
        queued = only(first.effects(), Queue)
        if enroll.state.arm == "holdout":
            assert queued == []
        else:
            assert [q.step_id for q in queued] == [f"mail_{enroll.state.arm}"]
    assert {"a", "b"} <= set(arms.values())


def test_split_shares_follow_the_weights_within_a_point_over_100000_ids(rules: RuleSet) -> None:
    from engine.journeys.plan import arm_of, share_of

    split = rules.playbooks["abtest"].steps[0].split
    assert split is not None
    counts = {"a": 0, "b": 0}
    held = 0
    for n in range(100_000):
        customer = f"customer-{n}"
        counts[arm_of(split, "abtest", "pick", customer).name] += 1
        held += share_of(f"holdout:abtest:{customer}") < 0.10
    assert abs(counts["a"] / 100_000 - 0.5) < 0.01
    assert abs(held / 100_000 - 0.10) < 0.01


def test_a_split_is_the_same_in_another_process_with_another_hash_seed() -> None:
    """Workers are separate processes: the arm must not depend on Python's per-process
    string hashing (PYTHONHASHSEED), only on the customer, playbook and step."""
    from engine.journeys.plan import share_of

    keys = [f"split:abtest:pick:customer-{n}" for n in range(200)]
    here = [share_of(key) for key in keys]
    code = (
        "import json, sys; from engine.journeys.plan import share_of; "
        "print(json.dumps([share_of(k) for k in json.load(sys.stdin)]))"
    )
    for seed in ("1", "4242"):
        there = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(keys),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert json.loads(there.stdout) == here


def test_a_held_out_customer_is_enrolled_and_sent_nothing(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    from engine.journeys.plan import share_of

    customer = next(f"h{n}" for n in range(1000) if share_of(f"holdout:abtest:h{n}") < 0.10)
    result = plan({}, [sweep(evaluator, customer, plan="ab")], rules, NOW)
    (enroll,) = only(result.effects(), Enroll)
    assert enroll.state.arm == "holdout"
    assert only(result.effects(), Queue) == []
    held = [d for d in only(result.effects(), Decide) if d.outcome == "held out"]
    assert [h.reason for h in held] == ["held out: this playbook's holdout, sent nothing"]
    assert (enroll.state.last_touch_at, enroll.state.status) == (NOW, EnrollmentStatus.COMPLETED)


def test_a_held_out_customer_meets_the_caps_a_treated_one_would(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    """A treated customer's message waits for a frequency cap; the holdout's touch must
    wait alike, or held-out customers are credited from earlier and uplift is biased."""
    from engine.journeys.plan import share_of

    customer = next(f"h{n}" for n in range(1000) if share_of(f"holdout:abtest:h{n}") < 0.10)
    busy = snapshot(customer, recent=((NOW - timedelta(hours=2), "email"),))
    result = plan(busy, [sweep(evaluator, customer, plan="ab")], rules, NOW)
    (enroll,) = only(result.effects(), Enroll)
    assert enroll.state.arm == "holdout"
    assert enroll.state.last_touch_at is None
    assert enroll.state.due_at == NOW + timedelta(hours=22)
    assert enroll.state.hold_reason == "frequency cap: at most 1 email message per 1d"
    later = NOW + timedelta(hours=22)
    held = journey(
        "abtest",
        enroll.state.step_id,
        later,
        arm="holdout",
        entered_at=NOW,
        queued_count=0,
        hold_reason=enroll.state.hold_reason,
    )
    result = plan(
        snapshot(customer, active={"abtest": held}),
        [sweep(evaluator, customer, plan="ab")],
        rules,
        later,
    )
    (move,) = only(result.effects(), Move)
    assert move.state.last_touch_at == later


def test_the_global_control_group_gets_no_marketing_but_transactional_mail(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    from dataclasses import replace as copy_with

    from engine.journeys.plan import share_of

    controlled = copy_with(rules, policies=copy_with(rules.policies, control_group=0.05))
    customer = next(f"g{n}" for n in range(1000) if share_of(f"control:g{n}") < 0.05)
    complaint = event(evaluator, "complaint", NOW, customer=customer, orders_count=6)
    result = plan({}, [sweep(evaluator, customer, orders_count=6), complaint], controlled, NOW)
    arms = {e.playbook: e.state.arm for e in only(result.effects(), Enroll)}
    assert arms == {"reward": "control", "complaint": None}
    assert [q.playbook for q in only(result.effects(), Queue) if q.kind != "staff"] == ["complaint"]


def test_a_goal_after_the_journey_ended_is_credited_within_the_window(
    rules: RuleSet, evaluator: ReferenceEvaluator
) -> None:
    from engine.journeys.effects import Convert, Touched

    sent = NOW - timedelta(days=3)
    ended = snapshot(touched=(Touched(11, "abtest", "b", sent, "mail_b"),))
    order = event(evaluator, "order_placed", NOW, plan="ab")
    result = plan(ended, [sweep(evaluator, plan="ab"), order], rules, NOW)
    assert only(result.effects(), Convert) == [
        Convert(11, "c1", NOW, order.subject.event_id, "mail_b")
    ]
    too_late = snapshot(touched=(Touched(11, "abtest", "b", NOW - timedelta(days=8), "mail_b"),))
    result = plan(too_late, [sweep(evaluator, plan="ab"), order], rules, NOW)
    assert only(result.effects(), Convert) == []

"""Journeys on a fake clock, on SQLite and PostgreSQL, through the real rules and templates.

Each test drives the same tick functions the scheduler runs, hour by hour where timing
matters, and reads what reached the in-memory channel and the decision log.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, func, select
from sqlmodel import Session

from channels.memory import MemoryChannel
from engine.bootstrap import App
from engine.data.ingest import CustomerIn, EventIn, record_event, set_email_consent, upsert_customer
from engine.data.models import Customer, Decision, Enrollment, Escalation, Message, MessageStatus
from engine.escalations import cases as escalations
from engine.runners.ticks import dispatch_tick, evaluation_tick
from tests.support.apps import fixture_app
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

ROOT = Path(__file__).resolve().parents[2]
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday morning in London


@pytest.fixture
def channel() -> MemoryChannel:
    return MemoryChannel()


@pytest.fixture
def app(db: Engine, db_url: str, tmp_path: Path, channel: MemoryChannel) -> Iterator[App]:
    yield fixture_app(
        db, db_url, tmp_path / "outbox", FIXTURE_RULES, FIXTURE_TEMPLATES, channel=channel
    )


def add_customer(app: App, customer_id: str, at: datetime, **fields: Any) -> None:
    data = {
        "id": customer_id,
        "email": f"{customer_id}@example.com",
        "email_opt_in": True,
        "timezone": "Europe/London",
        "first_name": "Ada",
        "signed_up_at": at,
        **fields,
    }
    with Session(app.db) as session:
        upsert_customer(session, CustomerIn(**data), at)
        session.commit()


def add_event(app: App, customer_id: str, kind: str, at: datetime, **properties: Any) -> None:
    with Session(app.db) as session:
        event_id = f"{customer_id}-{kind}-{at:%Y%m%d%H%M%S}"
        record_event(
            session,
            EventIn(
                id=event_id,
                customer_id=customer_id,
                type=kind,
                occurred_at=at,
                properties=properties,
            ),
            at,
        )
        session.commit()


def tick(app: App, now: datetime, *, full: bool = False) -> None:
    """One scheduler round; ``full`` is the periodic sweep that time-based conditions need."""
    evaluation_tick(app, now, workers=0, full=full)
    dispatch_tick(app, now)


def run_hours(app: App, start: datetime, hours: int) -> None:
    for hour in range(hours + 1):
        tick(app, start + timedelta(hours=hour))


def sent(app: App, customer_id: str) -> list[tuple[str, str, datetime]]:
    """(step, channel, sent_at) of the customer's sent messages, in order."""
    with Session(app.db) as session:
        rows = session.scalars(
            select(Message)
            .where(
                Message.customer_id == customer_id,
                Message.status == MessageStatus.SENT,
                Message.kind != "staff",
            )
            .order_by(Message.sent_at)
        )
        return [(m.step_id or "", m.channel, m.sent_at) for m in rows]  # type: ignore[misc]


def decisions(app: App, customer_id: str, outcome: str | None = None) -> list[Decision]:
    with Session(app.db) as session:
        statement = (
            select(Decision)
            .where(Decision.customer_id == customer_id)
            .order_by(Decision.at, Decision.id)
        )
        if outcome:
            statement = statement.where(Decision.outcome == outcome)
        return list(session.scalars(statement))


def signed_up(app: App, customer_id: str, at: datetime, **fields: Any) -> None:
    add_customer(app, customer_id, at, **fields)
    add_event(app, customer_id, "signed_up", at)


def test_welcome_series_sends_three_steps_on_the_right_days(app: App) -> None:
    signed_up(app, "ada", START)
    run_hours(app, START, 24 * 7)
    steps = sent(app, "ada")
    assert [(s, c) for s, c, _ in steps] == [
        ("welcome", "email"),
        ("tips", "email"),
        ("first_order_offer", "email"),
    ]
    assert [(at - START).days for _, _, at in steps] == [0, 2, 5]
    subjects = [e.subject for e in _emails(app)]
    assert subjects == [
        "Welcome to Lifecycle Shop, Ada!",
        "Three tips to get started",
        "Ada, 10% off your first order",
    ]
    outcomes = [d.outcome for d in decisions(app, "ada")]
    assert outcomes[0] == "enrolled" and "completed" in outcomes


def _emails(app: App) -> list[Any]:
    return app.channels["email"].emails()


def test_an_order_on_day_one_stops_the_welcome_series(app: App) -> None:
    signed_up(app, "bo", START)
    run_hours(app, START, 24)
    add_event(app, "bo", "order_placed", START + timedelta(days=1, hours=1), amount_cents=4200)
    run_hours(app, START + timedelta(days=1, hours=1), 24 * 6)
    assert [s for s, _, _ in sent(app, "bo")] == ["welcome"]
    (converted,) = decisions(app, "bo", "converted")
    assert converted.reason == "goal reached: orders_count >= 1"
    assert converted.facts["orders_count"] == 1


def test_re_engagement_is_not_reentered_inside_its_cooldown(app: App) -> None:
    long_ago = START - timedelta(days=120)
    add_customer(app, "cy", long_ago)
    add_event(app, "cy", "order_placed", START - timedelta(days=45), amount_cents=3000)
    tick(app, START)
    assert len(decisions(app, "cy", "enrolled")) == 1
    add_event(app, "cy", "site_visit", START + timedelta(days=1))  # back: goal reached
    tick(app, START + timedelta(days=1, hours=1))
    assert len(decisions(app, "cy", "converted")) == 1
    # Quiet again for 40 days: eligible by condition, but inside the 90-day cooldown.
    tick(app, START + timedelta(days=41, hours=2), full=True)
    tick(app, START + timedelta(days=60), full=True)
    assert len(decisions(app, "cy", "enrolled")) == 1
    tick(app, START + timedelta(days=91), full=True)
    assert len(decisions(app, "cy", "enrolled")) == 2


def _loyal(app: App, customer_id: str, at: datetime, timezone: str, **fields: Any) -> None:
    add_customer(app, customer_id, at - timedelta(days=200), timezone=timezone, **fields)
    for n in range(5):
        add_event(app, customer_id, "order_placed", at - timedelta(days=20 - n), amount_cents=2000)


@pytest.mark.parametrize(
    ("zone", "first_tick", "expected_local"),
    [
        # Asia/Tokyo has no DST: reward at 23:00 local, the SMS a day later at 23:00 -> 08:00.
        ("Asia/Tokyo", datetime(2026, 6, 9, 14, 0, tzinfo=UTC), datetime(2026, 6, 11, 8, 0)),
        # New York springs forward in the night of 7 to 8 March 2026: the SMS due at 23:00
        # EST on the 7th goes at 08:00 EDT on the 8th, 12:00 UTC (not 13:00).
        ("America/New_York", datetime(2026, 3, 7, 4, 0, tzinfo=UTC), datetime(2026, 3, 8, 8, 0)),
    ],
)
def test_sms_due_at_23_local_waits_until_8(
    app: App, zone: str, first_tick: datetime, expected_local: datetime
) -> None:
    _loyal(app, "di", first_tick, zone, phone="+15555550123", sms_opt_in=True)
    tick(app, first_tick)
    assert [s for s, _, _ in sent(app, "di")] == ["reward"]
    due = first_tick + timedelta(days=1)
    assert due.astimezone(ZoneInfo(zone)).hour == 23
    tick(app, due)
    (deferred,) = [d for d in decisions(app, "di", "deferred") if d.step_id == "reward_sms"]
    assert deferred.until is not None
    assert deferred.until.astimezone(ZoneInfo(zone)).replace(tzinfo=None) == expected_local
    assert deferred.reason.startswith(
        f"quiet hours: the sending window is 08:00-21:00 local time in {zone}"
    )
    tick(app, deferred.until - timedelta(minutes=1))
    assert [s for s, _, _ in sent(app, "di")] == ["reward"]
    tick(app, deferred.until)
    assert [s for s, _, _ in sent(app, "di")] == ["reward", "reward_sms"]
    assert app.channels["sms"].sms()[-1].body.endswith("Reply STOP to opt out.")


def test_frequency_cap_holds_back_the_lower_priority_message(app: App) -> None:
    # Lapsed for 40 days with five orders: both loyalty_reward (priority 30) and
    # re_engagement (priority 40, defers when capped) want to email today; the email cap
    # is one a day, so the loyalty reward goes first and the win-back waits a day.
    add_customer(app, "ed", START - timedelta(days=300))
    for n in range(5):
        add_event(app, "ed", "order_placed", START - timedelta(days=40 + n), amount_cents=1500)
    tick(app, START)
    assert [s for s, _, _ in sent(app, "ed")] == ["reward"]
    (held,) = [d for d in decisions(app, "ed", "deferred") if d.playbook == "re_engagement"]
    assert held.reason == "frequency cap: at most 1 email message per 1d"
    assert held.until == START + timedelta(days=1)
    tick(app, START + timedelta(days=1))
    assert [s for s, _, _ in sent(app, "ed")] == ["reward", "win_back"]


def test_a_capped_playbook_that_drops_says_so(app: App) -> None:
    # A promoter who also just became loyal: referral_ask (priority 50) drops when capped.
    add_customer(app, "fa", START - timedelta(days=300))
    for n in range(5):
        add_event(app, "fa", "order_placed", START - timedelta(days=3 + n), amount_cents=1500)
    add_event(app, "fa", "nps_submitted", START - timedelta(days=1), score=10)
    tick(app, START)
    assert [s for s, _, _ in sent(app, "fa")] == ["reward"]
    skipped = [d for d in decisions(app, "fa", "skipped") if d.playbook == "referral_ask"]
    assert skipped[0].reason == "dropped by frequency cap: at most 1 email message per 1d"


def test_an_open_complaint_pauses_marketing_and_resolution_resumes_it(app: App) -> None:
    signed_up(app, "gu", START)
    tick(app, START)
    add_event(
        app,
        "gu",
        "complaint",
        START + timedelta(hours=5),
        reason="Parcel arrived damaged",
        severity=2,
    )
    tick(app, START + timedelta(hours=6))
    with Session(app.db) as session:
        (case,) = session.scalars(select(Escalation).where(Escalation.customer_id == "gu"))
    assert case.reason == "Parcel arrived damaged"
    apology = [e for e in _emails(app) if e.to == "gu@example.com"][-1]
    assert "Parcel arrived damaged" in apology.text
    assert "List-Unsubscribe" not in apology.headers  # service mail, not marketing
    run_hours(app, START + timedelta(hours=6), 24 * 3)  # tips was due on day 2
    assert [s for s, _, _ in sent(app, "gu")] == ["welcome", "apology"]
    paused = [d for d in decisions(app, "gu", "deferred") if d.playbook == "welcome_series"]
    assert [d.reason for d in paused] == ["paused: the customer has an open complaint case"]
    resolved_at = START + timedelta(days=3, hours=7)
    with Session(app.db) as session:
        escalations.resolve(session, case.id, "Replacement sent", "priya", resolved_at)  # type: ignore[arg-type]
        session.commit()
    tick(app, resolved_at + timedelta(minutes=1))
    assert [s for s, _, _ in sent(app, "gu")] == ["welcome", "apology", "tips"]


def test_withdrawn_consent_stops_pending_steps(app: App) -> None:
    signed_up(app, "hu", START)
    tick(app, START)
    with Session(app.db) as session:
        customer = session.get(Customer, "hu")
        assert customer is not None
        set_email_consent(customer, False, START + timedelta(days=1))
        session.commit()
    run_hours(app, START + timedelta(days=1), 24 * 6)
    assert [s for s, _, _ in sent(app, "hu")] == ["welcome"]
    reasons = [(d.step_id, d.reason) for d in decisions(app, "hu", "skipped")]
    assert reasons == [
        ("tips", "no email marketing consent"),
        ("first_order_offer", "no email marketing consent"),
    ]


def test_consent_withdrawn_after_queueing_cancels_at_send_time(app: App) -> None:
    # The SMS is queued for 08:00 local; STOP arrives in the night: it must not go.
    night = datetime(2026, 6, 9, 14, 0, tzinfo=UTC)
    _loyal(app, "io", night, "Asia/Tokyo", phone="+15555550124", sms_opt_in=True)
    tick(app, night)
    tick(app, night + timedelta(days=1))
    with Session(app.db) as session:
        customer = session.get(Customer, "io")
        assert customer is not None
        customer.sms_opt_in = False
        customer.sms_opt_out_at = night + timedelta(days=1, hours=2)
        session.commit()
    tick(app, night + timedelta(days=1, hours=9))
    assert [s for s, _, _ in sent(app, "io")] == ["reward"]
    (cancelled,) = decisions(app, "io", "cancelled")
    assert cancelled.reason == "at send time: no SMS consent (never opted in, or sent STOP)"


def test_every_outcome_is_logged_with_the_facts_it_saw(app: App) -> None:
    signed_up(app, "jo", START)
    tick(app, START)
    (enrolled,) = decisions(app, "jo", "enrolled")
    assert enrolled.facts["email_opt_in"] is True and enrolled.facts["event"] == "signed_up"
    assert enrolled.rules_version == app.rules.version
    with Session(app.db) as session:
        (enrollment,) = session.scalars(select(Enrollment).where(Enrollment.customer_id == "jo"))
    assert enrollment.rules_version == app.rules.version


def test_re_evaluating_never_duplicates(app: App) -> None:
    signed_up(app, "ka", START)
    for _ in range(3):
        evaluation_tick(app, START, full=True, workers=0)
    with Session(app.db) as session:
        count = session.scalar(
            select(func.count()).select_from(Message).where(Message.customer_id == "ka")
        )
    assert count == 1


def test_an_absurd_total_is_unknown_and_does_not_stop_the_tick(app: App) -> None:
    signed_up(app, "zz", START)
    signed_up(app, "ok", START)
    with Session(app.db) as session:
        customer = session.get(Customer, "zz")
        assert customer is not None
        customer.total_spend_cents = 2**60  # beyond what the rules engine compares exactly
        session.commit()
    tick(app, START)
    assert [s for s, _, _ in sent(app, "ok")] == ["welcome"]
    assert [s for s, _, _ in sent(app, "zz")] == ["welcome"]
    (enrolled,) = decisions(app, "zz", "enrolled")
    assert "total_spend_cents" not in enrolled.facts  # unknown, not a crash

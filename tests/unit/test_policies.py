"""Policies are pure functions: consent, quiet hours (with DST), frequency caps, complaint pause."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from engine.journeys.policies import (
    Proposal,
    complaint_pause,
    consent,
    frequency_caps,
    next_allowed,
    quiet_hours,
)
from engine.playbooks.model import FrequencyCap, SendWindow

SMS_WINDOW = SendWindow(time(8), time(21))
MARKETING_SMS = Proposal(channel="sms", marketing=True, priority=10)
MARKETING_EMAIL = Proposal(channel="email", marketing=True, priority=10)


def local(moment: datetime, zone: str) -> datetime:
    return moment.astimezone(ZoneInfo(zone))


def test_sms_at_23_local_is_deferred_to_8_next_morning() -> None:
    # 23:00 in Tokyo is 14:00 UTC.
    due = datetime(2026, 6, 10, 14, 0, tzinfo=UTC)
    held = quiet_hours(due, SMS_WINDOW, "Asia/Tokyo")
    assert held is not None
    assert local(held.until, "Asia/Tokyo").replace(tzinfo=None) == datetime(2026, 6, 11, 8, 0)
    assert "quiet hours: the sending window is 08:00-21:00 local time in Asia/Tokyo" in held.reason


def test_deferral_across_spring_forward_lands_on_local_8am() -> None:
    # Europe/London moves to BST at 01:00 UTC on Sunday 29 March 2026.
    due = datetime(2026, 3, 28, 23, 0, tzinfo=UTC)  # 23:00 GMT on Saturday
    allowed = next_allowed(due, SMS_WINDOW, "Europe/London")
    assert allowed == datetime(2026, 3, 29, 7, 0, tzinfo=UTC)  # 08:00 BST
    assert local(allowed, "Europe/London").hour == 8


def test_deferral_across_fall_back_lands_on_local_8am() -> None:
    # America/New_York falls back at 06:00 UTC on Sunday 1 November 2026.
    due = datetime(2026, 11, 1, 3, 0, tzinfo=UTC)  # 23:00 EDT on Saturday
    allowed = next_allowed(due, SMS_WINDOW, "America/New_York")
    assert allowed == datetime(2026, 11, 1, 13, 0, tzinfo=UTC)  # 08:00 EST
    assert local(allowed, "America/New_York").hour == 8


def test_window_start_inside_a_dst_gap_moves_to_the_first_real_minute() -> None:
    window = SendWindow(time(2, 30), time(21))
    due = datetime(2026, 3, 8, 6, 0, tzinfo=UTC)  # 01:00 EST; 02:00-03:00 does not exist
    allowed = next_allowed(due, window, "America/New_York")
    assert local(allowed, "America/New_York").replace(tzinfo=None) == datetime(2026, 3, 8, 3, 0)


def test_inside_the_window_nothing_is_held() -> None:
    due = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)  # 13:00 in London
    assert quiet_hours(due, SMS_WINDOW, "Europe/London") is None
    assert quiet_hours(due, None, "Europe/London") is None


def test_window_over_midnight() -> None:
    night_shift = SendWindow(time(22), time(6))
    assert next_allowed(datetime(2026, 6, 10, 23, 30, tzinfo=UTC), night_shift, "UTC") == datetime(
        2026, 6, 10, 23, 30, tzinfo=UTC
    )
    assert next_allowed(datetime(2026, 6, 10, 12, 0, tzinfo=UTC), night_shift, "UTC") == datetime(
        2026, 6, 10, 22, 0, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("proposal", "facts", "reason"),
    [
        (MARKETING_EMAIL, {"has_email": True, "email_opt_in": False}, "no email marketing consent"),
        (
            MARKETING_EMAIL,
            {"has_email": False, "email_opt_in": True},
            "no email address, or the address is suppressed",
        ),
        (
            MARKETING_SMS,
            {"has_phone": True, "sms_opt_in": False},
            "no SMS consent (never opted in, or sent STOP)",
        ),
        (
            MARKETING_SMS,
            {"has_phone": False, "sms_opt_in": True},
            "no phone number, or the number is suppressed",
        ),
    ],
)
def test_consent_refusals_say_why(
    proposal: Proposal, facts: dict[str, object], reason: str
) -> None:
    refused = consent(proposal, facts)
    assert refused is not None and refused.reason == reason


def test_transactional_email_needs_an_address_but_no_marketing_opt_in() -> None:
    service = Proposal(channel="email", marketing=False, priority=1)
    assert consent(service, {"has_email": True, "email_opt_in": False}) is None


def test_marketing_of_a_topic_needs_the_channel_and_the_topic() -> None:
    offers = Proposal(channel="email", marketing=True, priority=30, topic="offers")
    consenting = {"has_email": True, "email_opt_in": True, "has_phone": True, "sms_opt_in": True}
    assert consent(offers, {**consenting, "topic.offers": True}) is None
    for value in (False, None):  # opted out, or a topic the facts do not know
        refused = consent(offers, {**consenting, "topic.offers": value})
        assert refused is not None and refused.reason == (
            "not subscribed to the offers topic (opted out, or never opted in)"
        )
    # The channel comes first: no email consent is said as such, whatever the topic.
    no_email = consent(offers, {**consenting, "email_opt_in": False, "topic.offers": True})
    assert no_email is not None and no_email.reason == "no email marketing consent"
    sms = Proposal(channel="sms", marketing=True, priority=30, topic="offers")
    assert consent(sms, {**consenting, "topic.offers": False}) is not None
    # Transactional messages ignore topics (a playbook cannot even name one).
    service = Proposal(channel="email", marketing=False, priority=1, topic="offers")
    assert consent(service, {**consenting, "topic.offers": False}) is None


def test_complaint_pauses_marketing_only() -> None:
    now = datetime(2026, 6, 10, tzinfo=UTC)
    held = complaint_pause(MARKETING_EMAIL, {"open_complaints": 1}, now)
    assert held is not None and held.reason == "paused: the customer has an open complaint case"
    assert complaint_pause(Proposal("email", False, 1), {"open_complaints": 1}, now) is None
    assert complaint_pause(MARKETING_EMAIL, {"open_complaints": 0}, now) is None


def test_frequency_cap_defers_until_the_window_has_room() -> None:
    now = datetime(2026, 6, 10, 12, tzinfo=UTC)
    caps = [FrequencyCap("any", 2, timedelta(days=7)), FrequencyCap("email", 1, timedelta(days=1))]
    recent = [(now - timedelta(days=6), "sms"), (now - timedelta(days=2), "email")]
    held = frequency_caps(MARKETING_EMAIL, now, caps, recent)
    assert held is not None
    assert held.until == now + timedelta(days=1)  # the 6-day-old one leaves the 7d window
    assert held.reason == "frequency cap: at most 2 messages per 1w"
    assert frequency_caps(Proposal("email", False, 1), now, caps, recent) is None


def test_per_channel_cap_counts_only_its_channel() -> None:
    now = datetime(2026, 6, 10, 12, tzinfo=UTC)
    caps = [FrequencyCap("sms", 1, timedelta(days=2))]
    assert frequency_caps(MARKETING_SMS, now, caps, [(now - timedelta(hours=1), "email")]) is None
    held = frequency_caps(MARKETING_SMS, now, caps, [(now - timedelta(hours=1), "sms")])
    assert held is not None and held.reason == "frequency cap: at most 1 sms message per 2d"


def test_a_cap_of_one_says_one_message_not_one_messages() -> None:
    """Was "at most 1 email messages per 1d"."""
    caps = [FrequencyCap(channel="email", max=1, per=timedelta(days=1))]
    now = datetime(2026, 3, 2, 12, tzinfo=UTC)
    held = frequency_caps(MARKETING_EMAIL, now, caps, [(now - timedelta(hours=1), "email")])
    assert held is not None and held.reason == "frequency cap: at most 1 email message per 1d"

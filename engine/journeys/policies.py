"""Policies between a decision and the outbox: small pure functions with stated reasons.

Each policy looks at one proposed message and answers ``Allow``, ``Defer(until, reason)``
or ``Skip(reason)``. They know nothing of the database: the journey code hands them the
facts, the customer's recent messages and the time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from engine.language.catalog import TOPIC_PREFIX
from engine.language.durations import format_duration
from engine.playbooks.model import FrequencyCap, SendWindow
from engine.wording import plural


@dataclass(frozen=True)
class Allow:
    at: datetime  # when the message may go


@dataclass(frozen=True)
class Defer:
    until: datetime
    reason: str


@dataclass(frozen=True)
class Skip:
    reason: str


Outcome = Allow | Defer | Skip


@dataclass(frozen=True)
class Proposal:
    """A message a journey step wants to send."""

    channel: str  # email | sms
    marketing: bool
    priority: int
    topic: str | None = None  # the playbook's subscription topic (marketing only)


def consent(proposal: Proposal, facts: Mapping[str, object]) -> Skip | None:
    """Email needs an unrevoked opt-in (for marketing) and an unsuppressed address; SMS
    needs an explicit opt-in with no STOP since, and an unsuppressed number. Marketing of
    a topic needs the topic too (``topic.<name>``: opted in, or never opted out of a topic
    that is opted in by default); transactional messages ignore topics."""
    if proposal.channel == "email":
        if not facts.get("has_email"):
            return Skip("no email address, or the address is suppressed")
        if proposal.marketing and not facts.get("email_opt_in"):
            return Skip("no email marketing consent")
        return _topic(proposal, facts)
    if not facts.get("has_phone"):
        return Skip("no phone number, or the number is suppressed")
    if not facts.get("sms_opt_in"):
        return Skip("no SMS consent (never opted in, or sent STOP)")
    return _topic(proposal, facts)


def _topic(proposal: Proposal, facts: Mapping[str, object]) -> Skip | None:
    if not proposal.marketing or proposal.topic is None:
        return None
    if facts.get(TOPIC_PREFIX + proposal.topic) is True:
        return None
    return Skip(f"not subscribed to the {proposal.topic} topic (opted out, or never opted in)")


def complaint_pause(proposal: Proposal, facts: Mapping[str, object], now: datetime) -> Defer | None:
    """No marketing while a complaint case is open; the step waits for its resolution."""
    open_cases = facts.get("open_complaints") or 0
    if proposal.marketing and isinstance(open_cases, int) and open_cases > 0:
        return Defer(now, "paused: the customer has an open complaint case")
    return None


def next_allowed(moment: datetime, window: SendWindow, timezone: str) -> datetime:
    """The first minute at or after ``moment`` inside the sending window, in local time.

    Works on wall-clock minutes in the customer's zone, so a window start that a
    daylight-saving jump skips (02:30 on a spring-forward night) lands on the first real
    minute after it, and an autumn repeat is not sent twice.
    """
    zone = ZoneInfo(timezone)
    local = moment.astimezone(zone)
    if _inside(local.timetz().replace(tzinfo=None), window):
        return moment
    candidate_day = local.date()
    start_today = datetime.combine(candidate_day, window.start)
    naive_local = local.replace(tzinfo=None)
    if naive_local >= start_today:
        candidate_day = candidate_day + timedelta(days=1)
    wall = datetime.combine(candidate_day, window.start)
    resolved = _resolve_wall_time(wall, zone)
    return resolved.astimezone(moment.tzinfo)


def _inside(clock: object, window: SendWindow) -> bool:
    start, end = window.start, window.end
    if start < end:
        return start <= clock < end  # type: ignore[operator]
    return clock >= start or clock < end  # type: ignore[operator]  # window over midnight


def _resolve_wall_time(wall: datetime, zone: ZoneInfo) -> datetime:
    """A local wall time as an aware instant; a time skipped by DST moves to the first
    minute after the gap (the gap is at most a few hours, so walking minutes is cheap)."""
    utc = ZoneInfo("UTC")
    aware = wall.replace(tzinfo=zone, fold=0)
    if aware.astimezone(utc).astimezone(zone).replace(tzinfo=None) == wall:
        return aware
    probe = wall.replace(tzinfo=zone, fold=1).astimezone(utc)  # the instant before the gap
    while probe.astimezone(zone).replace(tzinfo=None) < wall:
        probe += timedelta(minutes=1)
    return probe.astimezone(zone)


def quiet_hours(at: datetime, window: SendWindow | None, timezone: str) -> Defer | None:
    """Outside its sending window (quiet hours), a message waits for the window to open."""
    if window is None:
        return None
    allowed = next_allowed(at, window, timezone)
    if allowed == at:
        return None
    local = allowed.astimezone(ZoneInfo(timezone))
    return Defer(
        allowed,
        f"quiet hours: the sending window is {window} local time in {timezone}; "
        f"deferred to {local:%Y-%m-%d %H:%M %Z}",
    )


def frequency_caps(
    proposal: Proposal,
    at: datetime,
    caps: Sequence[FrequencyCap],
    recent: Sequence[tuple[datetime, str]],
) -> Defer | None:
    """Marketing only. ``recent`` is (due time, channel) of the customer's marketing
    messages that are queued or sent; the message waits until every window has room."""
    if not proposal.marketing:
        return None
    latest_free = at
    broken: FrequencyCap | None = None
    for cap in caps:
        if cap.channel not in ("any", proposal.channel):
            continue
        times = sorted(
            t for t, channel in recent if cap.channel in ("any", channel) and t > at - cap.per
        )
        if len(times) >= cap.max:
            # Room appears when the oldest message that fills the window leaves it.
            free_at = times[len(times) - cap.max] + cap.per
            if free_at > latest_free:
                latest_free, broken = free_at, cap
    if broken is None:
        return None
    kind = "message" if broken.channel == "any" else f"{broken.channel} message"
    return Defer(
        latest_free, f"frequency cap: at most {plural(broken.max, kind)} per {_span(broken.per)}"
    )


def _span(delta: timedelta) -> str:
    return format_duration(delta)

"""Housekeeping: delete what has outlived its purpose, set-based, one statement a table.

- ``webhook_receipts`` older than ``LIFECYCLE_WEBHOOK_RECEIPT_DAYS`` (7 by default). A
  receipt only has to outlive the provider's retries of that delivery: SendGrid retries a
  failed Event Webhook POST for up to 24 hours, Twilio retries a callback within seconds
  (connection overrides: a few retries within a total timeout of seconds). A week is a
  wide margin; a redelivery older than that would be applied again.
- console sessions that expired or were revoked more than a day ago (kept that long so
  ``lifecycle staff sessions`` can still show a recent sign-out);
- failed sign-in attempts older than the sign-in window (they no longer count).

Run by the scheduler every hour and by ``lifecycle tick``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_
from sqlmodel import col

from engine.bootstrap import App
from engine.data.models import SignInAttempt, StaffSession, WebhookReceipt
from engine.data.uow import unit_of_work

SESSION_GRACE = timedelta(days=1)


@dataclass(frozen=True)
class HousekeepingReport:
    receipts: int
    sessions: int
    attempts: int


def housekeeping_tick(app: App, now: datetime) -> HousekeepingReport:
    settings = app.settings
    receipts_before = now - timedelta(days=settings.webhook_receipt_days)
    sessions_before = now - SESSION_GRACE
    attempts_before = now - timedelta(seconds=settings.sign_in_window_s)
    with unit_of_work(app.db) as session:
        receipts = session.execute(
            delete(WebhookReceipt).where(col(WebhookReceipt.received_at) < receipts_before)
        )
        sessions = session.execute(
            delete(StaffSession).where(
                or_(
                    col(StaffSession.expires_at) < sessions_before,
                    col(StaffSession.revoked_at) < sessions_before,
                )
            )
        )
        attempts = session.execute(
            delete(SignInAttempt).where(col(SignInAttempt.at) < attempts_before)
        )
    return HousekeepingReport(
        receipts=_count(receipts), sessions=_count(sessions), attempts=_count(attempts)
    )


def _count(result: object) -> int:
    return int(getattr(result, "rowcount", 0) or 0)

"""Outbox test data: many customers, each with one queued marketing message per channel."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import Session

from engine.data.ingest import CustomerIn, upsert_customer
from engine.data.models import Message

# The fixture playbooks' templates: a personalized email, and an SMS.
TEMPLATES = {"email": ("welcome", "welcome_series"), "sms": ("last_chance", "re_engagement")}


def queue_for_many(
    db: Engine, count: int, channels: tuple[str, ...], now: datetime, prefix: str = "c"
) -> dict[str, str]:
    """``count`` opted-in customers in London (``prefix-00000``...), each with its own email
    address and phone number and one message due at ``now`` per channel; the message id
    by recipient (the address or the number)."""
    by_recipient: dict[str, str] = {}
    with Session(db) as session:
        for n in range(count):
            cid = f"{prefix}-{n:05d}"
            email, phone = f"{cid}@example.com", f"+1555{n:07d}"
            upsert_customer(
                session,
                CustomerIn(
                    id=cid,
                    email=email,
                    phone=phone,
                    first_name=f"Name{n}",
                    email_opt_in=True,
                    sms_opt_in=True,
                    timezone="Europe/London",
                    signed_up_at=now - timedelta(days=3),
                ),
                now,
            )
            for channel in channels:
                template, playbook = TEMPLATES[channel]
                message_id = str(uuid.uuid4())
                by_recipient[email if channel == "email" else phone] = message_id
                session.add(
                    Message(
                        id=message_id,
                        dedupe_key=f"test:{message_id}",
                        customer_id=cid,
                        playbook=playbook,
                        step_id=template,
                        kind="marketing",
                        channel=channel,
                        template=template,
                        to_address="",
                        context={"event": {}},
                        due_at=now,
                        created_at=now,
                        updated_at=now,
                    )
                )
        session.commit()
    return by_recipient

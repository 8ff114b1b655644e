"""The delivery ledger: what providers tell us about messages, and what recipients ask.

Shared by the web app's webhooks and unsubscribe page (and anything else that learns of a
delivery): each function applies one verified provider event or one request to the
messages, the suppressions and the customers' consent, in one transaction, exactly once.
Idempotency: the provider's event key goes into ``webhook_receipts`` (unique per
provider) in the same transaction as its effect, one savepoint per event, so a
redelivery, even a concurrent one, has the effect of one.

Error codes that mean a number will never take a message suppress it: Twilio 21610 (the
recipient sent STOP: also withdraws SMS consent), 21211 and 21614 (not a valid mobile
number), 30005 (unknown handset), 30006 (landline or unreachable carrier). Carrier
filtering (30007) and temporary unreachability (30003) do not.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from engine.data.ingest import set_email_consent, set_sms_consent
from engine.data.models import (
    Customer,
    Decision,
    Message,
    MessageStatus,
    Suppression,
    WebhookReceipt,
)
from engine.data.topics import set_topic
from engine.data.uow import unit_of_work
from engine.delivery.outbox import suppress

if TYPE_CHECKING:
    from channels.webhooks import SendGridEvent

# How far along a message is. A webhook moves a message forward only, never back: events
# arrive out of order (a "processed" after the "delivered"), and the dispatcher may record
# its own "sent" after a webhook that got there first (engine.delivery.outbox guards it).
RANK = {
    MessageStatus.QUEUED: 0,
    MessageStatus.SENDING: 0,
    MessageStatus.AMBIGUOUS: 0,
    MessageStatus.SENT: 1,
    MessageStatus.DELIVERED: 2,
    MessageStatus.BOUNCED: 3,
    MessageStatus.FAILED: 3,
    MessageStatus.CANCELLED: 3,
}
SENDGRID_DROP_SUPPRESS = {"Bounced Address", "Unsubscribed Address", "Spam Reporting Address"}
TWILIO_SUPPRESS_CODES = {
    "21610": "the recipient replied STOP",
    "21211": "not a valid phone number",
    "21614": "not a mobile number",
    "30005": "unknown or inactive handset",
    "30006": "landline or unreachable carrier",
}


def first_time(session: Session, provider: str, key: str, now: datetime) -> bool:
    """Record that (provider, key) was processed; False when it already was."""
    savepoint = session.begin_nested()
    try:
        session.add(WebhookReceipt(provider=provider, event_key=key[:200], received_at=now))
        session.flush()
    except IntegrityError:
        savepoint.rollback()
        return False
    savepoint.commit()
    return True


def _customers_with(session: Session, column: Any, value: str) -> list[Customer]:
    return list(session.scalars(select(Customer).where(column == value)))


def _decide(
    session: Session,
    customer_id: str,
    outcome: str,
    reason: str,
    now: datetime,
    message: Message | None = None,
) -> None:
    session.add(
        Decision(
            at=now,
            customer_id=customer_id,
            playbook=(message.playbook or "") if message is not None else "",
            step_id=message.step_id if message is not None else None,
            outcome=outcome,
            reason=reason[:500],
            enrollment_id=message.enrollment_id if message is not None else None,
            message_id=message.id if message is not None else None,
        )
    )


def _advance(
    session: Session,
    message: Message,
    status: MessageStatus,
    note: str | None,
    provider: str,
    provider_id: str | None,
    now: datetime,
) -> None:
    """What a provider's webhook says about a message: the provider has it, and how far
    it got.

    A row still in doubt is settled as sent, never sent again: sending (the dispatcher's
    guarded record then only fills in what is missing), ambiguous, or queued again by the
    dispatcher after a timeout whose request did arrive (``attempts > 0``; a row queued
    by hand, with its attempts reset, is left to the person who asked). The status moves
    forward only (``RANK``); the provider's id is filled in when the row lacks one.
    """
    status_was = message.status
    unsettled = status_was in (MessageStatus.SENDING, MessageStatus.AMBIGUOUS) or (
        status_was == MessageStatus.QUEUED and message.attempts > 0
    )
    if RANK[status_was] == 0 and not unsettled:
        return
    if unsettled:
        message.sent_at = message.sent_at or now
        message.settle_after = None
        if status_was != MessageStatus.SENDING and message.customer_id and message.kind != "staff":
            # No dispatcher will record this one: say here that it went out.
            why = f"settled by {provider}'s webhook: the provider has it"
            _decide(session, message.customer_id, "sent", why, now, message)
    if RANK[status] > RANK[status_was]:
        message.status = status
        message.last_error = note[:1000] if note else None
    elif note and status == status_was:
        message.last_error = note[:1000]
    if message.provider_id is None and provider_id:
        message.provider, message.provider_id = provider, provider_id
    message.updated_at = now


# ── SendGrid ────────────────────────────────────────────────────────────────────────


def find_sendgrid_message(session: Session, event: SendGridEvent) -> Message | None:
    """By our custom arg, else by SendGrid's message id and the address. The row is
    locked (PostgreSQL) so two webhooks about one message apply one after the other."""
    if event.lifecycle_message_id:
        message = session.get(Message, event.lifecycle_message_id, with_for_update=True)
        if message is not None:
            return message
    if event.x_message_id:
        statement = select(Message).where(
            col(Message.provider_id) == event.x_message_id,
            func.lower(col(Message.to_address)) == event.email.lower(),
        )
        return session.scalars(statement.with_for_update()).first()
    return None


SENDGRID_STATUS = {
    "processed": MessageStatus.SENT,
    "deferred": MessageStatus.SENT,
    "delivered": MessageStatus.DELIVERED,
    "bounce": MessageStatus.BOUNCED,
    "dropped": MessageStatus.FAILED,
}


def apply_sendgrid_event(session: Session, event: SendGridEvent, now: datetime) -> None:
    """The effect of one (new) SendGrid event on the ledger, suppressions and consent.

    Any event about a message proves SendGrid accepted it; processed, deferred,
    delivered, bounce and dropped say how far it got (see ``_advance``).
    """
    message = find_sendgrid_message(session, event)
    kind, reason = event.event, event.reason or ""
    if message is not None:
        status = SENDGRID_STATUS.get(kind, MessageStatus.SENT)
        note = f"sendgrid {kind}: {reason}" if kind in ("bounce", "dropped", "deferred") else None
        _advance(session, message, status, note, "sendgrid", event.x_message_id, now)
        if kind in ("open", "click") and message.customer_id and message.kind != "staff":
            url = str(event.raw.get("url") or "")
            why = f"sendgrid {kind}" + (f": {url}" if url else "")
            outcome = "opened" if kind == "open" else "clicked"
            _decide(session, message.customer_id, outcome, why, now, message)
    suppression = _sendgrid_suppression(event)
    if suppression is not None:
        suppress(session, "email", event.email.lower(), suppression, "sendgrid", now)
    if kind in ("unsubscribe", "spamreport"):
        for customer in _customers_with(session, col(Customer.email), event.email.lower()):
            if set_email_consent(customer, False, now):
                customer.updated_at = now
                _decide(
                    session,
                    customer.id,
                    "unsubscribed",
                    f"sendgrid {kind} from {event.email}",
                    now,
                    message,
                )


def _sendgrid_suppression(event: SendGridEvent) -> str | None:
    if event.event == "bounce" and (event.bounce_type or "bounce") == "bounce":
        return f"bounce: {event.reason or 'hard bounce'}"
    if event.event == "spamreport":
        return "spam report"
    if event.event == "unsubscribe":
        return "unsubscribed"
    if event.event == "dropped" and event.reason in SENDGRID_DROP_SUPPRESS:
        return f"dropped: {event.reason}"
    return None


def apply_sendgrid_events(db: Engine, events: list[SendGridEvent], now: datetime) -> dict[str, int]:
    """Apply a verified batch of SendGrid events, each once; counts what was new."""
    processed = duplicates = 0
    with unit_of_work(db) as session:
        for event in events:
            if first_time(session, "sendgrid", event.sg_event_id, now):
                apply_sendgrid_event(session, event, now)
                processed += 1
            else:
                duplicates += 1
    return {"processed": processed, "duplicates": duplicates}


TWILIO_STATUS = {
    "queued": MessageStatus.SENT,
    "accepted": MessageStatus.SENT,
    "scheduled": MessageStatus.SENT,
    "sending": MessageStatus.SENT,
    "sent": MessageStatus.SENT,
    "delivered": MessageStatus.DELIVERED,
    "read": MessageStatus.DELIVERED,
    "undelivered": MessageStatus.FAILED,
    "failed": MessageStatus.FAILED,
    "canceled": MessageStatus.FAILED,
}


def find_twilio_message(session: Session, sid: str, message_id: str | None) -> Message | None:
    """By the sid we recorded, else by our id in the callback URL (a callback that lands
    before the dispatcher recorded the sid, or for a message left ambiguous); locked like
    ``find_sendgrid_message``."""
    by_sid = select(Message).where(col(Message.provider_id) == sid).with_for_update()
    message = session.scalars(by_sid).first()
    if message is None and message_id:
        candidate = session.get(Message, message_id, with_for_update=True)
        if (
            candidate is not None
            and candidate.channel == "sms"
            and candidate.provider_id in (None, sid)
        ):
            message = candidate
    return message


def apply_twilio_status(
    db: Engine,
    sid: str,
    status: str,
    code: str,
    to: str,
    now: datetime,
    message_id: str | None = None,
) -> str:
    """The effect of one Twilio status callback (once per sid and status)."""
    with unit_of_work(db) as session:
        if not first_time(session, "twilio", f"{sid}:{status}", now):
            return "duplicate"
        message = find_twilio_message(session, sid, message_id)
        if message is not None:
            moved = TWILIO_STATUS.get(status, MessageStatus.SENT)
            note = None
            if moved == MessageStatus.FAILED:
                meaning = TWILIO_SUPPRESS_CODES.get(code, "")
                note = f"twilio {status}" + (f": error {code}" if code else "")
                note += f" ({meaning})" if meaning else ""
            _advance(session, message, moved, note, "twilio", sid, now)
        number = to or (message.to_address if message is not None else "")
        if code in TWILIO_SUPPRESS_CODES and number:
            suppress(
                session,
                "sms",
                number,
                f"twilio error {code}: {TWILIO_SUPPRESS_CODES[code]}",
                "twilio",
                now,
            )
            if code == "21610":
                _sms_opt_out(session, number, f"twilio error 21610 for {number}", now)
    return "processed"


def _sms_opt_out(session: Session, number: str, reason: str, now: datetime) -> None:
    for customer in _customers_with(session, col(Customer.phone), number):
        if set_sms_consent(customer, False, now):
            customer.updated_at = now
            _decide(session, customer.id, "unsubscribed", reason, now)


def apply_inbound_sms(
    db: Engine, sid: str, number: str, text: str, keyword: str, now: datetime
) -> None:
    """Apply an inbound SMS's STOP or START (``keyword``) once per message sid."""
    with unit_of_work(db) as session:
        if not first_time(session, "twilio-inbound", sid, now):
            return
        if keyword == "stop":
            said = f"SMS {' '.join(text.split()).upper()[:40]} from {number}"
            _sms_opt_out(session, number, said, now)
            suppress(session, "sms", number, "STOP", "twilio", now)
            _cancel_queued_sms(session, number, said, now)
        elif keyword == "start":
            for customer in _customers_with(session, col(Customer.phone), number):
                if set_sms_consent(customer, True, now):
                    customer.updated_at = now
                    _decide(session, customer.id, "resubscribed", f"SMS START from {number}", now)
            # Lift what STOP put there (ours, or Twilio's 21610 "replied STOP"), not bounces.
            session.execute(
                delete(Suppression).where(
                    col(Suppression.channel) == "sms",
                    col(Suppression.address) == number,
                    or_(
                        col(Suppression.reason) == "STOP",
                        col(Suppression.reason).startswith("twilio error 21610"),
                    ),
                )
            )


def _cancel_queued_sms(session: Session, number: str, said: str, now: datetime) -> None:
    """A STOP ends every customer SMS still queued for the number, or for a customer who
    has it, at once (one UPDATE ... RETURNING), each with a decision naming the STOP;
    dispatch would only have refused them at their due time, as "the number is
    suppressed". Staff notifications (about a customer, to a support lead) are not the
    customer's: they stay, and the suppression holds back any to this number."""
    messages = Message.__table__  # type: ignore[attr-defined]
    holders = select(col(Customer.id)).where(col(Customer.phone) == number)
    reason = f"cancelled: the recipient sent STOP ({said})"[:1000]
    statement = (
        update(messages)
        .where(
            messages.c.channel == "sms",
            messages.c.status == MessageStatus.QUEUED,
            messages.c.kind != "staff",
            or_(messages.c.to_address == number, messages.c.customer_id.in_(holders)),
        )
        .values(status=MessageStatus.CANCELLED, last_error=reason, updated_at=now)
        .returning(
            messages.c.id,
            messages.c.customer_id,
            messages.c.playbook,
            messages.c.step_id,
            messages.c.enrollment_id,
        )
    )
    decisions = [
        {
            "at": now,
            "customer_id": row.customer_id,
            "playbook": row.playbook or "",
            "step_id": row.step_id,
            "outcome": "cancelled",
            "reason": reason[:500],
            "enrollment_id": row.enrollment_id,
            "message_id": row.id,
            "facts": {},
        }
        for row in session.execute(statement)
        if row.customer_id is not None
    ]
    if decisions:
        session.execute(insert(Decision.__table__), decisions)  # type: ignore[attr-defined]


def apply_unsubscribe(
    db: Engine,
    customer_id: str,
    channel: str,
    message_id: str,
    now: datetime,
    topic: str | None = None,
) -> bool:
    """Withdraw the customer's consent for the channel, or with ``topic`` only their
    subscription to that topic (the preference centre; channel consent stays); False when
    it already was so."""
    with unit_of_work(db) as session:
        customer = session.get(Customer, customer_id)
        if customer is None:
            return False
        link = f"{channel} unsubscribe link"
        if topic is not None:
            if not set_topic(customer, topic, False, now, via=link):
                return False
            reason = f"left the {topic} topic ({link})"
        else:
            change = set_email_consent if channel == "email" else set_sms_consent
            if not change(customer, False, now):
                return False
            reason = link
        customer.updated_at = now
        message = session.get(Message, message_id) if message_id else None
        _decide(session, customer_id, "unsubscribed", reason, now, message)
    return True

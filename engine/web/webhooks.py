"""Provider webhooks and the unsubscribe link: signed requests in, ledger and consent out.

No API key here: each provider signs its requests, and the signature is checked on the
raw body before anything is parsed. A forged or unsigned request is a 403 and changes
nothing. Every delivery is idempotent: the provider's event key goes into
``webhook_receipts`` (unique per provider) in the same transaction as its effect, one
savepoint per event, so a redelivery, even a concurrent one, has the effect of one.

SendGrid (``POST /webhooks/sendgrid``)
    Verified with ``LIFECYCLE_SENDGRID_WEBHOOK_PUBLIC_KEY`` (ECDSA). The message is found by
    our custom arg ``lifecycle_message_id``, else by ``sg_message_id`` (the part before the
    first '.') together with the address, because one SendGrid request carrying many
    personalizations answers one X-Message-Id for all of them.

Twilio (``POST /webhooks/twilio/status`` and ``POST /webhooks/twilio/inbound``)
    Verified with ``LIFECYCLE_TWILIO_AUTH_TOKEN`` (HMAC-SHA1) over the URL Twilio called:
    ``LIFECYCLE_PUBLIC_BASE_URL`` + the request path (+ query). So ``public_base_url``
    must be exactly the public scheme://host[:port] that Twilio is given (behind a proxy,
    the proxy's public URL); otherwise every Twilio request is refused with 403.
    Error codes that mean the number will never take a message suppress it:
    21610 (the recipient sent STOP: also withdraws SMS consent), 21211 and 21614 (not a
    valid mobile number), 30005 (unknown handset), 30006 (landline or unreachable
    carrier). Carrier filtering (30007) and temporary unreachability (30003) do not.

Unsubscribe (``GET /u/{token}``, ``POST /u/{token}``)
    GET shows a confirmation page and changes nothing (mail scanners follow links);
    POST records the opt-out: RFC 8058 one-click (``List-Unsubscribe=One-Click``) and the
    page's button both post here.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from itsdangerous import BadData
from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col
from starlette.concurrency import run_in_threadpool

from channels.webhooks import (
    SENDGRID_SIGNATURE_HEADER,
    SENDGRID_TIMESTAMP_HEADER,
    TWILIO_SIGNATURE_HEADER,
    SendGridEvent,
    classify_inbound_sms,
    parse_sendgrid_events,
    verify_sendgrid,
    verify_twilio,
)
from engine.data.ingest import set_email_consent, set_sms_consent
from engine.data.models import (
    Customer,
    Decision,
    Message,
    MessageStatus,
    Suppression,
    WebhookReceipt,
)
from engine.delivery.dispatch import read_unsubscribe_token, suppress
from engine.errors import ConfigurationError, WebhookPayloadError, WebhookSignatureError
from engine.web import WebState, web_state

MAX_BODY = 8 * 1024 * 1024  # SendGrid posts batches of events; far below this in practice
TWIML = "application/xml"
XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'
EMPTY_TWIML = f"{XML_DECLARATION}<Response/>"

router = APIRouter(tags=["webhooks"])

# Before the provider confirmed anything: a webhook about the message proves it was accepted.
UNSETTLED = (MessageStatus.SENDING, MessageStatus.AMBIGUOUS)
IN_FLIGHT = (MessageStatus.SENDING, MessageStatus.SENT, MessageStatus.AMBIGUOUS)
SENDGRID_DROP_SUPPRESS = {"Bounced Address", "Unsubscribed Address", "Spam Reporting Address"}
TWILIO_SUPPRESS_CODES = {
    "21610": "the recipient replied STOP",
    "21211": "not a valid phone number",
    "21614": "not a mobile number",
    "30005": "unknown or inactive handset",
    "30006": "landline or unreachable carrier",
}


class Refused(Exception):
    """A webhook request answered without touching the database."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(detail)


def refused_response(exc: Refused) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)


async def raw_body(request: Request, limit: int = MAX_BODY) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"the body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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


def _settle(message: Message, now: datetime) -> None:
    """The provider has the message: an ambiguous or in-flight row is sent, not lost."""
    if message.status in UNSETTLED:
        message.status = MessageStatus.SENT
        message.sent_at = message.sent_at or now
        message.updated_at = now


def _set_status(message: Message, status: MessageStatus, error: str | None, now: datetime) -> None:
    message.status = status
    if error:
        message.last_error = error[:1000]
    message.updated_at = now


# ── SendGrid ────────────────────────────────────────────────────────────────────────


def find_sendgrid_message(session: Session, event: SendGridEvent) -> Message | None:
    if event.lifecycle_message_id:
        message = session.get(Message, event.lifecycle_message_id)
        if message is not None:
            return message
    if event.x_message_id:
        statement = select(Message).where(
            col(Message.provider_id) == event.x_message_id,
            func.lower(col(Message.to_address)) == event.email.lower(),
        )
        return session.scalars(statement).first()
    return None


def apply_sendgrid_event(session: Session, event: SendGridEvent, now: datetime) -> None:
    """The effect of one (new) SendGrid event on the ledger, suppressions and consent."""
    message = find_sendgrid_message(session, event)
    kind, reason = event.event, event.reason or ""
    if message is not None:
        _settle(message, now)
        if kind == "delivered" and message.status in IN_FLIGHT:
            _set_status(message, MessageStatus.DELIVERED, None, now)
        elif kind == "bounce":
            _set_status(message, MessageStatus.BOUNCED, f"sendgrid bounce: {reason}", now)
        elif kind == "dropped" and message.status != MessageStatus.BOUNCED:
            _set_status(message, MessageStatus.FAILED, f"sendgrid dropped: {reason}", now)
        elif kind == "deferred":
            message.last_error = f"sendgrid deferred: {reason}"[:1000]
            message.updated_at = now
        elif kind in ("open", "click") and message.customer_id and message.kind != "staff":
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


def apply_sendgrid_events(db: Any, events: list[SendGridEvent], now: datetime) -> dict[str, int]:
    processed = duplicates = 0
    with Session(db, expire_on_commit=False) as session:
        for event in events:
            if first_time(session, "sendgrid", event.sg_event_id, now):
                apply_sendgrid_event(session, event, now)
                processed += 1
            else:
                duplicates += 1
        session.commit()
    return {"processed": processed, "duplicates": duplicates}


@router.post("/webhooks/sendgrid", summary="SendGrid Event Webhook (signed)")
async def sendgrid_events(request: Request) -> Response:
    web = web_state(request)
    key = web.app.settings.sendgrid_webhook_public_key
    try:
        if not key:
            raise Refused(
                503, "set LIFECYCLE_SENDGRID_WEBHOOK_PUBLIC_KEY to accept SendGrid events"
            )
        body = await raw_body(request)
        now = web.app.clock()
        verify_sendgrid(
            key,
            body,
            request.headers.get(SENDGRID_SIGNATURE_HEADER),
            request.headers.get(SENDGRID_TIMESTAMP_HEADER),
            now=now.timestamp(),
        )
        events = parse_sendgrid_events(body)
    except Refused as exc:
        return refused_response(exc)
    except WebhookSignatureError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=403)
    except ConfigurationError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=503)
    except WebhookPayloadError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=400)
    counts = await run_in_threadpool(apply_sendgrid_events, web.app.db, events, now)
    return JSONResponse(counts)


# ── Twilio ──────────────────────────────────────────────────────────────────────────


def twilio_url(web: WebState, request: Request) -> str:
    """The URL Twilio signed: the configured public base URL, never the Host header."""
    url = web.app.settings.public_base_url.rstrip("/") + request.url.path
    return f"{url}?{request.url.query}" if request.url.query else url


async def verified_twilio_params(web: WebState, request: Request) -> dict[str, str]:
    token = web.app.settings.twilio_auth_token
    if token is None or not token.get_secret_value():
        raise Refused(503, "set LIFECYCLE_TWILIO_AUTH_TOKEN to accept Twilio webhooks")
    body = await raw_body(request, limit=64 * 1024)
    try:
        params = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False))
    except UnicodeDecodeError:
        raise Refused(403, "twilio webhook refused: the body is not UTF-8") from None
    try:
        verify_twilio(
            token.get_secret_value(),
            twilio_url(web, request),
            params,
            request.headers.get(TWILIO_SIGNATURE_HEADER),
        )
    except WebhookSignatureError as exc:
        raise Refused(403, str(exc)) from None
    return params


def _require(params: Mapping[str, str], *names: str) -> list[str]:
    missing = [name for name in names if not params.get(name)]
    if missing:
        raise Refused(400, f"twilio webhook without {', '.join(missing)}")
    return [params[name] for name in names]


def apply_twilio_status(db: Any, params: Mapping[str, str], now: datetime) -> str:
    sid, status = _require(params, "MessageSid", "MessageStatus")
    code = params.get("ErrorCode") or ""
    with Session(db, expire_on_commit=False) as session:
        if not first_time(session, "twilio", f"{sid}:{status}", now):
            return "duplicate"
        message = session.scalars(select(Message).where(col(Message.provider_id) == sid)).first()
        if message is not None:
            _settle(message, now)
            if status == "delivered" and message.status in IN_FLIGHT:
                _set_status(message, MessageStatus.DELIVERED, None, now)
            elif status in ("undelivered", "failed") and message.status != MessageStatus.DELIVERED:
                meaning = TWILIO_SUPPRESS_CODES.get(code, "")
                detail = f"twilio {status}" + (f": error {code}" if code else "")
                _set_status(
                    message,
                    MessageStatus.FAILED,
                    detail + (f" ({meaning})" if meaning else ""),
                    now,
                )
        number = params.get("To") or (message.to_address if message is not None else "")
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
        session.commit()
    return "processed"


def _sms_opt_out(session: Session, number: str, reason: str, now: datetime) -> None:
    for customer in _customers_with(session, col(Customer.phone), number):
        if set_sms_consent(customer, False, now):
            customer.updated_at = now
            _decide(session, customer.id, "unsubscribed", reason, now)


def apply_inbound_sms(db: Any, params: Mapping[str, str], now: datetime) -> str:
    """Apply STOP or START once per MessageSid; returns what was asked (stop/start/help/other)."""
    sid, number = _require(params, "MessageSid", "From")
    keyword = classify_inbound_sms(params.get("Body", ""))
    with Session(db, expire_on_commit=False) as session:
        if not first_time(session, "twilio-inbound", sid, now):
            return keyword
        if keyword == "stop":
            _sms_opt_out(
                session, number, f"SMS {params.get('Body', '').strip().upper()} from {number}", now
            )
            suppress(session, "sms", number, "STOP", "twilio", now)
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
        session.commit()
    return keyword


def twiml(message: str | None = None) -> Response:
    if message is None:
        return Response(EMPTY_TWIML, media_type=TWIML)
    body = f"{XML_DECLARATION}<Response><Message>{escape(message)}</Message></Response>"
    return Response(body, media_type=TWIML)


def help_text(brand: str) -> str:
    return f"{brand}: account and offer messages. Msg&data rates may apply. Reply STOP to opt out."


@router.post("/webhooks/twilio/status", summary="Twilio message status callback (signed)")
async def twilio_status(request: Request) -> Response:
    web = web_state(request)
    try:
        params = await verified_twilio_params(web, request)
        await run_in_threadpool(apply_twilio_status, web.app.db, params, web.app.clock())
    except Refused as exc:
        return refused_response(exc)
    return twiml()


@router.post("/webhooks/twilio/inbound", summary="Twilio inbound SMS (signed): STOP, START, HELP")
async def twilio_inbound(request: Request) -> Response:
    web = web_state(request)
    try:
        params = await verified_twilio_params(web, request)
        keyword = await run_in_threadpool(apply_inbound_sms, web.app.db, params, web.app.clock())
    except Refused as exc:
        return refused_response(exc)
    if keyword == "help":
        return twiml(help_text(web.brand()))
    return twiml()


# ── the unsubscribe link ────────────────────────────────────────────────────────────


def _read_token(web: WebState, token: str) -> tuple[str, str, str] | None:
    try:
        customer_id, channel, message_id = read_unsubscribe_token(
            web.app.settings.secret_key.get_secret_value(), token
        )
    except (BadData, ValueError, TypeError):
        return None
    return (customer_id, channel, message_id) if channel in ("email", "sms") else None


def apply_unsubscribe(
    db: Any, customer_id: str, channel: str, message_id: str, now: datetime
) -> bool:
    """Withdraw the customer's consent for the channel; False when it already was."""
    with Session(db, expire_on_commit=False) as session:
        customer = session.get(Customer, customer_id)
        if customer is None:
            return False
        change = set_email_consent if channel == "email" else set_sms_consent
        if not change(customer, False, now):
            return False
        customer.updated_at = now
        message = session.get(Message, message_id) if message_id else None
        _decide(session, customer_id, "unsubscribed", f"{channel} unsubscribe link", now, message)
        session.commit()
    return True


def _unsubscribe_page(
    web: WebState,
    request: Request,
    state: str,
    token: str = "",
    channel: str = "email",
    status_code: int = 200,
) -> Response:
    context = {"state": state, "token": token, "channel": channel, "brand": web.brand()}
    response = web.render(request, "unsubscribe.html", context, status_code)
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@router.get("/u/{token}", include_in_schema=False)
def unsubscribe_confirm(token: str, request: Request) -> Response:
    web = web_state(request)
    read = _read_token(web, token)
    if read is None:
        return _unsubscribe_page(web, request, "invalid", status_code=400)
    return _unsubscribe_page(web, request, "confirm", token=token, channel=read[1])


@router.post("/u/{token}", include_in_schema=False)
def unsubscribe(token: str, request: Request) -> Response:
    """RFC 8058 one-click: mail providers post ``List-Unsubscribe=One-Click`` with no
    cookies and no CSRF token; the signed token is the credential."""
    web = web_state(request)
    read = _read_token(web, token)
    if read is None:
        return _unsubscribe_page(web, request, "invalid", status_code=400)
    customer_id, channel, message_id = read
    apply_unsubscribe(web.app.db, customer_id, channel, message_id, web.app.clock())
    return _unsubscribe_page(web, request, "done", channel=channel)

"""Provider webhooks and the unsubscribe link: signed requests in, ledger and consent out.

No API key here: each provider signs its requests, and the signature is checked on the
raw body before anything is parsed. A forged or unsigned request is a 403 and changes
nothing. What a verified request does is the ledger's (``engine.usecases.ledger``),
which applies every delivery exactly once.

SendGrid (``POST /webhooks/sendgrid``)
    Verified with ``LIFECYCLE_SENDGRID_WEBHOOK_PUBLIC_KEY`` (ECDSA). The message is found by
    our custom arg ``lifecycle_message_id``, else by ``sg_message_id`` (the part before the
    first '.') together with the address, because one SendGrid request carrying many
    personalizations answers one X-Message-Id for all of them.

Twilio (``POST /webhooks/twilio/status`` and ``POST /webhooks/twilio/inbound``)
    Verified with ``LIFECYCLE_TWILIO_AUTH_TOKEN`` (HMAC-SHA1) over the URL Twilio called:
    ``LIFECYCLE_PUBLIC_BASE_URL`` + the request path (+ query). So ``public_base_url``
    must be exactly the public scheme://host[:port] that Twilio is given (behind a proxy,
    the proxy's public URL); otherwise every Twilio request is refused with 403. The
    status callback URL the channel gives Twilio carries our message id
    (``?lifecycle_message_id=...``), so a callback that lands before the dispatcher has
    recorded Twilio's sid still finds its message.

Unsubscribe (``GET /u/{token}``, ``POST /u/{token}``)
    GET shows a confirmation page and changes nothing (mail scanners follow links): for a
    message of a subscription topic it offers "only <this topic>" and "everything" (all
    marketing on that channel), from the same signed link. POST records the choice: the
    page's buttons say which; RFC 8058 one-click (``List-Unsubscribe=One-Click``) leaves
    the message's topic (everything for a message without one).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from itsdangerous import BadData
from starlette.concurrency import run_in_threadpool
from twilio.twiml.messaging_response import MessagingResponse

from channels.webhooks import (
    MESSAGE_ID_ARG,
    SENDGRID_SIGNATURE_HEADER,
    SENDGRID_TIMESTAMP_HEADER,
    TWILIO_SIGNATURE_HEADER,
    classify_inbound_sms,
    parse_sendgrid_events,
    verify_sendgrid,
    verify_twilio,
)
from engine.delivery.dispatch import UnsubscribeLink, read_unsubscribe_token
from engine.errors import (
    ConfigurationError,
    RulesInvalid,
    WebhookPayloadError,
    WebhookSignatureError,
)
from engine.language.catalog import Topic
from engine.usecases.ledger import (
    apply_inbound_sms,
    apply_sendgrid_events,
    apply_twilio_status,
    apply_unsubscribe,
)
from engine.web import WebState, web_state

MAX_BODY = 8 * 1024 * 1024  # SendGrid posts batches of events; far below this in practice
TWIML = "application/xml"

router = APIRouter(tags=["webhooks"])


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


def twiml(message: str | None = None) -> Response:
    """A TwiML answer, built by the Twilio SDK: empty (nothing to reply), or one message."""
    answer = MessagingResponse()
    if message is not None:
        answer.message(message)
    return Response(answer.to_xml(), media_type=TWIML)


def help_text(brand: str) -> str:
    return f"{brand}: account and offer messages. Msg&data rates may apply. Reply STOP to opt out."


@router.post("/webhooks/twilio/status", summary="Twilio message status callback (signed)")
async def twilio_status(request: Request) -> Response:
    web = web_state(request)
    try:
        params = await verified_twilio_params(web, request)
        sid, status = _require(params, "MessageSid", "MessageStatus")
        await run_in_threadpool(
            apply_twilio_status,
            web.app.db,
            sid,
            status,
            params.get("ErrorCode") or "",
            params.get("To") or "",
            web.app.clock(),
            request.query_params.get(MESSAGE_ID_ARG),
        )
    except Refused as exc:
        return refused_response(exc)
    return twiml()


@router.post("/webhooks/twilio/inbound", summary="Twilio inbound SMS (signed): STOP, START, HELP")
async def twilio_inbound(request: Request) -> Response:
    web = web_state(request)
    try:
        params = await verified_twilio_params(web, request)
        sid, number = _require(params, "MessageSid", "From")
        text = params.get("Body", "")
        keyword = classify_inbound_sms(text)
        await run_in_threadpool(
            apply_inbound_sms, web.app.db, sid, number, text, keyword, web.app.clock()
        )
    except Refused as exc:
        return refused_response(exc)
    if keyword == "help":
        return twiml(help_text(web.brand()))
    return twiml()


# ── the unsubscribe link ────────────────────────────────────────────────────────────


def _read_token(web: WebState, token: str) -> UnsubscribeLink | None:
    try:
        link = read_unsubscribe_token(web.app.settings.secret_keys(), token)
    except (BadData, ValueError, TypeError):
        return None
    return link if link.channel in ("email", "sms") else None


def _topic_of(web: WebState, link: UnsubscribeLink) -> Topic | None:
    """The link's topic as the catalog declares it now; None without one (or when the
    rules do not load, or the topic was removed: then only "everything" is offered)."""
    if link.topic is None:
        return None
    try:
        return web.app.rules.catalog.topics.get(link.topic)
    except RulesInvalid:
        return None


def _unsubscribe_page(
    web: WebState,
    request: Request,
    state: str,
    link: UnsubscribeLink | None = None,
    token: str = "",
    left: str = "",
    status_code: int = 200,
) -> Response:
    context = {
        "state": state,
        "token": token,
        "channel": link.channel if link is not None else "email",
        "topic": _topic_of(web, link) if link is not None else None,
        "left": left,  # what the customer just left: "topic" or "everything"
        "brand": web.brand(),
    }
    response = web.render(request, "unsubscribe.html", context, status_code)
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@router.get("/u/{token}", include_in_schema=False)
def unsubscribe_confirm(token: str, request: Request) -> Response:
    web = web_state(request)
    link = _read_token(web, token)
    if link is None:
        return _unsubscribe_page(web, request, "invalid", status_code=400)
    return _unsubscribe_page(web, request, "confirm", link, token)


@router.post("/u/{token}", include_in_schema=False)
async def unsubscribe(token: str, request: Request) -> Response:
    """The page's buttons post ``scope=topic`` (only the message's topic) or
    ``scope=everything`` (the channel's marketing). RFC 8058 one-click posts
    ``List-Unsubscribe=One-Click``, with no cookies and no CSRF token (the signed token is
    the credential); it leaves the message's topic: the list the message came from, as
    RFC 8058 says (the link identifies "the list from which the recipient is to be
    removed"), and everything for a message without a topic."""
    web = web_state(request)
    link = _read_token(web, token)
    if link is None:
        return _unsubscribe_page(web, request, "invalid", status_code=400)
    form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
    topic = await run_in_threadpool(_topic_of, web, link)
    scope = "everything" if topic is None or form.get("scope") == "everything" else "topic"
    await run_in_threadpool(
        apply_unsubscribe,
        web.app.db,
        link.customer_id,
        link.channel,
        link.message_id,
        web.app.clock(),
        topic.name if scope == "topic" and topic is not None else None,
    )
    return _unsubscribe_page(web, request, "done", link, token, left=scope)

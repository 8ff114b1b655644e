"""Provider webhooks: signature checks and payload parsing, as pure functions.

No web framework here: the web app hands in the raw body, the headers and the time, and
gets back parsed events or a ``WebhookSignatureError`` / ``WebhookPayloadError`` whose
text says what was wrong.

SendGrid signs its Event Webhook with ECDSA (P-256, SHA-256) over the timestamp header
followed by the raw body, byte for byte: verify before parsing, and never re-serialize
the JSON. Twilio signs with HMAC-SHA1 over the full URL it called plus the sorted POST
parameters, keyed with the account's auth token.
"""

from __future__ import annotations

import binascii
import functools
import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from sendgrid.helpers.eventwebhook import EventWebhook, EventWebhookHeader
from twilio.request_validator import RequestValidator

from engine.errors import ConfigurationError, WebhookPayloadError, WebhookSignatureError

SENDGRID_SIGNATURE_HEADER = EventWebhookHeader.SIGNATURE
SENDGRID_TIMESTAMP_HEADER = EventWebhookHeader.TIMESTAMP
TWILIO_SIGNATURE_HEADER = "X-Twilio-Signature"
MESSAGE_ID_ARG = "lifecycle_message_id"  # the custom arg channels.sendgrid_email sets

InboundKeyword = Literal["stop", "start", "help", "other"]
# CTIA's opt-out and opt-in keywords (Twilio's defaults), with the words of the FCC's
# consent-revocation rules in force since April 2025 (REVOKE, "opt out"; OPTOUT, its
# one-word spelling). Compared after normalising (see classify_inbound_sms), so "opt out",
# "Opt-Out" and "OPTOUT" are one.
STOP_WORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
)
START_WORDS = frozenset({"START", "UNSTOP", "YES"})
HELP_WORDS = frozenset({"HELP", "INFO"})
# Around the keyword: spaces and punctuation ("Stop.", "STOP!!", "'quit'") do not count;
# inside it, spaces, hyphens and underscores do not either ("opt out", "opt-out").
_AROUND = string.whitespace + string.punctuation
_INSIDE = re.compile(r"[\s_-]+")


# ── SendGrid ────────────────────────────────────────────────────────────────────────


@functools.lru_cache(maxsize=8)
def _sendgrid_key(public_key: str) -> EllipticCurvePublicKey:
    """The verification key SendGrid shows (base64 DER); a full PEM block is accepted too."""
    body = "".join(
        line.strip()
        for line in public_key.strip().splitlines()
        if line.strip() and not line.startswith("-----")
    )
    try:
        key = EventWebhook().convert_public_key_to_ecdsa(body)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            "sendgrid_webhook_public_key", f"is not a valid public key ({exc})"
        ) from exc
    if not isinstance(key, EllipticCurvePublicKey):
        raise ConfigurationError(
            "sendgrid_webhook_public_key", "is not an elliptic-curve (ECDSA) public key"
        )
    return key


def verify_sendgrid(
    public_key: str,
    raw_body: bytes,
    signature: str | None,
    timestamp: str | None,
    now: float,
    tolerance_s: int = 300,
) -> None:
    """Return if SendGrid signed ``raw_body`` at ``timestamp``; raise WebhookSignatureError.

    ``signature`` and ``timestamp`` are the values of the
    ``X-Twilio-Email-Event-Webhook-Signature`` and ``...-Timestamp`` headers (``None`` or
    empty when absent). A timestamp more than ``tolerance_s`` seconds away from ``now``,
    in either direction, is refused, so a captured request cannot be replayed later.
    A malformed ``public_key`` raises ConfigurationError.
    """
    if not signature:
        raise WebhookSignatureError("sendgrid", f"missing {SENDGRID_SIGNATURE_HEADER} header")
    if not timestamp:
        raise WebhookSignatureError("sendgrid", f"missing {SENDGRID_TIMESTAMP_HEADER} header")
    try:
        signed_at = int(timestamp)
    except ValueError:
        raise WebhookSignatureError(
            "sendgrid", f"timestamp {timestamp!r} is not a whole number of seconds"
        ) from None
    age = now - signed_at
    if age > tolerance_s:
        raise WebhookSignatureError(
            "sendgrid", f"timestamp is {age:.0f} s old, more than the {tolerance_s} s allowed"
        )
    if -age > tolerance_s:
        raise WebhookSignatureError(
            "sendgrid", f"timestamp is {-age:.0f} s in the future, more than {tolerance_s} s"
        )
    try:
        payload = raw_body.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookSignatureError("sendgrid", "the body is not UTF-8") from None
    key = _sendgrid_key(public_key)
    try:
        valid = EventWebhook().verify_signature(payload, signature, timestamp, public_key=key)
    except (binascii.Error, ValueError):
        raise WebhookSignatureError("sendgrid", "the signature is not base64") from None
    if not valid:
        raise WebhookSignatureError(
            "sendgrid", "the signature does not match the body and timestamp"
        )


@dataclass(frozen=True)
class SendGridEvent:
    """One event of SendGrid's Event Webhook.

    ``sg_event_id`` is unique per event (use it to ignore redeliveries);
    ``lifecycle_message_id`` is our outbox id, from the custom arg the channel set;
    ``reason`` explains bounces, drops and deferrals; ``raw`` keeps every field as sent.
    """

    event: str
    email: str
    timestamp: int
    sg_event_id: str
    sg_message_id: str | None = None
    lifecycle_message_id: str | None = None
    reason: str | None = None
    bounce_type: str | None = None  # "bounce" or "blocked", for bounce events
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def x_message_id(self) -> str | None:
        """The ``X-Message-Id`` SendGrid answered the send with (``Sent.provider_id``)."""
        return self.sg_message_id.split(".", 1)[0] if self.sg_message_id else None


def _text(item: Mapping[str, Any], name: str, problems: list[str], where: str) -> str | None:
    value = item.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        problems.append(f"{where}: {name!r} must be a string, not {type(value).__name__}")
        return None
    return str(value)


def _event(index: int, item: Any, problems: list[str]) -> SendGridEvent | None:
    where = f"event {index}"
    if not isinstance(item, dict):
        problems.append(f"{where}: must be a JSON object, not {type(item).__name__}")
        return None
    before = len(problems)
    for name in ("event", "email", "sg_event_id"):
        if not isinstance(item.get(name), str) or not item[name]:
            problems.append(f"{where}: {name!r} is missing or not a non-empty string")
    stamp = item.get("timestamp")
    seconds: int | None = None
    if isinstance(stamp, int) and not isinstance(stamp, bool):
        seconds = stamp
    elif isinstance(stamp, float) and stamp.is_integer():
        seconds = int(stamp)
    else:
        problems.append(f"{where}: 'timestamp' is missing or not whole seconds: {stamp!r}")
    names = ("sg_message_id", MESSAGE_ID_ARG, "reason", "type")
    optional = {name: _text(item, name, problems, where) for name in names}
    if len(problems) > before or seconds is None:
        return None
    return SendGridEvent(
        event=item["event"],
        email=item["email"],
        timestamp=seconds,
        sg_event_id=item["sg_event_id"],
        sg_message_id=optional["sg_message_id"],
        lifecycle_message_id=optional[MESSAGE_ID_ARG],
        reason=optional["reason"],
        bounce_type=optional["type"],
        raw=MappingProxyType(item),
    )


def parse_sendgrid_events(raw_body: bytes | str) -> list[SendGridEvent]:
    """Parse a (verified) Event Webhook body: a JSON array of event objects.

    Raises WebhookPayloadError listing every bad element by its 0-based index.
    """
    try:
        text = raw_body.decode("utf-8") if isinstance(raw_body, bytes) else raw_body
    except UnicodeDecodeError as exc:
        problem = f"the body is not UTF-8 ({exc.reason} at byte {exc.start})"
        raise WebhookPayloadError("sendgrid", [problem]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WebhookPayloadError(
            "sendgrid",
            [f"the body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"],
        ) from None
    if not isinstance(data, list):
        raise WebhookPayloadError(
            "sendgrid", [f"the body must be a JSON array of events, not {type(data).__name__}"]
        )
    problems: list[str] = []
    events = [_event(index, item, problems) for index, item in enumerate(data)]
    if problems:
        raise WebhookPayloadError("sendgrid", problems)
    return [e for e in events if e is not None]


# ── Twilio ──────────────────────────────────────────────────────────────────────────


def verify_twilio(
    auth_token: str, url: str, params: Mapping[str, str], signature: str | None
) -> None:
    """Return if Twilio signed this request; raise WebhookSignatureError otherwise.

    ``url`` is the full URL Twilio called, exactly as configured on Twilio's side (scheme,
    host, path and query; behind a proxy, the public one); ``params`` are the POST form
    fields; ``signature`` is the ``X-Twilio-Signature`` header.
    """
    if not signature:
        raise WebhookSignatureError("twilio", f"missing {TWILIO_SIGNATURE_HEADER} header")
    if not RequestValidator(auth_token).validate(url, params, signature):
        raise WebhookSignatureError(
            "twilio",
            f"the signature does not match {url} and its {len(params)} parameter(s) "
            "(is this the public URL Twilio was given?)",
        )


def classify_inbound_sms(body: str) -> InboundKeyword:
    """What an inbound SMS asks for: the whole message must be one keyword, compared
    case-insensitively with the spaces and punctuation around it and the spaces or hyphens
    inside it removed. STOP family: STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, REVOKE,
    OPTOUT ("opt out"); START family: START, UNSTOP, YES; HELP, INFO. A sentence that
    merely contains a keyword ("stop the deliveries please") is no keyword.
    """
    word = _INSIDE.sub("", body.strip(_AROUND)).upper()
    if word in STOP_WORDS:
        return "stop"
    if word in START_WORDS:
        return "start"
    if word in HELP_WORDS:
        return "help"
    return "other"

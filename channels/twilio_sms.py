"""SMS through Twilio's Messages API, with the official ``twilio`` SDK.

``base_url`` points the SDK somewhere other than ``https://api.twilio.com`` (the local
fake provider in tests): the client is given a ``TwilioHttpClient`` subclass that
rewrites every ``https://*.twilio.com`` URL to it, path and query kept.

Errors are translated here and nowhere else:

=================================================  =====================================
429                                                transient; ``retry_after`` from
                                                   ``Retry-After`` when Twilio sends it
5xx, timeouts, refused or dropped connections      transient
21211 invalid 'To', 21610 unsubscribed (STOP),     permanent, ``suppress=True``: the
21614 not a mobile number                          number must get nothing more
21408 region not enabled, any other 4xx            permanent
=================================================  =====================================

A timeout is ambiguous (Twilio may have queued the message before the answer was lost);
it is reported as transient, so a retry may rarely deliver twice (unless Twilio's status
callback, which names our message in its URL, tells the ledger first).

The status callback URL carries our message id (``?lifecycle_message_id=...``): Twilio
calls it back exactly as given, so the ledger finds the message even before its sid is
recorded. ``lookup`` (the dispatcher's settlement of a message a crash left ambiguous)
reads Twilio's records of messages to the recipient through the same SDK: the body's
SHA-256 recognises ours, because Twilio returns the body but not the callback URL.

The auth token is never printed: ``repr`` hides it, and the SDK logs no Authorization
header.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Literal, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import requests
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from engine.delivery.outbound import (
    Attempt,
    Email,
    ProviderRecord,
    Sent,
    Sms,
    body_digest,
    retry_after_seconds,
)
from engine.errors import (
    ChannelError,
    ConfigurationError,
    PermanentChannelError,
    TransientChannelError,
)

PROVIDER = "twilio"
MESSAGE_ID_ARG = "lifecycle_message_id"  # in the status callback's query
SUPPRESS_CODES = frozenset({21211, 21610, 21614})
PERMANENT_CODES = SUPPRESS_CODES | {21408}
_SDK_PREFIX = re.compile(r"^Unable to (create|fetch) (record|page): ")
# Settlement lookups: clocks may differ this much; at most this many records per lookup.
LOOKUP_SKEW = timedelta(minutes=10)
LOOKUP_MAX_RECORDS = 1000
LOOKUP_PAGE_SIZE = 100
# Twilio's message statuses folded to ours (anything else it holds counts as sent).
TWILIO_STATUS: dict[str, Literal["sent", "delivered", "failed"]] = {
    "delivered": "delivered",
    "read": "delivered",
    "undelivered": "failed",
    "failed": "failed",
    "canceled": "failed",
}
T = TypeVar("T")


class _HttpClient(TwilioHttpClient):
    """Rewrites Twilio's hosts to ``base_url`` and remembers each thread's last headers.

    ``TwilioRestException`` carries no response headers, so ``Retry-After`` is read from
    the response this thread saw last.
    """

    def __init__(self, base_url: str | None, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.base_url = urlsplit(base_url.rstrip("/")) if base_url else None
        self._local = threading.local()

    def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        self._local.headers = {}
        response = super().request(
            method,
            self.rewrite(url),
            params=params,
            data=data,
            headers=headers,
            auth=auth,
            timeout=timeout,
            allow_redirects=allow_redirects,
        )
        self._local.headers = response.headers or {}
        return response

    def rewrite(self, url: str) -> str:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if self.base_url is None or not (host == "twilio.com" or host.endswith(".twilio.com")):
            return url
        path = self.base_url.path + parts.path
        return urlunsplit((self.base_url.scheme, self.base_url.netloc, path, parts.query, ""))

    def last_headers(self) -> Mapping[str, str]:
        return getattr(self._local, "headers", {})


class TwilioSmsChannel:
    """Sends ``Sms`` through Twilio; see the module docstring for errors."""

    name = "sms"
    provider = PROVIDER

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        from_number: str | None = None,
        status_callback_url: str | None = None,
        base_url: str | None = None,
        timeout: float = 10,
        *,
        messaging_service_sid: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not account_sid or not auth_token:
            raise ConfigurationError(
                "twilio_account_sid/twilio_auth_token", "Twilio needs both to send SMS"
            )
        if bool(from_number) == bool(messaging_service_sid):
            raise ConfigurationError(
                "twilio_from_number",
                "give exactly one of a sender number and a messaging service sid",
            )
        if timeout <= 0:
            raise ConfigurationError("twilio timeout", f"must be positive, not {timeout}")
        self.account_sid = account_sid
        self.from_number = from_number
        self.messaging_service_sid = messaging_service_sid
        self.status_callback_url = status_callback_url
        self.base_url = base_url
        self.timeout = timeout
        self._clock = clock
        self._http = _HttpClient(base_url, timeout)
        self._client = Client(account_sid, auth_token, http_client=self._http)

    def __repr__(self) -> str:
        sender = self.from_number or self.messaging_service_sid
        where = f", base_url={self.base_url!r}" if self.base_url else ""
        return (
            f"TwilioSmsChannel(account_sid={self.account_sid!r}, from={sender!r}{where}, "
            f"timeout={self.timeout}, auth_token=[hidden])"
        )

    def send(self, message: Email | Sms) -> Sent:
        if not isinstance(message, Sms):
            raise PermanentChannelError(
                PROVIDER, f"can only send SMS, not a {type(message).__name__}"
            )
        options: dict[str, Any] = {"to": message.to, "body": message.body}
        if self.from_number:
            options["from_"] = self.from_number
        if self.messaging_service_sid:
            options["messaging_service_sid"] = self.messaging_service_sid
        if self.status_callback_url:
            options["status_callback"] = self.status_callback(message.message_id)
        created = self._call(lambda: self._client.messages.create(**options), "refused the SMS")
        return Sent(provider_id=str(created.sid), provider=PROVIDER)

    def lookup(self, attempt: Attempt) -> list[ProviderRecord]:
        """Twilio's records that could be ``attempt`` (see ``LookupChannel``).

        With a sid, the message itself. Without one, every outbound message from our
        sender to the recipient created since the attempt (less ``LOOKUP_SKEW`` for clock
        differences); ``matches`` when its body has the attempt's digest. All of them are
        read (at most ``LOOKUP_MAX_RECORDS``), whatever order Twilio lists them in: a
        record missed would make a message look never received, and send it twice.
        """
        if attempt.provider_id:
            sid = attempt.provider_id
            found = self._call(lambda: self._client.messages(sid).fetch(), "cannot look up")
            return [_record(found, matches=True)]
        options: dict[str, Any] = {
            "to": attempt.to,
            "page_size": LOOKUP_PAGE_SIZE,
            "limit": LOOKUP_MAX_RECORDS + 1,
        }
        if self.from_number:
            options["from_"] = self.from_number
        listed = self._call(lambda: list(self._client.messages.stream(**options)), "cannot list")
        if len(listed) > LOOKUP_MAX_RECORDS:
            raise TransientChannelError(
                PROVIDER,
                f"more than {LOOKUP_MAX_RECORDS} messages to {attempt.to}: too many to tell "
                "whether one is ours",
            )
        since = attempt.attempted_at - LOOKUP_SKEW
        records = []
        for item in listed:
            if not str(item.direction or "").startswith("outbound"):
                continue
            if (
                self.messaging_service_sid
                and item.messaging_service_sid != self.messaging_service_sid
            ):
                continue
            if item.date_created is None or item.date_created < since:
                continue
            digest = body_digest(item.body or "")
            records.append(_record(item, matches=digest == attempt.body_digest))
        return records

    def _call(self, call: Callable[[], T], refusal: str) -> T:
        """One SDK call, its exceptions translated (the table in the module docstring)."""
        try:
            return call()
        except TwilioRestException as exc:
            raise self._translate(exc.status, exc.code, exc.msg, refusal) from exc
        except TwilioServiceException as exc:
            detail = f"{exc.title}: {exc.detail}" if exc.detail else exc.title
            raise self._translate(exc.status, exc.code, detail, refusal) from exc
        except requests.Timeout as exc:
            raise TransientChannelError(
                PROVIDER, f"no answer from {self._host()} within {self.timeout:g} s"
            ) from exc
        except requests.ConnectionError as exc:
            raise TransientChannelError(
                PROVIDER, f"cannot reach {self._host()}: {_root_cause(exc)}"
            ) from exc
        except TwilioException as exc:
            # A page of a list that did not load: the SDK raises its base exception with
            # the response ("Unable to fetch page", response), not a TwilioRestException.
            raise self._page_error(exc, refusal) from exc
        except (requests.RequestException, json.JSONDecodeError) as exc:
            raise TransientChannelError(PROVIDER, f"request failed: {exc!r}") from exc

    def _page_error(self, exc: TwilioException, refusal: str) -> ChannelError:
        response = exc.args[1] if len(exc.args) > 1 else None
        status = getattr(response, "status_code", None)
        if not isinstance(status, int):
            return TransientChannelError(PROVIDER, f"request failed: {exc!r}")
        try:
            error = json.loads(str(getattr(response, "text", "")))
            code, detail = error.get("code"), str(error.get("message") or "")
        except (ValueError, AttributeError):
            code, detail = None, ""
        return self._translate(status, code if isinstance(code, int) else None, detail, refusal)

    def status_callback(self, message_id: str) -> str:
        """The callback URL for one message: ours, with our message id in the query (Twilio
        calls it back exactly, so the webhook finds the message before its sid is known)."""
        assert self.status_callback_url is not None
        separator = "&" if "?" in self.status_callback_url else "?"
        return f"{self.status_callback_url}{separator}{urlencode({MESSAGE_ID_ARG: message_id})}"

    def _host(self) -> str:
        return self.base_url or "https://api.twilio.com"

    def _translate(self, status: int, code: int | None, detail: str, refusal: str) -> ChannelError:
        detail = _SDK_PREFIX.sub("", detail).strip() or f"HTTP {status}"
        code_text = str(code) if code and code != status else None
        if status == 429:
            retry = retry_after_seconds(self._http.last_headers().get("Retry-After"), self._clock())
            return TransientChannelError(
                PROVIDER,
                f"rate limited: {detail}",
                status=status,
                code=code_text,
                retry_after=retry,
            )
        if status >= 500 and code not in PERMANENT_CODES:
            return TransientChannelError(
                PROVIDER, f"provider error: {detail}", status=status, code=code_text
            )
        return PermanentChannelError(
            PROVIDER,
            f"{refusal}: {detail}",
            status=status,
            code=code_text,
            suppress=code in SUPPRESS_CODES,
        )


def _record(message: Any, matches: bool) -> ProviderRecord:
    """A Twilio message (the SDK's MessageInstance) as a settlement record."""
    status = str(message.status or "")
    error = f", error {message.error_code}" if message.error_code else ""
    return ProviderRecord(
        provider_id=str(message.sid),
        status=TWILIO_STATUS.get(status, "sent"),
        matches=matches,
        detail=f"{status}{error}",
    )


def _root_cause(exc: BaseException) -> str:
    """requests wraps urllib3 wraps the socket error; the innermost one says what happened."""
    seen: BaseException = exc
    for _ in range(10):  # chains are short; never loop on a cycle
        inner = seen.__cause__ or seen.__context__
        if inner is None:
            break
        seen = inner
    return f"{type(seen).__name__}: {seen}" if seen is not exc else str(exc)

"""A local fake of SendGrid's Mail Send API and Twilio's Messages API, on 127.0.0.1.

The real SDKs talk to it over HTTP, so tests and benchmarks exercise everything but the
internet. It answers the way the real APIs do:

- ``POST /v3/mail/send`` (JSON, ``Authorization: Bearer <key>``): 202 with an
  ``X-Message-Id`` header; 401 for a wrong key; 400 with
  ``{"errors": [{"message", "field", "help"}]}`` listing every problem SendGrid would
  report (personalizations with ``to``, ``from``, a subject, content with text/plain
  first, string custom args, at most 1000 personalizations); 413 above 20 MB.
- ``POST /2010-04-01/Accounts/{sid}/Messages.json`` (form, HTTP Basic auth): 201 with the
  message JSON (``sid`` ``SM`` + 32 hex, ``status`` queued); 401 for wrong credentials;
  400 ``{"code", "message", "more_info", "status"}`` for a 'To' that is not E.164
  (21211), a missing body (21602), sender (21603) or recipient (21604), or a number
  told to ``reject_number``.
- ``GET /2010-04-01/Accounts/{sid}/Messages.json``: the messages it accepted, newest
  first, filtered by ``To``, ``From`` and ``DateSent``/``DateSent<``/``DateSent>`` and
  paged like Twilio (``PageSize``, ``Page``, ``PageToken``; ``messages`` with ``start``,
  ``end``, ``page``, ``page_size``, ``uri``, ``first_page_uri``, ``next_page_uri``,
  ``previous_page_uri``), and ``GET .../Messages/{MessageSid}.json`` (404, code 20404,
  for a sid it does not hold): what the SDK's ``messages.list`` and ``messages(sid).fetch``
  call.

Failures are injected on request, thread-safely: ``fail_next(n, status=429|5xx|4xx)``
(``status=0`` drops the connection unanswered), ``delay(seconds)``, each for every path
or only one (``path="sendgrid"``, ``"twilio"`` or any path prefix; failures also by
``method``). Every request is
recorded: ``.requests``, ``.sent_emails()``, ``.sent_sms()``, ``.clear()``.

In a test::

    with FakeProvider.start() as fake:
        channel = SendGridEmailChannel(fake.sendgrid_api_key, ..., host=fake.url)

As a process, for manual runs and benchmarks::

    python -m tests.support.fake_provider --port 8025

The server is a small Starlette app served by uvicorn in one background thread (HTTP/1.1
keep-alive, as the Twilio SDK's connection pool uses it; the SendGrid SDK opens a new
connection per request). Every request goes through one endpoint, so delays and injected
failures apply to any path, exactly as they did when this was a hand-written asyncio
server. A dropped connection is the one thing ASGI cannot say: the fake aborts the
connection's transport, which uvicorn's ``send`` carries. uvicorn parses HTTP with
httptools (a test dependency): with its pure-Python parser the fake took about three
times as long per request and became what slowed ``make bench``'s dispatch case.

Also here: signing helpers for webhook tests (``sign_sendgrid_event``, ``sign_twilio``),
a generated SendGrid webhook key pair, and the Event Webhook SendGrid would send for what
the fake received (``.sendgrid_events()``, posted signed by ``post_sendgrid_events``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import math
import re
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import formatdate, parsedate_to_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlencode

import uvicorn
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from twilio.request_validator import RequestValidator

from channels.webhooks import SENDGRID_SIGNATURE_HEADER, SENDGRID_TIMESTAMP_HEADER
from engine.delivery.sms_segments import segments

SENDGRID_PATH = "/v3/mail/send"
TWILIO_PREFIX = "/2010-04-01/Accounts/"
PATH_ALIASES = {"sendgrid": SENDGRID_PATH, "twilio": TWILIO_PREFIX}
TWILIO_MESSAGES = re.compile(r"^/2010-04-01/Accounts/([^/]+)/Messages\.json$")
TWILIO_MESSAGE = re.compile(r"^/2010-04-01/Accounts/([^/]+)/Messages/([^/]+)\.json$")
TWILIO_PAGE_SIZE = 50  # Twilio's default page size
TWILIO_MAX_PAGE_SIZE = 1000
E164 = re.compile(r"^\+[1-9]\d{1,14}$")
MAX_BODY = 20 * 1024 * 1024  # SendGrid's limit for one request
MAX_HEAD = 64 * 1024
MAX_PERSONALIZATIONS = 1000
IDLE_TIMEOUT_S = 60  # an idle keep-alive connection is closed after this
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
ABORT = "fake_provider.abort"  # in the ASGI scope: drops the request's connection

DEFAULT_SENDGRID_KEY = "SG.fake-key.for-tests"
DEFAULT_TWILIO_SID = "AC" + "0123456789abcdef" * 2
DEFAULT_TWILIO_TOKEN = "fake-twilio-auth-token"

TWILIO_MESSAGES_TEXT = {
    20003: "Authenticate",
    20429: "Too Many Requests",
    20500: "An internal server error has occurred",
    20503: "Service is unavailable. Please try again",
    21211: "The 'To' number {to} is not a valid phone number.",
    21408: "Permission to send an SMS has not been enabled for the region indicated by "
    "the 'To' number: {to}.",
    21602: "Message body is required.",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21610: "Attempt to send to unsubscribed recipient",
    21614: "'To' number is not a valid mobile number",
    21617: "The concatenated message body exceeds the 1600 character limit.",
}
TWILIO_DEFAULT_CODES = {400: 21211, 401: 20003, 429: 20429, 500: 20500, 503: 20503}
SENDGRID_DEFAULT_MESSAGES = {
    400: (
        "The from address does not match a verified Sender Identity. Mail cannot be sent "
        "until this error is resolved.",
        "from",
    ),
    401: ("The provided authorization grant is invalid, expired, or revoked", None),
    403: ("access forbidden", None),
    413: ("Payload Too Large", None),
    429: ("too many requests", None),
}


# ── what is recorded ────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received, and the status the fake answered (0: dropped)."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    json: Any
    form: Mapping[str, str] | None
    status: int
    provider_id: str | None = None  # X-Message-Id or the SMS sid, when accepted
    query: str = ""  # the URL's query string, as sent


@dataclass(frozen=True)
class SentEmail:
    """One accepted SendGrid personalization, flattened with its request's content."""

    x_message_id: str
    to: list[str]
    from_email: str
    from_name: str | None
    subject: str
    text: str | None
    html: str | None
    content_types: list[str]
    headers: Mapping[str, str]
    custom_args: Mapping[str, str]
    categories: list[str]

    @property
    def message_id(self) -> str | None:
        return self.custom_args.get("lifecycle_message_id")


@dataclass(frozen=True)
class SentSms:
    """One accepted Twilio message."""

    sid: str
    account_sid: str
    to: str
    from_: str | None
    messaging_service_sid: str | None
    body: str
    status_callback: str | None


@dataclass
class _Failure:
    remaining: int
    status: int
    path: str | None
    reset_after_s: float | None
    retry_after_s: float | None
    twilio_code: int | None
    message: str | None
    method: str | None = None


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    headers: Mapping[str, str]  # as sent; names looked up in any case
    body: bytes
    query: str = ""


@dataclass(frozen=True)
class _Response:
    status: int
    body: Any = b""  # bytes as they are, anything else as JSON
    headers: Mapping[str, str] = field(default_factory=dict)

    def starlette(self) -> Response:
        if isinstance(self.body, bytes):
            payload, media_type = self.body, "text/plain; charset=utf-8" if self.body else None
        else:
            payload, media_type = json.dumps(self.body).encode(), "application/json"
        return Response(payload, self.status, dict(self.headers), media_type=media_type)


class _QuietServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:
        """The process that starts the fake keeps its own signal handlers."""


async def _abort(send: Send) -> None:
    """Drop the connection of the request ``send`` answers, with no response at all."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if not isinstance(transport, asyncio.Transport):
        raise RuntimeError("uvicorn no longer exposes the connection: cannot drop it")
    transport.abort()
    await asyncio.sleep(0)  # uvicorn sees the connection lost, and sends nothing more


def _prefix(path: str | None) -> str | None:
    return PATH_ALIASES.get(path, path) if path else None


# ── the server ──────────────────────────────────────────────────────────────────────


class FakeProvider:
    """The fake SendGrid + Twilio server; start with ``FakeProvider.start()``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sendgrid_api_key: str = DEFAULT_SENDGRID_KEY,
        twilio_account_sid: str = DEFAULT_TWILIO_SID,
        twilio_auth_token: str = DEFAULT_TWILIO_TOKEN,
        verbose: bool = False,
    ) -> None:
        self.host = host
        self.sendgrid_api_key = sendgrid_api_key
        self.twilio_account_sid = twilio_account_sid
        self.twilio_auth_token = twilio_auth_token
        self.verbose = verbose
        self._requested_port = port
        self._port = 0
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._failures: list[_Failure] = []
        self._delays: dict[str | None, float] = {}
        self._rejected: dict[str, int] = {}
        self._twilio_messages: list[dict[str, Any]] = []  # every accepted SMS, as Twilio holds it
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=METHODS)])

    @classmethod
    def start(cls, host: str = "127.0.0.1", port: int = 0, **options: Any) -> FakeProvider:
        """Bind (``port=0``: any free port), serve in a daemon thread, return the fake."""
        fake = cls(host, port, **options)
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by every accepted connection: uvicorn writes a response's head and body
        # separately, and Nagle's algorithm would hold the body for the client's delayed
        # ACK, 40 ms per request on a keep-alive connection.
        listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            listening.bind((host, port))  # a port in use fails here, in the caller's thread
            listening.listen(1024)
        except OSError:
            listening.close()
            raise
        fake._port = int(listening.getsockname()[1])
        config = uvicorn.Config(
            fake._asgi,
            log_level="warning",
            access_log=False,
            lifespan="off",
            interface="asgi3",
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=IDLE_TIMEOUT_S,
            timeout_graceful_shutdown=1,  # stop() does not wait for a delayed answer
            h11_max_incomplete_event_size=MAX_HEAD,
        )
        server = fake._server = _QuietServer(config)
        fake._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [listening]}, name="fake-provider", daemon=True
        )
        fake._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not fake._thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"the fake provider did not start on {host}:{fake._port}")
            time.sleep(0.005)
        return fake

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop listening and close every open connection; later requests are refused."""
        if self._stopped or self._server is None:
            return
        self._stopped = True
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FakeProvider:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FakeProvider(url={self.url!r}, requests={len(self._requests)})"

    # ── failure injection ──

    def fail_next(
        self,
        n: int,
        status: int = 503,
        *,
        path: str | None = None,
        reset_after_s: float | None = None,
        retry_after_s: float | None = None,
        twilio_code: int | None = None,
        message: str | None = None,
        method: str | None = None,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` (0: drop the connection).

        A 429 carries SendGrid's ``X-RateLimit-Reset`` (now + ``reset_after_s``; 1 s when
        neither delay is given) and, when ``retry_after_s`` is given, ``Retry-After``;
        Twilio's 429 carries ``Retry-After`` from either. ``twilio_code`` and ``message``
        replace the default error code and text; ``method`` ("GET", "POST") narrows the
        match like ``path`` does. Failures queue up in order.
        """
        if status == 429 and reset_after_s is None and retry_after_s is None:
            reset_after_s = 1.0
        failure = _Failure(
            n, status, _prefix(path), reset_after_s, retry_after_s, twilio_code, message, method
        )
        with self._lock:
            self._failures.append(failure)

    def delay(self, seconds: float, *, path: str | None = None) -> None:
        """Wait ``seconds`` before answering each matching request (0 turns it off)."""
        with self._lock:
            if seconds > 0:
                self._delays[_prefix(path)] = seconds
            else:
                self._delays.pop(_prefix(path), None)

    def reject_number(self, number: str, twilio_code: int = 21610) -> None:
        """Twilio refuses every SMS to ``number`` with ``twilio_code`` (21610: sent STOP)."""
        with self._lock:
            self._rejected[number] = twilio_code

    def reset(self) -> None:
        """Forget injected failures, delays and rejected numbers (not the records)."""
        with self._lock:
            self._failures.clear()
            self._delays.clear()
            self._rejected.clear()

    # ── records ──

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget every request, and the messages Twilio would list."""
        with self._lock:
            self._requests.clear()
            self._twilio_messages.clear()

    def sent_emails(self) -> list[SentEmail]:
        """Every accepted personalization, in the order received."""
        out = []
        for request in self.requests:
            if request.path == SENDGRID_PATH and request.status == 202:
                out.extend(_flatten_mail(request.json, request.provider_id or ""))
        return out

    def sendgrid_events(
        self, kinds: Sequence[str] = ("processed", "delivered"), *, timestamp: int | None = None
    ) -> list[dict[str, Any]]:
        """The Event Webhook events SendGrid would post for every accepted email so far: one
        per kind and recipient, with the personalization's custom args at the top level and
        ``sg_message_id`` starting with the request's X-Message-Id. Event ids are stable,
        so posting the same events again is a redelivery."""
        at = timestamp if timestamp is not None else int(time.time())
        events = []
        for n, email in enumerate(self.sent_emails()):
            for kind in kinds:
                for to in email.to:
                    events.append(
                        {
                            **email.custom_args,
                            "email": to,
                            "timestamp": at,
                            "event": kind,
                            "sg_event_id": f"{email.x_message_id}-{n}-{kind}",
                            "sg_message_id": f"{email.x_message_id}.fake{n:06d}.0",
                            "category": email.categories,
                        }
                    )
        return events

    def sent_sms(self) -> list[SentSms]:
        """Every accepted SMS, in the order received."""
        out = []
        for request in self.requests:
            match = TWILIO_MESSAGES.match(request.path)
            if match and request.status == 201 and request.form is not None:
                form = request.form
                out.append(
                    SentSms(
                        sid=request.provider_id or "",
                        account_sid=match[1],
                        to=form.get("To", ""),
                        from_=form.get("From"),
                        messaging_service_sid=form.get("MessagingServiceSid"),
                        body=form.get("Body", ""),
                        status_callback=form.get("StatusCallback"),
                    )
                )
        return out

    # ── HTTP, through Starlette ──

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, ABORT: functools.partial(_abort, send)}
        await self._app(scope, receive, send)

    async def _endpoint(self, request: Request) -> Response:
        received = _Request(
            request.method,
            request.url.path,
            request.headers,
            await request.body(),
            request.url.query,
        )
        try:
            answer = await self._handle(received)
        except Exception:  # a bug in the fake: say so loudly, answer 500
            traceback.print_exc()
            answer = _Response(500, {"errors": [{"message": "fake provider bug"}]})
        if answer is None:  # an injected dropped connection
            abort: Callable[[], Awaitable[None]] = request.scope[ABORT]
            await abort()
            return Response(status_code=500)  # never sent: the connection is gone
        return answer.starlette()

    async def _handle(self, request: _Request) -> _Response | None:
        pause = self._delay_for(request.path)
        if pause:
            await asyncio.sleep(pause)
        failure = self._take_failure(request.method, request.path)
        if failure is not None and failure.status == 0:
            self._record(request, None, None, 0)
            return None
        if request.method == "GET" and (match := TWILIO_MESSAGES.match(request.path)):
            return self._twilio_list(request, match[1], failure)
        if request.method == "GET" and (match := TWILIO_MESSAGE.match(request.path)):
            return self._twilio_fetch(request, match[1], match[2], failure)
        if request.method == "GET":
            return self._get(request)
        if request.method != "POST":
            return _Response(405, {"errors": [{"message": "method not allowed", "field": None}]})
        if request.path == SENDGRID_PATH:
            return self._sendgrid(request, failure)
        if match := TWILIO_MESSAGES.match(request.path):
            return self._twilio(request, match[1], failure)
        self._record(request, None, None, 404)
        return _Response(404, {"errors": [{"message": f"no route for {request.path}"}]})

    def _get(self, request: _Request) -> _Response:
        if request.path == "/_fake/stats":
            stats = {
                "requests": len(self.requests),
                "emails": len(self.sent_emails()),
                "sms": len(self.sent_sms()),
            }
            return _Response(200, stats)
        if request.path == "/":
            return _Response(200, b"fake SendGrid + Twilio provider\n")
        return _Response(404, {"errors": [{"message": "not found", "field": None}]})

    def _record(
        self, request: _Request, parsed: Any, form: Any, status: int, pid: str | None = None
    ) -> None:
        record = RecordedRequest(
            request.method,
            request.path,
            request.headers,
            request.body,
            parsed,
            form,
            status,
            pid,
            request.query,
        )
        with self._lock:
            self._requests.append(record)
        if self.verbose:
            print(f"{request.method} {request.path} → {status}", flush=True)

    def _take_failure(self, method: str, path: str) -> _Failure | None:
        with self._lock:
            for failure in self._failures:
                if failure.method not in (None, method):
                    continue
                if failure.path is None or path.startswith(failure.path):
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self._failures.remove(failure)
                    return failure
        return None

    def _delay_for(self, path: str) -> float:
        with self._lock:
            matching = [s for p, s in self._delays.items() if p is None or path.startswith(p)]
        return max(matching, default=0.0)

    # ── SendGrid ──

    def _sendgrid(self, request: _Request, failure: _Failure | None) -> _Response:
        try:
            parsed = json.loads(request.body) if request.body else None
        except ValueError:
            parsed = None
        if failure is not None:
            self._record(request, parsed, None, failure.status)
            return _sendgrid_error(failure.status, failure.message, _rate_headers(failure))
        if request.headers.get("authorization") != f"Bearer {self.sendgrid_api_key}":
            self._record(request, parsed, None, 401)
            return _sendgrid_error(401)
        if len(request.body) > MAX_BODY:
            self._record(request, None, None, 413)
            return _sendgrid_error(413)
        errors = validate_mail(parsed) if parsed is not None else [_sg_error("Bad Request")]
        if errors:
            self._record(request, parsed, None, 400)
            return _Response(400, {"errors": errors})
        message_id = secrets.token_urlsafe(16)[:22]
        self._record(request, parsed, None, 202, message_id)
        return _Response(202, b"", {"X-Message-Id": message_id})

    # ── Twilio ──

    def _twilio(self, request: _Request, sid: str, failure: _Failure | None) -> _Response:
        form = dict(parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True))
        to = form.get("To", "")
        refused = self._twilio_refused(request, sid, failure, form)
        if refused is not None:
            return refused
        problem = self._twilio_problem(form)
        if problem is not None:
            self._record(request, None, form, 400)
            return _twilio_error(400, problem, to)
        message_sid = "SM" + secrets.token_hex(16)
        resource = _twilio_message(sid, message_sid, form)
        with self._lock:
            self._twilio_messages.append(resource)
        self._record(request, None, form, 201, message_sid)
        return _Response(201, resource)

    def _twilio_refused(
        self,
        request: _Request,
        sid: str,
        failure: _Failure | None,
        form: Mapping[str, str] | None = None,
    ) -> _Response | None:
        """An injected failure or wrong credentials, answered as Twilio does; else None."""
        to = (form or {}).get("To", "")
        if failure is not None:
            code = failure.twilio_code or TWILIO_DEFAULT_CODES.get(failure.status, failure.status)
            headers = {}
            wait = failure.retry_after_s or failure.reset_after_s
            if failure.status == 429 and wait is not None:
                headers["Retry-After"] = str(math.ceil(wait))
            self._record(request, None, form, failure.status)
            return _twilio_error(failure.status, code, to, failure.message, headers)
        if not self._twilio_authenticated(request, sid):
            self._record(request, None, form, 401)
            return _twilio_error(401, 20003, to)
        return None

    def _twilio_list(self, request: _Request, sid: str, failure: _Failure | None) -> _Response:
        """``GET .../Messages.json``: Twilio's filters (To, From, DateSent, DateSent<,
        DateSent>) and paging (PageSize, Page, PageToken; newest first)."""
        refused = self._twilio_refused(request, sid, failure)
        if refused is not None:
            return refused
        query = dict(parse_qsl(request.query, keep_blank_values=True))
        try:
            size = min(int(query.get("PageSize") or TWILIO_PAGE_SIZE), TWILIO_MAX_PAGE_SIZE)
            page = int(query.get("Page") or 0)
        except ValueError:
            self._record(request, None, None, 400)
            return _twilio_error(400, 20001, "", "Invalid paging parameters")
        with self._lock:
            everything = list(reversed(self._twilio_messages))  # newest first
        chosen = [m for m in everything if m["account_sid"] == sid and _listed(m, query)]
        records = chosen[page * size : (page + 1) * size]
        base = f"/2010-04-01/Accounts/{sid}/Messages.json"
        filters = {k: v for k, v in query.items() if k not in ("Page", "PageSize", "PageToken")}

        def uri(number: int, token: str | None = None) -> str:
            params = {**filters, "PageSize": size, "Page": number}
            if token:
                params["PageToken"] = token
            return f"{base}?{urlencode(params)}"

        more = (page + 1) * size < len(chosen)
        body = {
            "messages": records,
            "end": page * size + max(len(records) - 1, 0),
            "first_page_uri": uri(0),
            "next_page_uri": uri(page + 1, "PA" + records[-1]["sid"]) if more else None,
            "page": page,
            "page_size": size,
            "previous_page_uri": uri(page - 1) if page > 0 else None,
            "start": page * size,
            "uri": uri(page, query.get("PageToken")),
        }
        self._record(request, None, None, 200)
        return _Response(200, body)

    def _twilio_fetch(
        self, request: _Request, sid: str, message_sid: str, failure: _Failure | None
    ) -> _Response:
        """``GET .../Messages/{sid}.json``: the message, or Twilio's 20404."""
        refused = self._twilio_refused(request, sid, failure)
        if refused is not None:
            return refused
        with self._lock:
            found = [m for m in self._twilio_messages if m["sid"] == message_sid]
        if not found or found[0]["account_sid"] != sid:
            self._record(request, None, None, 404)
            message = f"The requested resource {request.path} was not found"
            return _twilio_error(404, 20404, "", message)
        self._record(request, None, None, 200)
        return _Response(200, found[0])

    def _twilio_authenticated(self, request: _Request, sid: str) -> bool:
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return user == sid == self.twilio_account_sid and secrets.compare_digest(
            password.encode(), self.twilio_auth_token.encode()
        )

    def _twilio_problem(self, form: Mapping[str, str]) -> int | None:
        to = form.get("To", "")
        if not to:
            return 21604
        if not (form.get("From") or form.get("MessagingServiceSid")):
            return 21603
        if not form.get("Body"):
            return 21602
        if not E164.match(to):
            return 21211
        if len(form["Body"]) > 1600:
            return 21617
        with self._lock:
            return self._rejected.get(to)


def _listed(message: Mapping[str, Any], query: Mapping[str, str]) -> bool:
    """Whether a Twilio message passes the list's filters (dates compare by day, as the
    real API's do; a message not sent yet has no date_sent and passes no date filter)."""
    if query.get("To") and message["to"] != query["To"]:
        return False
    if query.get("From") and message["from"] != query["From"]:
        return False
    dates = {k: v for k, v in query.items() if k.startswith("DateSent") and v}
    if not dates:
        return True
    if not message["date_sent"]:
        return False
    sent = parsedate_to_datetime(message["date_sent"]).date()
    for key, value in dates.items():
        day = datetime.fromisoformat(value.removeprefix(">=").removeprefix("<=")[:10]).date()
        if (key == "DateSent" and sent != day) or (key == "DateSent>" and sent < day):
            return False
        if key == "DateSent<" and sent > day:
            return False
    return True


def _sendgrid_error(
    status: int, message: str | None = None, headers: Mapping[str, str] | None = None
) -> _Response:
    default, field_name = SENDGRID_DEFAULT_MESSAGES.get(status, (_phrase(status), None))
    return _Response(status, {"errors": [_sg_error(message or default, field_name)]}, headers or {})


def _twilio_error(
    status: int,
    code: int,
    to: str,
    message: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> _Response:
    body = {
        "code": code,
        "message": message or TWILIO_MESSAGES_TEXT.get(code, "Error").format(to=to),
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return _Response(status, body, headers or {})


# ── SendGrid request validation, as the real API reports it ─────────────────────────


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _sg_error(message: str, field_name: str | None = None) -> dict[str, Any]:
    return {"message": message, "field": field_name, "help": None}


def validate_mail(mail: Any) -> list[dict[str, Any]]:
    """Every problem SendGrid would report for this ``/v3/mail/send`` body (a subset)."""
    if not isinstance(mail, dict):
        return [_sg_error("Bad Request")]
    errors: list[dict[str, Any]] = []
    personalizations = mail.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        errors.append(
            _sg_error(
                "The personalizations field is required and must have at least one "
                "personalization.",
                "personalizations",
            )
        )
        personalizations = []
    elif len(personalizations) > MAX_PERSONALIZATIONS:
        errors.append(
            _sg_error(
                f"The personalizations field must have no more than {MAX_PERSONALIZATIONS} "
                "objects.",
                "personalizations",
            )
        )
    every_has_subject = bool(personalizations)
    for i, p in enumerate(personalizations):
        tos = p.get("to") if isinstance(p, dict) else None
        if (
            not isinstance(tos, list)
            or not tos
            or not all(isinstance(t, dict) and "@" in str(t.get("email", "")) for t in tos)
        ):
            errors.append(
                _sg_error(
                    "The to array is required for all personalization objects, and must have "
                    "at least one email object with a valid email address.",
                    f"personalizations.{i}.to",
                )
            )
        p = p if isinstance(p, dict) else {}
        every_has_subject = every_has_subject and bool(p.get("subject"))
        for kind in ("custom_args", "headers"):
            values = p.get(kind) or {}
            if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                errors.append(
                    _sg_error(
                        f"Every {kind} value must be a string.", f"personalizations.{i}.{kind}"
                    )
                )
    sender = mail.get("from")
    if not isinstance(sender, dict) or "@" not in str(sender.get("email", "")):
        errors.append(
            _sg_error(
                "The from object must be provided for every email send. It is an object that "
                "requires an email parameter, but may also contain a name parameter.",
                "from.email",
            )
        )
    if not mail.get("subject") and not every_has_subject and not mail.get("template_id"):
        errors.append(
            _sg_error(
                "The subject is required. You can get around this requirement if you use a "
                "template with a subject defined or if every personalization has a subject "
                "defined.",
                "subject",
            )
        )
    content = mail.get("content")
    if not mail.get("template_id"):
        if not isinstance(content, list) or not content:
            errors.append(
                _sg_error(
                    "Unless a valid template_id is provided, the content parameter is required. "
                    "There must be at least one defined content block. We typically suggest "
                    "both text/plain and text/html blocks are included, but only one block is "
                    "required.",
                    "content",
                )
            )
        else:
            types = [c.get("type") if isinstance(c, dict) else None for c in content]
            if "text/plain" in types and types[0] != "text/plain":
                errors.append(
                    _sg_error(
                        "If present, text/plain content must be first, followed by text/html, "
                        "followed by any other content.",
                        "content",
                    )
                )
            for i, c in enumerate(content):
                if not isinstance(c, dict) or not isinstance(c.get("value"), str) or not c["value"]:
                    errors.append(
                        _sg_error(
                            "The content value must be a string at least one character in length.",
                            f"content.{i}.value",
                        )
                    )
    return errors


def _rate_headers(failure: _Failure) -> dict[str, str]:
    if failure.status != 429:
        return {}
    headers = {"X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0"}
    if failure.reset_after_s is not None:
        headers["X-RateLimit-Reset"] = str(math.ceil(time.time() + failure.reset_after_s))
    if failure.retry_after_s is not None:
        headers["Retry-After"] = str(math.ceil(failure.retry_after_s))
    return headers


def _flatten_mail(mail: dict[str, Any], x_message_id: str) -> list[SentEmail]:
    content = mail.get("content") or []
    by_type = {c.get("type"): c.get("value") for c in content}
    sender = mail.get("from") or {}
    out = []
    for p in mail.get("personalizations") or []:
        out.append(
            SentEmail(
                x_message_id=x_message_id,
                to=[t["email"] for t in p.get("to", [])],
                from_email=sender.get("email", ""),
                from_name=sender.get("name"),
                subject=p.get("subject") or mail.get("subject", ""),
                text=by_type.get("text/plain"),
                html=by_type.get("text/html"),
                content_types=[c.get("type") for c in content],
                headers={**(mail.get("headers") or {}), **(p.get("headers") or {})},
                custom_args={**(mail.get("custom_args") or {}), **(p.get("custom_args") or {})},
                categories=list(mail.get("categories") or []),
            )
        )
    return out


def _twilio_message(account_sid: str, sid: str, form: Mapping[str, str]) -> dict[str, Any]:
    now = formatdate(usegmt=True).replace("GMT", "+0000")
    body = form.get("Body", "")
    return {
        "account_sid": account_sid,
        "api_version": "2010-04-01",
        "body": body,
        "date_created": now,
        "date_sent": None,
        "date_updated": now,
        "direction": "outbound-api",
        "error_code": None,
        "error_message": None,
        "from": form.get("From"),
        "messaging_service_sid": form.get("MessagingServiceSid"),
        "num_media": "0",
        "num_segments": str(segments(body).segments),
        "price": None,
        "price_unit": "USD",
        "sid": sid,
        "status": "queued" if form.get("From") else "accepted",
        "subresource_uris": {
            "media": f"/2010-04-01/Accounts/{account_sid}/Messages/{sid}/Media.json"
        },
        "to": form.get("To"),
        "uri": f"/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json",
    }


# ── webhook signing, for tests ──────────────────────────────────────────────────────


@dataclass(frozen=True)
class SendGridKeyPair:
    """A P-256 key pair; ``public_key`` is base64 DER, the form SendGrid's settings show."""

    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    public_key: str


def generate_sendgrid_keypair() -> SendGridKeyPair:
    private_key = ec.generate_private_key(ec.SECP256R1())
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SendGridKeyPair(private_key, base64.b64encode(der).decode())


@functools.cache
def sendgrid_webhook_keypair() -> SendGridKeyPair:
    """One key pair per process, generated on first use."""
    return generate_sendgrid_keypair()


def sign_sendgrid_event(
    private_key: ec.EllipticCurvePrivateKey, body: bytes | str, timestamp: str | int
) -> str:
    """The ``X-Twilio-Email-Event-Webhook-Signature`` SendGrid would send for ``body``."""
    raw = body.encode() if isinstance(body, str) else body
    signature = private_key.sign(str(timestamp).encode() + raw, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(signature).decode()


def post_sendgrid_events(
    webhook_url: str,
    events: Sequence[Mapping[str, Any]],
    private_key: ec.EllipticCurvePrivateKey,
    *,
    batch_size: int = 1000,
) -> list[dict[str, Any]]:
    """POST ``events`` to an app's ``/webhooks/sendgrid`` in signed batches, as SendGrid's
    Event Webhook does; the app's answer to each batch."""
    import httpx  # a test dependency, like this module

    answers = []
    with httpx.Client(timeout=30) as client:
        for start in range(0, len(events), batch_size):
            body = json.dumps(list(events[start : start + batch_size])).encode()
            stamp = str(int(time.time()))
            headers = {
                SENDGRID_SIGNATURE_HEADER: sign_sendgrid_event(private_key, body, stamp),
                SENDGRID_TIMESTAMP_HEADER: stamp,
                "Content-Type": "application/json",
            }
            response = client.post(webhook_url, content=body, headers=headers)
            response.raise_for_status()
            answers.append(response.json())
    return answers


def sign_twilio(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """The ``X-Twilio-Signature`` Twilio would send for a POST of ``params`` to ``url``."""
    return str(RequestValidator(auth_token).compute_signature(url, dict(params)))


# ── as a process ────────────────────────────────────────────────────────────────────


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fake_provider",
        description="A fake SendGrid + Twilio API on this machine, for manual runs and "
        "benchmarks. Point LIFECYCLE_SENDGRID_HOST and LIFECYCLE_TWILIO_BASE_URL at it.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument("--sendgrid-key", default=DEFAULT_SENDGRID_KEY)
    parser.add_argument("--twilio-sid", default=DEFAULT_TWILIO_SID)
    parser.add_argument("--twilio-token", default=DEFAULT_TWILIO_TOKEN)
    parser.add_argument("--verbose", action="store_true", help="print one line per request")
    args = parser.parse_args(argv)
    fake = FakeProvider.start(
        args.host,
        args.port,
        sendgrid_api_key=args.sendgrid_key,
        twilio_account_sid=args.twilio_sid,
        twilio_auth_token=args.twilio_token,
        verbose=args.verbose,
    )
    print(
        f"fake provider on {fake.url}\n"
        f"  SendGrid: POST {fake.url}{SENDGRID_PATH}  key {fake.sendgrid_api_key}\n"
        f"  Twilio:   POST {fake.url}{TWILIO_PREFIX}{fake.twilio_account_sid}/Messages.json"
        f"  token {fake.twilio_auth_token}\n"
        f"  stats:    GET  {fake.url}/_fake/stats\n"
        "Ctrl-C to stop.",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    fake.stop()
    print(f"served {len(fake.requests)} requests", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

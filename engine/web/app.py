"""The FastAPI app factory: one web app over one composition root.

    uvicorn.run(create_app(bootstrap()))

Routes (details in each module):

    POST /v1/customers, POST /v1/events          ingest API, Bearer LIFECYCLE_API_KEY
    POST /v1/identify, /v1/track, /v1/batch      Segment-compatible API (also HTTP Basic)
    GET  /openapi.json                           the API's schema: with the API key, to
                                                 signed-in staff, or to all with LIFECYCLE_API_DOCS
    GET  /docs                                   Swagger UI (served locally): to signed-in
                                                 staff, or to all with LIFECYCLE_API_DOCS
    POST /webhooks/sendgrid                      SendGrid events (ECDSA signature)
    POST /webhooks/twilio/status, .../inbound    Twilio callbacks (HMAC signature)
    GET, POST /u/{token}                         unsubscribe link (RFC 8058 one-click)
    /console/...                                 support console (staff sign-in)
    GET  /healthz                                liveness (no database call, no thread)

Every request body is capped (``LIFECYCLE_MAX_BODY_BYTES``, 413 past it, read no further);
console, unsubscribe and docs pages carry a strict CSP, X-Frame-Options and nosniff, and
every response HSTS when the public URL is https. Access logs carry no query strings or
tokens (engine.web.logs).

Nothing is opened at import time; ``create_app`` reads the staff accounts from the
settings and fails fast (ConfigurationError) when they are malformed. With
``reload_rules_every`` (``lifecycle serve``: ``LIFECYCLE_RULES_RELOAD_S``), a task of the
app's lifespan reloads the rule files on that interval, as the scheduler does
(engine.runners.reloading: the last good rules stay when a change is broken).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.bootstrap import App
from engine.errors import RulesInvalid
from engine.runners.reloading import RulesReloader
from engine.web import STATIC_DIR, WebState, api, build_templates, console, segment, webhooks
from engine.web.auth import SessionCodec, StaffDirectory, parse_staff_passwords
from engine.web.logs import install_access_log_filter

DESCRIPTION = """\
Customers and events in, for the Lifecycle rules engine.

Every call needs `Authorization: Bearer <LIFECYCLE_API_KEY>`; with no key configured the
API answers 503. A refused request writes nothing and answers 422 with one entry per
problem (`loc`, `msg`, `type`), including fields the fact catalog (`rules/catalog.yaml`)
does not declare or types it does not accept.
"""

# Console and unsubscribe pages: no framing, no third-party anything, no caching.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
PAGE_PREFIXES = ("/console", "/u/")
HSTS = "max-age=31536000; includeSubDomains"
# Swagger UI's files ship in the fastapi-offline package: the docs load nothing from a CDN.
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
DOCS_ASSETS_URL = "/docs/assets"
WEBHOOK_BODY = webhooks.MAX_BODY  # SendGrid posts batches of events


class SecurityHeaders:
    """PAGE_HEADERS on console and unsubscribe pages and on the schema, the docs' own on
    /docs, and HSTS on every response when the public URL is https (plain ASGI: bodies
    stream)."""

    def __init__(self, app: ASGIApp, *, hsts: bool, docs_headers: dict[str, str]) -> None:
        self.app = app
        self.hsts = hsts
        self.docs_headers = docs_headers

    def _headers_for(self, path: str) -> dict[str, str]:
        headers: dict[str, str] = {}
        if path.startswith(PAGE_PREFIXES) or path == "/openapi.json":
            headers.update(PAGE_HEADERS)
        elif path == "/docs" or path.startswith(DOCS_ASSETS_URL + "/"):
            headers.update(self.docs_headers)
        if self.hsts:
            headers["Strict-Transport-Security"] = HSTS
        return headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extra = self._headers_for(scope["path"]) if scope["type"] == "http" else {}
        if not extra:
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in extra.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyTooLarge(HTTPException):
    """A request body past its cap: a 413, raised while reading, before the rest is read."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit:,} bytes")


class BodyLimit:
    """Caps request bodies: ``max_bytes``, or WEBHOOK_BODY for the provider webhooks.

    A declared Content-Length over the cap is refused before the app runs; a body that
    streams past it (chunked, or a lying length) stops being read at the cap, and the
    handler that was reading it answers 413 (BodyTooLarge is an HTTPException). Nothing
    past the cap is ever held in memory.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = WEBHOOK_BODY if scope["path"].startswith("/webhooks/") else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            response = JSONResponse({"detail": BodyTooLarge(limit).detail}, status_code=413)
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


def _lifespan(
    app: App, every: float | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Reload the rules every ``every`` seconds while the app serves (never when None)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if every is None:
            yield
            return
        reloader = RulesReloader(app, logging.getLogger("lifecycle.web"))

        async def reload_forever() -> None:
            while True:
                await asyncio.sleep(every)
                # Loading reads files and renders every template: off the event loop.
                await run_in_threadpool(reloader.reload)

        task = asyncio.create_task(reload_forever(), name="rules-reload")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return lifespan


def create_app(app: App, *, reload_rules_every: float | None = None) -> FastAPI:
    settings = app.settings
    staff_text = settings.staff_passwords.get_secret_value() if settings.staff_passwords else None
    secret = settings.secret_key.get_secret_value()
    secure = settings.public_base_url.startswith("https://")
    web = WebState(
        app=app,
        staff=StaffDirectory(parse_staff_passwords(staff_text), secret),
        sessions=SessionCodec(secret, settings.session_hours * 3600),
        templates=build_templates(),
        secure_cookies=secure,
    )
    http = FastAPI(
        title="Lifecycle",
        version="1",
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind its own check
        lifespan=_lifespan(app, reload_rules_every),
    )
    http.state.web = web
    http.include_router(api.router)
    http.include_router(segment.router)
    http.include_router(webhooks.router)
    http.include_router(console.router)
    http.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    http.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    _add_handlers(http)
    docs_html = bytes(_docs_page().body)
    _add_docs(http, docs_html.decode())

    http.add_middleware(SecurityHeaders, hsts=secure, docs_headers=_docs_headers(docs_html))
    http.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_access_log_filter()

    @http.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse("/console", status_code=303)

    @http.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        # async: answered on the event loop, never queued behind the thread pool.
        return {"status": "ok"}

    return http


def _docs_page() -> Response:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="Lifecycle API",
        swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png",
    )


def _docs_headers(page: bytes) -> dict[str, str]:
    """The docs page runs one inline script (Swagger UI's start-up): the CSP allows exactly
    it, by hash, and scripts from this origin; Swagger UI sets inline styles."""
    scripts = re.findall(rb"<script>(.*?)</script>", page, re.S)
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s).digest()).decode() + "'" for s in scripts
    )
    return {
        **PAGE_HEADERS,
        "Content-Security-Policy": (
            f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
            "form-action 'none'"
        ),
    }


def _add_docs(http: FastAPI, docs_html: str) -> None:
    """The schema and the docs are not public unless LIFECYCLE_API_DOCS says so: the
    schema answers the API key too, so clients can fetch it."""

    async def allowed(request: Request, *, api_key_too: bool) -> bool:
        web = request.app.state.web
        if web.app.settings.api_docs:
            return True
        if api_key_too and api.key_problem(request) is None:
            return True
        return await run_in_threadpool(console.current_staff, request) is not None

    @http.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> Response:
        if not await allowed(request, api_key_too=True):
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return JSONResponse(api.add_body_schemas(http.openapi()))

    @http.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        if not await allowed(request, api_key_too=False):
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return Response(docs_html, media_type="text/html")


def _add_handlers(http: FastAPI) -> None:
    @http.exception_handler(console.NeedsSignIn)
    async def needs_sign_in(request: Request, exc: console.NeedsSignIn) -> Response:
        target = "/console/login"
        if exc.next_path not in ("/console", "/console/"):
            target += "?next=" + quote(exc.next_path, safe="/")
        return RedirectResponse(target, status_code=303)

    @http.exception_handler(console.ConsoleRefused)
    async def console_refused(request: Request, exc: console.ConsoleRefused) -> Response:
        return console.error_page(request, exc.status, exc.message)

    @http.exception_handler(RulesInvalid)
    async def rules_invalid(request: Request, exc: RulesInvalid) -> Response:
        detail = f"the rules do not load, so nothing can be checked against them: {exc}"
        if request.url.path.startswith("/console"):
            return console.error_page(request, 503, detail)
        return JSONResponse({"detail": detail}, status_code=503)

"""The FastAPI app factory: one web app over one composition root.

    uvicorn.run(create_app(bootstrap()))

Routes (details in each module):

    POST /v1/customers, POST /v1/events          ingest API, Bearer LIFECYCLE_API_KEY
    GET  /openapi.json, /docs                    the API's schema and its docs
    POST /webhooks/sendgrid                      SendGrid events (ECDSA signature)
    POST /webhooks/twilio/status, .../inbound    Twilio callbacks (HMAC signature)
    GET, POST /u/{token}                         unsubscribe link (RFC 8058 one-click)
    /console/...                                 support console (staff sign-in)
    GET  /healthz                                liveness (no database call)

Nothing is opened at import time; ``create_app`` reads the staff accounts from the
settings and fails fast (ConfigurationError) when they are malformed.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.bootstrap import App
from engine.errors import RulesInvalid
from engine.web import STATIC_DIR, WebState, api, build_templates, console, webhooks
from engine.web.auth import SessionCodec, StaffDirectory, parse_staff_passwords

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


class PageHeaders:
    """Adds PAGE_HEADERS to console and unsubscribe responses (plain ASGI: bodies stream)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(("/console", "/u/")):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in PAGE_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(app: App) -> FastAPI:
    settings = app.settings
    staff_text = settings.staff_passwords.get_secret_value() if settings.staff_passwords else None
    secret = settings.secret_key.get_secret_value()
    web = WebState(
        app=app,
        staff=StaffDirectory(parse_staff_passwords(staff_text), secret),
        sessions=SessionCodec(secret, settings.session_hours * 3600),
        templates=build_templates(),
        secure_cookies=settings.public_base_url.startswith("https://"),
    )
    http = FastAPI(
        title="Lifecycle",
        version="1",
        description=DESCRIPTION,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    http.state.web = web
    http.include_router(api.router)
    http.include_router(webhooks.router)
    http.include_router(console.router)
    http.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_handlers(http)

    http.add_middleware(PageHeaders)

    @http.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse("/console", status_code=303)

    @http.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return http


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

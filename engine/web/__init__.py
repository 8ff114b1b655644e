"""The HTTP edge: ingest API, provider webhooks, unsubscribe pages and the support console.

Build it with ``engine.web.app.create_app(bootstrap(...))``. The modules:

    app.py        the FastAPI app factory: routers, error handlers, security headers
    auth.py       API key, staff passwords (PBKDF2), signed console sessions, CSRF
    api.py        POST /v1/customers, POST /v1/events (JSON, API key)
    webhooks.py   SendGrid events, Twilio status and inbound SMS (signatures), /u/{token}
    console.py    /console: the escalation queue, cases, customers, playbooks

This package holds only what they share: the per-app state and the template renderer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from anyio import CapacityLimiter
from fastapi import Request
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.responses import Response

from engine.bootstrap import App
from engine.settings import DEFAULT_SECRET_KEY
from engine.usecases.staff import LockedKeys
from engine.web.auth import SessionCodec, StaffDirectory

HERE = Path(__file__).parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"


def format_time(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment is not None else "—"


def format_span(seconds: float) -> str:
    """A rough human duration: ``3d 4h``, ``2h 10m``, ``5m``."""
    seconds = abs(int(seconds))
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


def path_part(value: object) -> str:
    """One URL path segment: ``/``, ``?`` and ``#`` in an id cannot break the link."""
    return quote(str(value), safe="")


def build_templates() -> Jinja2Templates:
    """Console and public pages; autoescaped, and a misspelt variable is an error, not ''."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = format_time
    env.filters["span"] = format_span
    env.filters["pathpart"] = path_part
    return Jinja2Templates(env=env)


@dataclass
class WebState:
    """Everything a request handler needs, built once by create_app."""

    app: App
    staff: StaffDirectory
    sessions: SessionCodec
    templates: Jinja2Templates
    secure_cookies: bool
    locked: LockedKeys = field(default_factory=LockedKeys, repr=False)
    _hash_limiter: CapacityLimiter | None = field(default=None, repr=False)

    def hash_limiter(self) -> CapacityLimiter:
        """The pool that password verifications wait for (made in the event loop)."""
        if self._hash_limiter is None:
            self._hash_limiter = CapacityLimiter(self.app.settings.sign_in_hash_workers)
        return self._hash_limiter

    @property
    def insecure_secret(self) -> bool:
        return self.app.settings.secret_key.get_secret_value() == DEFAULT_SECRET_KEY

    def brand(self) -> str:
        """The brand name from the rules' policies, or the sender name if they do not load."""
        try:
            return str(self.app.rules.policies.brand.get("name") or self.app.settings.from_name)
        except Exception:  # the rules failing to load must not break STOP/HELP handling
            return self.app.settings.from_name

    def render(
        self, request: Request, name: str, context: dict[str, Any], status_code: int = 200
    ) -> Response:
        return self.templates.TemplateResponse(request, name, context, status_code=status_code)


def web_state(request: Request) -> WebState:
    state: WebState = request.app.state.web
    return state

"""The support console: server-rendered pages for support leads, behind staff sign-in.

Every page needs a signed-in staff member: a GET without one is sent to the sign-in page
(303), a POST without one is refused (403) before anything is read or written. Whether a
session stands is the database's say on every request (engine.usecases.staff): sign-out
ends it for good, even for a copy of the cookie. Sign-in is rate limited per account and
per client address (429 with Retry-After), and the password hash runs in a small pool of
its own threads, so a flood of attempts waits there, not in front of other requests.
Every form carries the session's CSRF token. Actions follow post/redirect/get; what
happened, or why it could not (an illegal transition, say), comes back as a flash message.

Pages:
    /console                     open cases by SLA urgency (overdue first), status filter
    /console/cases/{id}          one case: fields, history, the customer's facts, messages,
                                 decisions; acknowledge · assign · resolve · reopen
    /console/customers/{id}      what we sent and why: messages with their decisions,
                                 enrollments, consent, suppressions (an id may hold '/')
    /console/playbooks[/{id}]    per arm: sent, opened, clicked, converted, uplift against
                                 the holdout; conversion by arm and daily sends charts over
                                 a period (?since=&until=, default: the span with data);
                                 skip reasons; the rule file
    /console/messages            messages by status (ambiguous ones need a person)
"""

from __future__ import annotations

import hmac
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import quote

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from itsdangerous import BadData, URLSafeSerializer
from sqlalchemy import func, or_, select, text
from sqlmodel import Session, col
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from engine.data.facts import subjects_for
from engine.data.models import (
    Customer,
    Decision,
    Enrollment,
    EnrollmentStatus,
    Escalation,
    EscalationStatus,
    Message,
    MessageStatus,
    Suppression,
)
from engine.data.moments import read_moment
from engine.data.uow import reading, unit_of_work
from engine.errors import IllegalTransition, InvalidChoice, LifecycleError, NotFound, RulesInvalid
from engine.escalations import cases as escalations
from engine.language.catalog import FactType
from engine.playbooks.model import RuleSet
from engine.usecases import lifecycle_report as kpis
from engine.usecases import staff as staff_sessions
from engine.usecases.messages import find_messages, parse_status
from engine.usecases.playbook_report import MIN_SAMPLE, playbook_results, playbook_span, wilson
from engine.web import WebState, web_state
from engine.web.auth import SESSION_COOKIE, ConsoleSession
from engine.web.charts import BarChart, FunnelChart, HeatMap, RateChart, TrendChart

router = APIRouter(prefix="/console", include_in_schema=False)

FLASH_COOKIE = "lifecycle_flash"
SENT_STATES = (MessageStatus.SENT, MessageStatus.DELIVERED)
CHART_DAYS = 30  # a playbook page without data shows the last 30 days
MAX_PERIOD_DAYS = 366
PAGE_ROWS = 200
CASE_ROWS = 50
NOTE_MAX = 2000


class NeedsSignIn(Exception):
    """A console GET without a signed-in staff member; answered with a 303 to sign-in."""

    def __init__(self, next_path: str) -> None:
        self.next_path = next_path
        super().__init__(next_path)


class ConsoleRefused(Exception):
    """A console request refused with an error page (403 for a POST without sign-in)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


# ── sessions, flash messages, rendering ─────────────────────────────────────────────


def read_session(web: WebState, request: Request) -> ConsoleSession | None:
    return web.sessions.loads(request.cookies.get(SESSION_COOKIE))


def set_session(web: WebState, response: Response, session: ConsoleSession) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        web.sessions.dumps(session),
        max_age=web.sessions.max_age_s,
        path="/",
        httponly=True,
        samesite="lax",
        secure=web.secure_cookies,
    )


def _flash_codec(web: WebState) -> URLSafeSerializer:
    return URLSafeSerializer(web.app.settings.secret_key.get_secret_value(), salt="console-flash")


def redirect(web: WebState, path: str, flash: tuple[str, str] | None = None) -> Response:
    response = RedirectResponse(path, status_code=303)
    if flash is not None:
        response.set_cookie(
            FLASH_COOKIE,
            _flash_codec(web).dumps(list(flash)),
            max_age=120,
            path="/console",
            httponly=True,
            samesite="lax",
            secure=web.secure_cookies,
        )
    return response


def _read_flash(web: WebState, request: Request) -> tuple[str, str] | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    try:
        kind, text = _flash_codec(web).loads(raw)
    except (BadData, ValueError, TypeError):
        return None
    return str(kind), str(text)


@dataclass
class Staff:
    """The signed-in staff member and the session their forms must echo."""

    name: str
    session: ConsoleSession


def staff_of(web: WebState, session: ConsoleSession | None) -> str | None:
    """The signed-in staff name, if the server still holds the session: not signed out,
    not revoked, not expired, and the account's password unchanged since sign-in."""
    if session is None or not session.token:
        return None
    live = staff_sessions.live_session(web.app.db, session.token, web.app.clock())
    if live is None:
        return None
    current = web.staff.fingerprint(live.staff)
    if current is None or not hmac.compare_digest(current, live.fingerprint):
        return None
    return live.staff


def current_staff(request: Request) -> str | None:
    """For other routers (the API docs): the signed-in staff name or None. Blocking: call
    it from a sync route or through run_in_threadpool."""
    web = web_state(request)
    return staff_of(web, read_session(web, request))


def signed_in(request: Request) -> Staff:
    """For pages: the staff member, or a redirect to sign-in."""
    web = web_state(request)
    session = read_session(web, request)
    name = staff_of(web, session)
    if name is None or session is None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise NeedsSignIn(path)
    return Staff(name, session)


async def signed_in_form(request: Request) -> tuple[Staff, FormData]:
    """For actions: the staff member and the posted form, after the CSRF check; else 403."""
    web = web_state(request)
    session = read_session(web, request)
    name = await run_in_threadpool(staff_of, web, session)
    if name is None or session is None:
        raise ConsoleRefused(403, "Sign in first: console actions need a signed-in staff member.")
    form = await request.form()
    token = form.get("csrf_token")
    if not session.csrf_ok(token if isinstance(token, str) else None):
        raise ConsoleRefused(
            403, "The form had no valid CSRF token. Reload the page and try again."
        )
    return Staff(name, session), form


def text_field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def page(
    request: Request,
    name: str,
    context: dict[str, Any],
    staff: Staff | None,
    status_code: int = 200,
) -> Response:
    web = web_state(request)
    flash = _read_flash(web, request)
    full = {
        "staff": staff.name if staff else None,
        "csrf": staff.session.csrf if staff else "",
        "flash": flash,
        "now": web.app.clock(),
        "insecure_secret": web.insecure_secret,
        "section": context.get("section", ""),
        **context,
    }
    response = web.render(request, name, full, status_code)
    if flash is not None:
        response.delete_cookie(FLASH_COOKIE, path="/console")
    return response


def error_page(request: Request, status: int, message: str, staff: Staff | None = None) -> Response:
    return page(request, "error.html", {"status": status, "message": message}, staff, status)


def safe_next(path: str | None) -> str:
    """Only a console path: never an open redirect to another site."""
    if path and path.startswith("/console") and not path.startswith("//") and "\\" not in path:
        return path
    return "/console"


def _rules(web: WebState) -> tuple[RuleSet | None, str | None]:
    try:
        return web.app.rules, None
    except RulesInvalid as exc:
        return None, str(exc)


# ── sign-in ─────────────────────────────────────────────────────────────────────────


@router.get("/login")
def login_form(request: Request, next: str = "/console") -> Response:
    web = web_state(request)
    session = read_session(web, request)
    if staff_of(web, session) is not None:
        return redirect(web, safe_next(next))
    session = session or ConsoleSession.anonymous()
    response = _login_page(request, session, safe_next(next), None, 200)
    set_session(web, response, session)
    return response


def _login_page(
    request: Request,
    session: ConsoleSession,
    next_path: str,
    error: str | None,
    status: int,
    name: str = "",
) -> Response:
    web = web_state(request)
    context = {
        "next": next_path,
        "error": error,
        "name": name,
        "configured": bool(web.staff),
        "login_csrf": session.csrf,
    }
    return page(request, "login.html", context, None, status)


@router.post("/login")
async def login(request: Request) -> Response:
    web = web_state(request)
    session = read_session(web, request)
    if session is None:
        raise ConsoleRefused(
            403, "Your sign-in form expired (or cookies are off). Reload it and try again."
        )
    form = await request.form()
    token = form.get("csrf_token")
    if not session.csrf_ok(token if isinstance(token, str) else None):
        raise ConsoleRefused(
            403, "The sign-in form had no valid CSRF token. Reload it and try again."
        )
    name, password = text_field(form, "name"), form.get("password")
    next_path = safe_next(text_field(form, "next"))
    if not web.staff:
        return _login_page(
            request,
            session,
            next_path,
            "No staff accounts are configured: set LIFECYCLE_STAFF_PASSWORDS.",
            403,
        )
    settings = web.app.settings
    now = web.app.clock()
    address = request.client.host if request.client else ""
    keys = staff_sessions.attempt_keys(name, address)
    window = timedelta(seconds=settings.sign_in_window_s)
    known = web.locked.wait(keys, now)
    if known is not None:  # a flood on a locked key costs no database round trip
        return _too_many_attempts(request, session, next_path, name, known)
    attempt = await run_in_threadpool(
        staff_sessions.begin_attempt, web.app.db, keys, now, settings.sign_in_attempts, window
    )
    if attempt.wait is not None:
        web.locked.lock(attempt.waits, now)
        return _too_many_attempts(request, session, next_path, name, attempt.wait)
    # PBKDF2 is meant to be slow: it runs in a pool of its own few threads, so a flood of
    # attempts queues there and every other request keeps its threads and the event loop.
    user = await to_thread.run_sync(
        web.staff.authenticate,
        name,
        password if isinstance(password, str) else "",
        limiter=web.hash_limiter(),
    )
    if user is None:
        return _login_page(request, session, next_path, "Wrong name or password.", 401, name)
    fingerprint = web.staff.fingerprint(user)
    assert fingerprint is not None
    lifetime = timedelta(seconds=web.sessions.max_age_s)

    def start() -> str:
        staff_sessions.attempt_succeeded(web.app.db, attempt, keys[0])
        return staff_sessions.open_session(web.app.db, user, fingerprint, address, now, lifetime)

    token = await run_in_threadpool(start)
    response = redirect(web, next_path, ("ok", f"Signed in as {user}."))
    set_session(web, response, session.signed_in(token))
    return response


def _too_many_attempts(
    request: Request, session: ConsoleSession, next_path: str, name: str, wait: int
) -> Response:
    message = f"Too many failed sign-ins. Wait {wait} s and try again."
    response = _login_page(request, session, next_path, message, 429, name)
    response.headers["Retry-After"] = str(wait)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    staff, _ = await signed_in_form(request)
    web = web_state(request)
    if staff.session.token:
        await run_in_threadpool(
            staff_sessions.end_session, web.app.db, staff.session.token, web.app.clock()
        )
    response = redirect(web, "/console/login")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# ── the queue ───────────────────────────────────────────────────────────────────────


@dataclass
class QueueRow:
    case: Escalation
    overdue: bool
    due_in_s: float
    customer_label: str


@router.get("")
def queue_page(request: Request, status: str = "") -> Response:
    staff = signed_in(request)
    web = web_state(request)
    now = web.app.clock()
    error = None
    with reading(web.app.db) as session:
        try:
            cases = escalations.queue(session, status or None)
        except InvalidChoice as exc:
            error, status = str(exc), ""
            cases = escalations.queue(session, None)
        labels = _customer_labels(session, [c.customer_id for c in cases])
    rows = [
        QueueRow(
            case=c,
            overdue=c.status != EscalationStatus.RESOLVED and c.sla_due_at <= now,
            due_in_s=(c.sla_due_at - now).total_seconds(),
            customer_label=labels.get(c.customer_id, c.customer_id),
        )
        for c in cases
    ]
    context = {
        "section": "queue",
        "rows": rows,
        "status": status,
        "statuses": [s.value for s in EscalationStatus],
        "overdue_count": sum(r.overdue for r in rows),
        "error": error,
    }
    return page(request, "queue.html", context, staff)


def _customer_labels(session: Session, ids: list[str]) -> dict[str, str]:
    if not ids:
        return {}
    statement = select(col(Customer.id), col(Customer.first_name), col(Customer.email)).where(
        col(Customer.id).in_(sorted(set(ids)))
    )
    return {
        cid: f"{first or ''} {('<' + email + '>') if email else ''}".strip() or cid
        for cid, first, email in session.execute(statement)
    }


# ── one case ────────────────────────────────────────────────────────────────────────


@dataclass
class FactRow:
    name: str
    value: str
    type: str
    description: str


def fact_rows(session: Session, rules: RuleSet, customer_id: str, now: datetime) -> list[FactRow]:
    subjects = subjects_for(session, [customer_id], rules.catalog, now, stages=rules.stages)
    if not subjects:
        return []
    rows = []
    for name, value in subjects[0].facts.items():
        spec = rules.catalog.get(name)
        kind = spec.type if spec is not None else None
        rows.append(
            FactRow(
                name=name,
                value=_fact_text(value, kind),
                type=str(kind) if kind else "",
                description=spec.description if spec is not None else "",
            )
        )
    return rows


def _fact_text(value: Any, kind: FactType | None) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if kind is FactType.MONEY and isinstance(value, int):
        return f"${value / 100:,.2f}"
    if kind is FactType.DATE and isinstance(value, int):
        return (date(1970, 1, 1) + timedelta(days=value)).isoformat()
    return str(value)


def _messages(
    session: Session, customer_id: str, *, staff_too: bool, limit: int = PAGE_ROWS
) -> list[Message]:
    statement = select(Message).where(col(Message.customer_id) == customer_id)
    if not staff_too:
        statement = statement.where(col(Message.kind) != "staff")
    newest = col(Message.created_at).desc()
    return list(session.scalars(statement.order_by(newest, col(Message.id)).limit(limit)))


def _decisions(session: Session, customer_id: str, limit: int = PAGE_ROWS) -> list[Decision]:
    statement = (
        select(Decision)
        .where(col(Decision.customer_id) == customer_id)
        .order_by(col(Decision.at).desc(), col(Decision.id).desc())
        .limit(limit)
    )
    return list(session.scalars(statement))


@router.get("/cases/{case_id}")
def case_page(case_id: int, request: Request) -> Response:
    staff = signed_in(request)
    web = web_state(request)
    now = web.app.clock()
    rules, rules_error = _rules(web)
    with reading(web.app.db) as session:
        try:
            case = escalations.get_case(session, case_id)
        except NotFound as exc:
            return error_page(request, 404, str(exc), staff)
        customer = session.get(Customer, case.customer_id)
        context = {
            "section": "queue",
            "case": case,
            "customer": customer,
            "overdue": case.status != EscalationStatus.RESOLVED and case.sla_due_at <= now,
            "due_in_s": (case.sla_due_at - now).total_seconds(),
            "history": escalations.history(session, case_id),
            "facts": fact_rows(session, rules, case.customer_id, now) if rules else [],
            "rules_error": rules_error,
            "messages": _messages(session, case.customer_id, staff_too=True, limit=CASE_ROWS),
            "decisions": _decisions(session, case.customer_id, limit=CASE_ROWS),
            "leads": list(rules.roster.leads) if rules else [],
        }
    return page(request, "case.html", context, staff)


ACTIONS = ("acknowledge", "assign", "resolve", "reopen")


@router.post("/cases/{case_id}/{action}")
async def case_action(case_id: int, action: str, request: Request) -> Response:
    staff, form = await signed_in_form(request)
    web = web_state(request)
    back = f"/console/cases/{case_id}"
    if action not in ACTIONS:
        return error_page(
            request, 404, f"unknown action {action!r}; use one of: {', '.join(ACTIONS)}", staff
        )
    note = text_field(form, "note")
    if action == "resolve" and not note:
        return redirect(web, back, ("error", "Write a note to resolve the case: what was done?"))
    if len(note) > NOTE_MAX:
        return redirect(web, back, ("error", f"The note is longer than {NOTE_MAX} characters."))
    owner = text_field(form, "owner")

    def work() -> str:
        with unit_of_work(web.app.db) as session:
            now = web.app.clock()
            if action == "acknowledge":
                escalations.acknowledge(session, case_id, staff.name, now)
                done = "Acknowledged."
            elif action == "assign":
                lead = web.app.rules.roster.find(owner)
                if lead is None:
                    names = [lead.name for lead in web.app.rules.roster.leads]
                    raise InvalidChoice("support lead", owner, names)
                escalations.assign(session, case_id, lead.name, staff.name, now)
                done = f"Assigned to {lead.name}."
            elif action == "resolve":
                escalations.resolve(session, case_id, note, staff.name, now)
                done = "Resolved."
            else:
                escalations.reopen(session, case_id, note, staff.name, now)
                done = "Reopened."
        return done

    try:
        done = await run_in_threadpool(work)
    except NotFound as exc:
        return error_page(request, 404, str(exc), staff)
    except (IllegalTransition, InvalidChoice, RulesInvalid) as exc:
        return redirect(web, back, ("error", str(exc)))
    return redirect(web, back, ("ok", done))


# ── one customer: what we sent, and why ─────────────────────────────────────────────


@router.get("/customers/{customer_id:path}")
def customer_page(customer_id: str, request: Request) -> Response:
    staff = signed_in(request)
    web = web_state(request)
    with reading(web.app.db) as session:
        customer = session.get(Customer, customer_id)
        if customer is None:
            return error_page(request, 404, f"no customer with id {customer_id!r}", staff)
        messages = _messages(session, customer_id, staff_too=False)
        by_message: dict[str, list[Decision]] = defaultdict(list)
        if messages:
            explained = (
                select(Decision)
                .where(col(Decision.message_id).in_([m.id for m in messages]))
                .order_by(col(Decision.at), col(Decision.id))
            )
            for decision in session.scalars(explained):
                by_message[decision.message_id or ""].append(decision)
        unattached = list(
            session.scalars(
                select(Decision)
                .where(col(Decision.customer_id) == customer_id, col(Decision.message_id).is_(None))
                .order_by(col(Decision.at).desc(), col(Decision.id).desc())
                .limit(PAGE_ROWS)
            )
        )
        addresses = [("email", customer.email), ("sms", customer.phone)]
        wanted = [
            (col(Suppression.channel) == channel) & (col(Suppression.address) == address)
            for channel, address in addresses
            if address
        ]
        suppressions = (
            list(session.scalars(select(Suppression).where(or_(*wanted)))) if wanted else []
        )
        enrollments = list(
            session.scalars(
                select(Enrollment)
                .where(col(Enrollment.customer_id) == customer_id)
                .order_by(col(Enrollment.entered_at).desc())
            )
        )
        cases = list(
            session.scalars(
                select(Escalation)
                .where(col(Escalation.customer_id) == customer_id)
                .order_by(col(Escalation.opened_at).desc())
            )
        )
    context = {
        "section": "customers",
        "customer": customer,
        "messages": messages,
        "by_message": by_message,
        "unattached": unattached,
        "suppressions": suppressions,
        "enrollments": enrollments,
        "cases": cases,
    }
    return page(request, "customer.html", context, staff)


@router.get("/customers")
def find_customer(request: Request, q: str = "") -> Response:
    staff = signed_in(request)
    web = web_state(request)
    q = q.strip()
    found: list[Customer] = []
    if q:
        with reading(web.app.db) as session:
            if session.get(Customer, q) is not None:
                return redirect(web, f"/console/customers/{quote(q, safe='')}")
            statement = (
                select(Customer)
                .where(
                    or_(col(Customer.email) == q.lower(), col(Customer.phone) == q.replace(" ", ""))
                )
                .limit(50)
            )
            found = list(session.scalars(statement))
    if len(found) == 1:
        return redirect(web, f"/console/customers/{quote(found[0].id, safe='')}")
    return page(request, "customers.html", {"section": "customers", "q": q, "found": found}, staff)


# ── playbooks ───────────────────────────────────────────────────────────────────────


def _count_by_playbook(session: Session, statement: Any) -> dict[str, int]:
    return {playbook: count for playbook, count in session.execute(statement)}


@router.get("/playbooks")
def playbooks_page(request: Request) -> Response:
    staff = signed_in(request)
    web = web_state(request)
    rules, rules_error = _rules(web)
    if rules is None:
        return error_page(request, 503, f"The rules do not load:\n{rules_error}", staff)
    with reading(web.app.db) as session:
        enrolled = _count_by_playbook(
            session,
            select(col(Enrollment.playbook), func.count()).group_by(col(Enrollment.playbook)),
        )
        active = _count_by_playbook(
            session,
            select(col(Enrollment.playbook), func.count())
            .where(col(Enrollment.status) == EnrollmentStatus.ACTIVE)
            .group_by(col(Enrollment.playbook)),
        )
        sent = _count_by_playbook(
            session,
            select(col(Message.playbook), func.count())
            .where(col(Message.status).in_(SENT_STATES), col(Message.kind) != "staff")
            .group_by(col(Message.playbook)),
        )
    rows = [
        {
            "playbook": pb,
            "enrolled": enrolled.get(pb.id, 0),
            "active": active.get(pb.id, 0),
            "sent": sent.get(pb.id, 0),
        }
        for pb in sorted(rules.playbooks.values(), key=lambda p: (p.stage, p.priority, p.id))
    ]
    return page(
        request,
        "playbooks.html",
        {"section": "playbooks", "rows": rows, "version": rules.version},
        staff,
    )


def _day_expression(dialect: str, column: Any) -> Any:
    """The UTC calendar day of a timestamp, as 'YYYY-MM-DD', in SQL."""
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)


def daily_sends(session: Session, playbook: str, first: date, last: date) -> list[tuple[date, int]]:
    """Messages of the playbook handed to a provider, per UTC day, ``first`` to ``last``."""
    start, end = _midnight(first), _midnight(last + timedelta(days=1))
    day = _day_expression(session.get_bind().dialect.name, col(Message.sent_at))
    statement = (
        select(day, func.count())
        .where(col(Message.playbook) == playbook, col(Message.kind) != "staff")
        .where(col(Message.sent_at) >= start, col(Message.sent_at) < end)
        .group_by(day)
    )
    counts = {str(d): n for d, n in session.execute(statement)}
    days = (last - first).days + 1
    return [
        (first + timedelta(days=i), counts.get((first + timedelta(days=i)).isoformat(), 0))
        for i in range(days)
    ]


def _midnight(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), tzinfo=UTC)


@dataclass(frozen=True)
class Period:
    """The days a playbook page shows, both ends included (UTC)."""

    first: date
    last: date
    defaulted: bool  # not asked for: the span that has data (or the last 30 days)

    @property
    def since(self) -> datetime:
        return _midnight(self.first)

    @property
    def until(self) -> datetime:
        return _midnight(self.last + timedelta(days=1))


def _date_parameter(name: str, text: str) -> date | None:
    if not text.strip():
        return None
    try:
        value = date.fromisoformat(text.strip())
    except ValueError:
        raise ConsoleRefused(400, f"{name} must be a date like 2026-03-01, not {text!r}") from None
    if value >= date.max:  # a period ends the day after its last: there is none after it
        raise ConsoleRefused(400, f"{name} must be before {date.max}, not {text!r}")
    return value


def _checked(period: Period) -> Period:
    """A period the charts can draw: in order, and at most MAX_PERIOD_DAYS long."""
    first, last = period.first, period.last
    if first > last:
        raise ConsoleRefused(400, f"since ({first}) is after until ({last})")
    if (last - first).days + 1 > MAX_PERIOD_DAYS:
        raise ConsoleRefused(
            400,
            f"{first} to {last} is {(last - first).days + 1} days; "
            f"show at most {MAX_PERIOD_DAYS} at a time",
        )
    return period


def playbook_period(session: Session, playbook: str, since: str, until: str, today: date) -> Period:
    """The period asked for, or by default the span with data: a simulated March shows
    March, not an empty last 30 days."""
    first, last = _date_parameter("since", since), _date_parameter("until", until)
    defaulted = first is None and last is None
    if first is None or last is None:
        start, end = playbook_span(session, playbook)
        data_first = start.date() if start else None
        data_last = end.date() if end else None
        if last is None:
            last = data_last if data_last and (first is None or data_last >= first) else today
        if first is None:
            first = (
                data_first
                if data_first and data_first <= last
                else last - timedelta(days=CHART_DAYS - 1)
            )
    return _checked(Period(first, last, defaulted))


@router.get("/playbooks/{playbook_id}")
def playbook_page(playbook_id: str, request: Request, since: str = "", until: str = "") -> Response:
    staff = signed_in(request)
    web = web_state(request)
    rules, rules_error = _rules(web)
    if rules is None:
        return error_page(request, 503, f"The rules do not load:\n{rules_error}", staff)
    playbook = rules.playbooks.get(playbook_id)
    if playbook is None:
        return error_page(request, 404, f"no playbook {playbook_id!r}", staff)
    now = web.app.clock()
    with reading(web.app.db) as session:
        try:
            period = playbook_period(session, playbook_id, since, until, now.date())
        except ConsoleRefused as refused:
            return error_page(request, refused.status, refused.message, staff)
        (result,) = [
            r
            for r in playbook_results(session, rules, period.since, period.until)
            if r.playbook == playbook_id
        ]
        skipped: dict[str, int] = defaultdict(int)
        statement = (
            select(col(Decision.reason), func.count())
            .where(col(Decision.playbook) == playbook_id, col(Decision.outcome) == "skipped")
            .where(col(Decision.at) >= period.since, col(Decision.at) < period.until)
            .group_by(col(Decision.reason))
        )
        for reason, count in session.execute(statement):
            skipped[(reason or "").split(":", 1)[0].strip() or "(no reason)"] += count
        series = daily_sends(session, playbook_id, period.first, period.last)
    arms = list(result.arms.values())
    comparison = next((arm.uplift.against for arm in arms if arm.uplift), None)
    context = {
        "section": "playbooks",
        "playbook": playbook,
        "source": rules.files.get(playbook_id, ""),
        "period": period,
        "result": result,
        "arms": arms,
        "intervals": {arm.arm: wilson(arm.converted, arm.enrolled) for arm in arms if arm.enrolled},
        "min_sample": MIN_SAMPLE,
        "enrolled": sum(arm.enrolled for arm in arms),
        "converted": sum(arm.converted for arm in arms),
        "sent": sum(arm.sent for arm in arms),
        "skipped": sorted(skipped.items(), key=lambda item: (-item[1], item[0])),
        "chart": BarChart.of(series),
        "rates": RateChart.of(arms, comparison) if result.goal else None,
    }
    return page(request, "playbook.html", context, staff)


# ── lifecycle: stages and KPIs ──────────────────────────────────────────────────────


def lifecycle_period(session: Session, since: str, until: str, today: date) -> Period:
    """The period asked for (validated as on a playbook page), or by default the last
    year of data: a simulated March shows up to March, not an empty present."""
    first, last = _date_parameter("since", since), _date_parameter("until", until)
    defaulted = first is None and last is None
    if first is None or last is None:
        row = session.execute(
            text(
                "SELECT (SELECT min(signed_up_at) FROM customers), "
                "(SELECT max(occurred_at) FROM events)"
            )
        ).one()
        data_first, data_last = read_moment(row[0]), read_moment(row[1])
        if last is None:
            last = (
                data_last.date()
                if data_last and (first is None or data_last.date() >= first)
                else today
            )
        if first is None:
            earliest = last - timedelta(days=MAX_PERIOD_DAYS - 1)
            first = max(data_first.date(), earliest) if data_first else earliest
            first = min(first, last)
    return _checked(Period(first, last, defaulted))


@router.get("/lifecycle")
def lifecycle_page(request: Request, since: str = "", until: str = "") -> Response:
    staff = signed_in(request)
    web = web_state(request)
    rules, rules_error = _rules(web)
    if rules is None:
        return error_page(request, 503, f"The rules do not load:\n{rules_error}", staff)
    with reading(web.app.db) as session:
        try:
            period = lifecycle_period(session, since, until, web.app.clock().date())
        except ConsoleRefused as refused:
            return error_page(request, refused.status, refused.message, staff)
        report = kpis.lifecycle_report(session, rules.stages, period.since, period.until)
    froms, tos = report.transition_stages()
    context = {
        "section": "lifecycle",
        "period": period,
        "report": report,
        "no_model": rules.stages is None,
        "stages": rules.stages,
        "froms": froms,
        "tos": tos,
        "historic": kpis.sum_revenue(report.cohorts),
        "funnel": FunnelChart.of([(s.stage, s.label, s.customers) for s in report.stages]),
        "heat": HeatMap.of([(c.month, c.size, c.retention) for c in report.cohorts]),
        "trend": TrendChart.of([(start, n.score, n.answers) for start, n in report.nps_trend]),
    }
    return page(request, "lifecycle.html", context, staff)


# ── messages by status ──────────────────────────────────────────────────────────────


@router.get("/messages")
def messages_page(request: Request, status: str = MessageStatus.AMBIGUOUS.value) -> Response:
    staff = signed_in(request)
    web = web_state(request)
    try:
        wanted = parse_status(status)
    except LifecycleError as exc:
        return error_page(request, 400, str(exc), staff)
    with reading(web.app.db) as session:
        messages = find_messages(session, status=wanted, limit=PAGE_ROWS)
    context = {
        "section": "messages",
        "messages": messages,
        "status": wanted.value,
        "statuses": [s.value for s in MessageStatus],
    }
    return page(request, "messages.html", context, staff)

"""Console sessions end server-side, sign-in is rate limited, customer pages work for any
id, and the API docs are private (issue 10, points 2, 3, 12 and 13), through the real
HTTP app and the real CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select
from sqlmodel import Session
from typer.testing import CliRunner

from engine.bootstrap import App
from engine.cli import app as cli_app
from engine.clock import utcnow
from engine.data.models import Customer, SignInAttempt, StaffSession
from engine.escalations import cases as escalations
from engine.web.app import create_app
from engine.web.auth import SESSION_COOKIE, hash_password
from tests.support.server import serve, web_app

API_KEY = "test-api-key-0123456789"
STAFF = "Priya Shah"
OTHER = "Tom Okafor"
PASSWORD = "correct horse battery"
HASH = hash_password(PASSWORD, iterations=1_000)
PASSWORDS = f"{STAFF}:{HASH},{OTHER}:{HASH}"


def make_app(db_url: str, tmp_path: Path, now: datetime, **settings: object) -> App:
    values: dict[str, object] = {"api_key": API_KEY, "staff_passwords": PASSWORDS, **settings}
    return web_app(db_url, tmp_path, now, **values)


@pytest.fixture
def app(db_url: str, tmp_path: Path, now: datetime) -> Iterator[App]:
    application = make_app(db_url, tmp_path, now)
    yield application
    application.db.dispose()


@pytest.fixture
def client(app: App) -> Iterator[TestClient]:
    with TestClient(create_app(app)) as test_client:
        yield test_client


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def sign_in(client: TestClient, name: str = STAFF, password: str = PASSWORD) -> httpx.Response:
    form = client.get("/console/login")
    return client.post(
        "/console/login",
        data={"csrf_token": csrf_of(form.text), "name": name, "password": password},
        follow_redirects=False,
    )


def sign_out(client: TestClient) -> httpx.Response:
    token = csrf_of(client.get("/console").text)
    return client.post("/console/logout", data={"csrf_token": token}, follow_redirects=False)


def can_see_console(client: TestClient, cookie: str) -> bool:
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, cookie)
    return client.get("/console", follow_redirects=False).status_code == 200


# ── point 2: sessions end server-side ───────────────────────────────────────────────


def test_a_copied_cookie_stops_working_at_sign_out(client: TestClient, app: App) -> None:
    assert sign_in(client).status_code == 303
    copied = client.cookies[SESSION_COOKIE]
    assert can_see_console(client, copied)
    assert sign_out(client).status_code == 303
    assert not can_see_console(client, copied)
    # ...and it can act on nothing either.
    client.cookies.set(SESSION_COOKIE, copied)
    refused = client.post("/console/logout", data={"csrf_token": "x"}, follow_redirects=False)
    assert refused.status_code == 403


def test_signing_out_ends_only_that_session(app: App) -> None:
    with TestClient(create_app(app)) as laptop, TestClient(create_app(app)) as phone:
        sign_in(laptop)
        sign_in(phone)
        sign_out(laptop)
        assert laptop.get("/console", follow_redirects=False).status_code == 303
        assert phone.get("/console", follow_redirects=False).status_code == 200


def test_a_changed_password_ends_every_session_of_that_account(
    app: App, db_url: str, tmp_path: Path, now: datetime
) -> None:
    with TestClient(create_app(app)) as client:
        sign_in(client)
        cookie = client.cookies[SESSION_COOKIE]
    changed = make_app(
        db_url,
        tmp_path,
        now,
        staff_passwords=f"{STAFF}:{hash_password('a new one', iterations=1_000)},{OTHER}:{HASH}",
    )
    with TestClient(create_app(changed)) as client:
        assert not can_see_console(client, cookie)
        assert sign_in(client, password="a new one").status_code == 303
    changed.db.dispose()


def test_staff_revoke_ends_every_session_of_one_member_at_once(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI reads the real clock, so this app's clock is the real one too.
    app = make_app(db_url, tmp_path, utcnow())
    with (
        TestClient(create_app(app)) as one,
        TestClient(create_app(app)) as two,
        TestClient(create_app(app)) as other,
    ):
        for client, name in ((one, STAFF), (two, STAFF), (other, OTHER)):
            sign_in(client, name)
        monkeypatch.setenv("LIFECYCLE_DATABASE_URL", db_url)
        monkeypatch.setenv("COLUMNS", "200")
        listed = CliRunner().invoke(cli_app, ["staff", "sessions", STAFF])
        assert listed.exit_code == 0 and listed.output.count(STAFF) == 2, listed.output
        result = CliRunner().invoke(cli_app, ["staff", "revoke", STAFF])
        assert result.exit_code == 0, result.output
        assert f"revoked 2 sessions of {STAFF}" in result.output
        assert one.get("/console", follow_redirects=False).status_code == 303
        assert two.get("/console", follow_redirects=False).status_code == 303
        assert other.get("/console", follow_redirects=False).status_code == 200
    app.db.dispose()


def test_the_database_holds_a_digest_of_the_session_token_never_the_token(
    client: TestClient, app: App
) -> None:
    sign_in(client)
    cookie = client.cookies[SESSION_COOKIE]
    with Session(app.db) as session:
        (row,) = session.scalars(select(StaffSession)).all()
    assert row.staff == STAFF and row.revoked_at is None
    assert row.id not in cookie and len(row.id) == 64


def test_staff_add_reads_the_password_from_standard_input() -> None:
    result = CliRunner().invoke(cli_app, ["staff", "add", "Ana Lopes"], input="s3cret\n")
    assert result.exit_code == 0, result.output
    name, encoded = result.output.strip().rsplit(":", 1)
    from engine.web.auth import verify_password

    assert name == "Ana Lopes" and verify_password("s3cret", encoded)
    assert "s3cret" not in result.output


# ── point 3: sign-in is rate limited ────────────────────────────────────────────────


def test_after_five_wrong_passwords_even_the_right_one_waits(client: TestClient) -> None:
    for _ in range(5):
        assert sign_in(client, password="wrong").status_code == 401
    for password in ("wrong", PASSWORD):
        limited = sign_in(client, password=password)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "60"
        assert "Too many failed sign-ins. Wait 60 s and try again." in limited.text
    assert client.get("/console", follow_redirects=False).status_code == 303


def test_a_locked_key_is_refused_without_asking_the_database_again(
    client: TestClient, app: App
) -> None:
    for _ in range(6):
        sign_in(client, password="wrong")
    with Session(app.db) as session:  # the database forgets, this process does not
        session.execute(delete(SignInAttempt))
        session.commit()
    assert sign_in(client).status_code == 429


def test_the_limit_is_per_client_address_too(client: TestClient) -> None:
    for number in range(5):
        assert sign_in(client, name=f"guess {number}", password="wrong").status_code == 401
    assert sign_in(client, name=OTHER).status_code == 429


def test_the_window_moves_on_and_a_success_clears_the_account(
    app: App, db_url: str, tmp_path: Path, now: datetime
) -> None:
    with TestClient(create_app(app)) as client:
        for _ in range(5):
            sign_in(client, password="wrong")
        assert sign_in(client).status_code == 429
    later = make_app(db_url, tmp_path, now + timedelta(seconds=61))
    with TestClient(create_app(later)) as client:
        assert sign_in(client).status_code == 303
    later.db.dispose()


# ── point 12: ids with '/' ──────────────────────────────────────────────────────────


def test_every_page_that_shows_an_id_with_a_slash_works(
    client: TestClient, app: App, now: datetime
) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    created = client.post(
        "/v1/customers", json={"id": "acme/42", "email": "a@acme.example"}, headers=auth
    )
    assert created.status_code == 201
    with Session(app.db, expire_on_commit=False) as session:
        case, _ = escalations.open_or_join(
            session,
            customer_id="acme/42",
            reason="parcel lost",
            trigger_event_id=None,
            priority="high",
            queue="complaints",
            sla_due_at=now + timedelta(hours=4),
            now=now,
        )
        session.commit()
    sign_in(client)
    link = "/console/customers/acme%2F42"
    assert link in client.get("/console").text
    assert link in client.get(f"/console/cases/{case.id}").text
    page = client.get(link)
    assert page.status_code == 200 and "acme/42" in page.text
    assert client.get("/console/customers/acme/42").status_code == 200
    found = client.get("/console/customers", params={"q": "acme/42"}, follow_redirects=False)
    assert found.headers["location"] == link
    assert client.get("/console/customers", params={"q": "a@acme.example"}).status_code == 200
    with Session(app.db) as session:
        assert session.get(Customer, "acme/42") is not None


# ── point 13: the API docs and the headers ──────────────────────────────────────────


def test_docs_and_schema_are_not_public_by_default(client: TestClient) -> None:
    assert client.get("/docs").status_code == 404
    assert client.get("/openapi.json").status_code == 404
    assert client.get("/openapi.json", headers={"Authorization": "Bearer wrong"}).status_code == 404
    ok = client.get("/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and "/v1/events" in ok.json()["paths"]


def test_signed_in_staff_see_the_docs_with_the_console_headers(client: TestClient) -> None:
    sign_in(client)
    docs = client.get("/docs")
    assert docs.status_code == 200 and "SwaggerUIBundle" in docs.text
    assert "cdn" not in docs.text and "https://" not in docs.text
    csp = docs.headers["content-security-policy"]
    assert csp.startswith("default-src 'none'; script-src 'self' 'sha256-")
    assert "frame-ancestors 'none'" in csp
    assert docs.headers["x-frame-options"] == "DENY"
    assert docs.headers["x-content-type-options"] == "nosniff"
    bundle = client.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    assert client.get("/openapi.json").status_code == 200


def test_the_schema_is_served_with_the_console_headers(client: TestClient) -> None:
    """Not only the page: the schema it reads (to staff and API-key holders) too."""
    with_key = client.get("/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"})
    sign_in(client)
    for schema in (with_key, client.get("/openapi.json")):
        assert schema.status_code == 200
        assert schema.headers["x-content-type-options"] == "nosniff"
        assert schema.headers["x-frame-options"] == "DENY"
        assert schema.headers["content-security-policy"].startswith("default-src 'none'")


def test_the_inline_script_of_the_docs_matches_its_csp_hash(client: TestClient) -> None:
    import base64
    import hashlib

    sign_in(client)
    docs = client.get("/docs")
    (script,) = re.findall(r"<script>(.*?)</script>", docs.text, re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in docs.headers["content-security-policy"]


def test_docs_can_be_made_public_and_https_adds_hsts(
    db_url: str, tmp_path: Path, now: datetime
) -> None:
    public = make_app(
        db_url, tmp_path, now, api_docs=True, public_base_url="https://lifecycle.example"
    )
    with TestClient(create_app(public), base_url="https://testserver") as client:
        docs = client.get("/docs")
        assert docs.status_code == 200
        assert docs.headers["strict-transport-security"].startswith("max-age=31536000")
        assert client.get("/openapi.json").status_code == 200
        for path in ("/healthz", "/console/login"):
            assert "strict-transport-security" in client.get(path).headers
    public.db.dispose()


def test_plain_http_has_no_hsts(client: TestClient) -> None:
    assert "strict-transport-security" not in client.get("/console/login").headers


def test_a_password_check_in_progress_holds_up_no_other_request(app: App) -> None:
    """The PBKDF2 flood once slowed /healthz from 5 to 219 ms: the check runs in its own
    pool, so while one is in progress (held here until the other requests have answered)
    health checks and console pages are answered; in the event loop they would wait."""
    http_app = create_app(app)
    staff = http_app.state.web.staff
    checking, release = threading.Event(), threading.Event()
    real = staff.authenticate

    def held(name: str, password: str) -> str | None:
        checking.set()
        release.wait(timeout=60)
        return real(name, password)

    staff.authenticate = held

    def attempt(base: str) -> int:
        with httpx.Client(base_url=base, timeout=60) as http:
            form = http.get("/console/login")
            data = {"csrf_token": csrf_of(form.text), "name": STAFF, "password": "wrong"}
            return http.post("/console/login", data=data).status_code

    with serve(http_app) as base, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(attempt, base)
        try:
            assert checking.wait(timeout=30), "the sign-in never reached its password check"
            with httpx.Client(base_url=base, timeout=10) as other:
                assert other.get("/healthz").status_code == 200
                assert other.get("/console/login").status_code == 200
        finally:
            release.set()
        assert pending.result(timeout=60) == 401


def test_concurrent_attempts_cannot_slip_past_the_limit(app: App) -> None:
    """Twenty attempts at once, through a real server: the attempt is counted before its
    password is checked, so no more than the limit reach the check."""
    import concurrent.futures

    def attempt(base: str) -> int:
        with httpx.Client(base_url=base) as http:
            form = http.get("/console/login")
            data = {"csrf_token": csrf_of(form.text), "name": STAFF, "password": "wrong"}
            return http.post("/console/login", data=data).status_code

    with serve(create_app(app)) as base, concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(attempt, [base] * 20))
    assert set(statuses) <= {401, 429}
    assert statuses.count(401) <= app.settings.sign_in_attempts  # all 429 is allowed too

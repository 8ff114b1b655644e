"""Who may do what over HTTP: the ingest API's key, staff passwords and console sessions.

Ingest API
    ``Authorization: Bearer <LIFECYCLE_API_KEY>``, or the key as the user name of HTTP
    Basic (``Basic base64("<key>:")``), which is how Segment's and RudderStack's SDKs and
    destinations send their write key. With no key configured every API call is refused
    with 503 naming the missing setting: the API is never open by default.

Staff accounts
    ``LIFECYCLE_STAFF_PASSWORDS`` holds comma-separated ``name:pbkdf2_sha256$iterations$salt$hash``
    entries (a name may contain spaces but no comma or colon). Make one with
    ``lifecycle staff add NAME`` (the password on standard input). With no accounts, nobody
    can sign in.

Console session
    One cookie, signed and timestamped with ``secret_key`` (itsdangerous), HttpOnly,
    SameSite=Lax, Secure when ``public_base_url`` is https, valid ``session_hours``. It holds
    the CSRF token that every console form posts back and, once signed in, a random session
    token whose digest is a row of ``staff_sessions`` (engine.usecases.staff): the server
    decides on every request whether the session still stands (sign-out, ``lifecycle staff
    revoke``, a changed password and expiry all end it). Signing in rotates the CSRF token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadData, URLSafeTimedSerializer

from engine.errors import ConfigurationError

ALGORITHM = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 600_000  # OWASP's 2023 figure for PBKDF2-HMAC-SHA256
SESSION_COOKIE = "lifecycle_session"
SESSION_SALT = "console-session"


# ── passwords ───────────────────────────────────────────────────────────────────────


def hash_password(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: str | None = None
) -> str:
    """``pbkdf2_sha256$<iterations>$<salt>$<base64 hash>``, for LIFECYCLE_STAFF_PASSWORDS."""
    if not password:
        raise ValueError("a password cannot be empty")
    if iterations < 1:
        raise ValueError(f"iterations must be positive, not {iterations}")
    salt = salt or secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"{ALGORITHM}${iterations}${salt}${base64.b64encode(digest).decode()}"


def _split(encoded: str) -> tuple[int, str, bytes] | None:
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != ALGORITHM:
        return None
    try:
        iterations = int(parts[1])
        expected = base64.b64decode(parts[3], validate=True)
    except ValueError:
        return None
    if iterations < 1 or not parts[2] or not expected:
        return None
    return iterations, parts[2], expected


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches ``encoded``; a malformed hash matches nothing."""
    split = _split(encoded)
    if split is None:
        return False
    iterations, salt, expected = split
    actual = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return hmac.compare_digest(actual, expected)


def parse_staff_passwords(text: str | None) -> dict[str, str]:
    """``{name: encoded hash}`` from LIFECYCLE_STAFF_PASSWORDS; a bad entry is a
    ConfigurationError naming its position (never echoing the hash)."""
    accounts: dict[str, str] = {}
    if not text or not text.strip():
        return accounts
    for position, entry in enumerate(text.split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        name, colon, encoded = entry.rpartition(":")
        name = name.strip()
        if not colon or not name:
            raise ConfigurationError(
                "LIFECYCLE_STAFF_PASSWORDS", f"entry {position} is not 'name:{ALGORITHM}$...'"
            )
        if _split(encoded.strip()) is None:
            raise ConfigurationError(
                "LIFECYCLE_STAFF_PASSWORDS",
                f"entry {position} ({name}) is not a {ALGORITHM}$iterations$salt$hash "
                "made by `lifecycle staff add NAME`",
            )
        if name in accounts:
            raise ConfigurationError("LIFECYCLE_STAFF_PASSWORDS", f"{name!r} is listed twice")
        accounts[name] = encoded.strip()
    return accounts


class StaffDirectory:
    """The staff accounts the console accepts."""

    def __init__(self, accounts: dict[str, str], secret_key: str) -> None:
        self._accounts = dict(accounts)
        self._secret = secret_key.encode()
        # A sign-in attempt for an unknown name costs as much as one for a known name.
        iterations = max((s[0] for s in map(_split, accounts.values()) if s), default=1)
        self._decoy = hash_password(secrets.token_hex(8), iterations=iterations)

    def __bool__(self) -> bool:
        return bool(self._accounts)

    @property
    def names(self) -> list[str]:
        return sorted(self._accounts)

    def authenticate(self, name: str, password: str) -> str | None:
        """The account name when the password is right, else None."""
        encoded = self._accounts.get(name.strip())
        if encoded is None:
            verify_password(password, self._decoy)
            return None
        return name.strip() if verify_password(password, encoded) else None

    def fingerprint(self, name: str) -> str | None:
        """A keyed digest of the account's stored hash: it changes when the password does."""
        encoded = self._accounts.get(name)
        if encoded is None:
            return None
        return hmac.new(self._secret, encoded.encode(), hashlib.sha256).hexdigest()[:24]


# ── console sessions ────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class ConsoleSession:
    """What the session cookie carries; ``token`` is None before sign-in."""

    csrf: str
    token: str | None = None

    @classmethod
    def anonymous(cls) -> ConsoleSession:
        return cls(csrf=secrets.token_urlsafe(24))

    def signed_in(self, token: str) -> ConsoleSession:
        return ConsoleSession(csrf=secrets.token_urlsafe(24), token=token)

    def csrf_ok(self, submitted: str | None) -> bool:
        return bool(submitted) and hmac.compare_digest(self.csrf.encode(), str(submitted).encode())


class SessionCodec:
    """Signs and reads the session cookie; a forged, damaged or expired one reads as None."""

    def __init__(self, secret_key: str, max_age_s: int) -> None:
        self._serializer = URLSafeTimedSerializer(secret_key, salt=SESSION_SALT)
        self.max_age_s = max_age_s

    def dumps(self, session: ConsoleSession) -> str:
        return self._serializer.dumps([session.csrf, session.token])

    def loads(self, cookie: str | None) -> ConsoleSession | None:
        if not cookie:
            return None
        try:
            csrf, token = self._serializer.loads(cookie, max_age=self.max_age_s)
        except (BadData, ValueError, TypeError):
            return None
        if not isinstance(csrf, str) or not csrf:
            return None
        return ConsoleSession(csrf=csrf, token=token if isinstance(token, str) else None)


# ── the ingest API key ──────────────────────────────────────────────────────────────


def api_key_problem(configured: str | None, authorization: str | None) -> tuple[int, str] | None:
    """(status, reason) when a request may not use the API, None when it may."""
    if not configured:
        return 503, "the ingest API is disabled: set LIFECYCLE_API_KEY to enable it"
    key = _presented_key(authorization or "")
    if key is None:
        return 401, (
            "missing API key: send 'Authorization: Bearer <LIFECYCLE_API_KEY>', or the key "
            "as the user name of HTTP Basic (a Segment write key)"
        )
    if not hmac.compare_digest(key.encode(), configured.encode()):
        return 401, "wrong API key"
    return None


def _presented_key(authorization: str) -> str | None:
    """The key in a Bearer token, or the user name of Basic credentials (the password is
    not used: Segment sends none)."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if not token:
        return None
    if scheme.lower() == "bearer":
        return token
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    user, _, _ = decoded.partition(":")
    return user or None

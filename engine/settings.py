"""Settings, read once at the edge (the composition root) and handed in everywhere else.

Every setting has an environment variable ``LIFECYCLE_<NAME>``; a ``.env`` file in the
working directory is read too. Secrets are ``SecretStr`` so they never print.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Published in this repository: fine for trying Lifecycle with console channels, refused
# by the start-up check (engine.bootstrap.check_startup) as soon as a real channel sends.
DEFAULT_SECRET_KEY = "dev-only-change-me"


class Settings(BaseSettings):
    """Every setting, each with its description: the README's settings table is generated
    from this class (``python -m docs.readme``), and a test keeps it in step."""

    model_config = SettingsConfigDict(env_prefix="LIFECYCLE_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default="sqlite:///lifecycle.db",
        description="the database: a SQLite file, or `postgresql://user@host/db`",
    )
    rules_dir: Path = Field(
        default=Path("rules"),
        description="the playbooks, fact catalog and policies (every command reads them "
        "here, `rules check` included)",
    )
    templates_dir: Path = Field(
        default=Path("templates/messages"), description="the message templates"
    )
    outbox_dir: Path = Field(
        default=Path("outbox"), description="where the console channel writes messages"
    )

    # Evaluation
    workers: int = Field(default=0, description="evaluation worker processes; 0 = one per core")
    batch_size: int = Field(default=2000, description="customers evaluated per batch (shard)")
    # durable: durable_rules where it is installed (Python 3.11, 3.12), else the reference
    # evaluator, said at start (engine.evaluation.evaluators.durable_unavailable)
    engine: str = Field(
        default="durable",
        pattern="^(durable|reference)$",
        description="`durable` (durable_rules; on Python 3.13+, where it does not install, "
        "the reference evaluator, said at start) or `reference` (the pure-Python evaluator)",
    )
    rules_reload_s: float = Field(
        default=30.0,
        gt=0,
        description="seconds between reloads of the rule files by `run` and `serve` "
        "(the last good rules stay when a reload fails)",
    )

    # Running past one machine (engine.runners): the inline runner does the work in the
    # scheduler's process; the dramatiq runner has `lifecycle run` plan and enqueue only,
    # and `lifecycle worker` processes do the work.
    runner: str = Field(
        default="inline",
        pattern="^(inline|dramatiq)$",
        description="`inline` (the work runs in `lifecycle run`) or `dramatiq` (`run` "
        "plans and enqueues, `lifecycle worker` processes do the work; needs PostgreSQL and "
        "LIFECYCLE_BROKER_URL)",
    )
    broker_url: str | None = Field(
        default=None,
        pattern="^(amqp|amqps|redis|rediss)://",
        description="the Dramatiq broker: `amqp://guest:guest@127.0.0.1:5672/` (RabbitMQ) or "
        "`redis://127.0.0.1:6379/0`",
    )
    queue_prefix: str = Field(
        default="lifecycle",
        pattern="^[a-z][a-z0-9_]{0,30}$",
        description="the Dramatiq queues are `<prefix>-evaluate`, `-realtime`, `-dispatch`, "
        "`-sla` (two projects on one broker: two prefixes)",
    )
    rate_limit_url: str | None = Field(
        default=None,
        pattern="^(redis|rediss)://",
        description="the Redis that holds the provider rate limits across workers (unset: "
        "the broker's when it is Redis)",
    )
    email_per_second: int = Field(
        default=0,
        ge=0,
        description="emails handed to the provider per second, across every worker (0: no limit)",
    )
    sms_per_second: int = Field(
        default=0,
        ge=0,
        description="SMS handed to the provider per second, across every "
        "worker (Twilio's per-number MPS; 0: no limit)",
    )
    realtime_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="seconds between evaluations of newly arrived events by `run` (the "
        "real-time path; the minute's tick and the full sweep stay the safety net)",
    )
    worker_threads: int = Field(
        default=2, ge=1, le=64, description="tasks a `lifecycle worker` process runs at once"
    )

    # Channels: console (the default, no credentials), sendgrid, twilio. None means "not
    # set", which acts as console; the start-up check tells it from an explicit console.
    email_channel: str | None = Field(
        default=None,
        pattern="^(console|sendgrid)$",
        description="`sendgrid`, or `console` on purpose (unset acts as console); with one "
        "real channel the other must be set too",
    )
    sms_channel: str | None = Field(
        default=None,
        pattern="^(console|twilio)$",
        description="`twilio`, or `console` on purpose (unset acts as console)",
    )
    from_email: str = Field(default="hello@lifecycle.example", description="the sender address")
    from_name: str = Field(default="Lifecycle", description="the sender name")
    sendgrid_api_key: SecretStr | None = Field(default=None, description="SendGrid's API key")
    sendgrid_host: str = Field(
        default="https://api.sendgrid.com", description="SendGrid's API (tests: a local fake)"
    )
    sendgrid_webhook_public_key: str | None = Field(
        default=None,
        description="verifies SendGrid's signed Event Webhook (without it the webhook is 503)",
    )
    twilio_account_sid: str | None = Field(default=None, description="Twilio's account SID")
    twilio_auth_token: SecretStr | None = Field(
        default=None, description="Twilio's auth token; also verifies Twilio's webhooks"
    )
    twilio_from_number: str | None = Field(default=None, description="the number SMS come from")
    twilio_base_url: str | None = Field(
        default=None, description="Twilio's API, when not Twilio's own (tests: a local fake)"
    )

    # Dispatch (engine.delivery.dispatch). The lease is real elapsed time, renewed while
    # a batch is sent; an ambiguous message is first looked up at its provider this long
    # after its lease ran out, then every settle_retry seconds, at most settle_per_tick
    # lookups per dispatch tick.
    dispatch_lease_seconds: float = Field(
        default=300,
        gt=0,
        description="how long a dispatcher's claim on a batch lasts (real time, renewed "
        "while the batch is sent); after it, another dispatcher may recover the messages",
    )
    dispatch_send_threads: int = Field(
        default=8, ge=0, le=64, description="provider calls in flight per dispatcher"
    )
    dispatch_settle_grace_seconds: float = Field(
        default=30,
        ge=0,
        description="how long after a lease ran out an ambiguous message is first looked "
        "up at its provider",
    )
    dispatch_settle_retry_seconds: float = Field(
        default=300,
        ge=0,
        description="how often an ambiguous message the provider could not tell about is "
        "looked up again",
    )
    dispatch_settle_per_tick: int = Field(
        default=50, ge=0, description="provider lookups of ambiguous messages per dispatch tick"
    )

    # Web
    public_base_url: str = Field(
        default="http://127.0.0.1:8000",
        description="the URL providers and recipients reach (unsubscribe links, Twilio "
        "signatures); https turns on Secure cookies and HSTS",
    )
    secret_key: SecretStr = Field(
        default=SecretStr(DEFAULT_SECRET_KEY),
        description="signs unsubscribe links and console sessions, keys erased addresses' "
        "digests; refused with a real channel, so set it: "
        '`python -c "import secrets; print(secrets.token_urlsafe(32))"`',
    )
    secret_key_previous: SecretStr | None = Field(
        default=None,
        description="earlier secret keys, comma-separated (`old2,old1`): links signed with "
        "them keep working, erased addresses hashed with them stay suppressed",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="the ingest API's key (Bearer, or the Segment write key as HTTP Basic "
        "user name); unset: the API refuses everything (503)",
    )
    unsubscribe_mailto: str = Field(
        default="unsubscribe@lifecycle.example",
        description="the mailto address in every List-Unsubscribe header",
    )

    # Escalations roster: a YAML file of support leads (name, email, phone, tier);
    # None means support_roster.yaml in the rules directory.
    roster_file: Path | None = Field(
        default=None,
        description="the support roster (who hears of complaint cases); unset: "
        "`support_roster.yaml` in the rules directory",
    )

    # Web console staff accounts (engine.web.auth): comma-separated
    # "name:pbkdf2_sha256$iterations$salt$hash" entries, hashes made with
    # `lifecycle staff add NAME`. Unset: nobody can sign in to the console.
    staff_passwords: SecretStr | None = Field(
        default=None,
        description="console accounts, `name:pbkdf2_sha256$…,…` (make one with `lifecycle "
        "staff add NAME`); unset: nobody can sign in",
    )
    session_hours: int = Field(default=12, ge=1, le=24 * 30, description="console sign-in lifetime")

    # Ingestion
    default_phone_region: str | None = Field(
        default=None,
        description="country of phone numbers written without +, e.g. GB: 07700 900123 "
        "becomes +447700900123 (unset: only international numbers are accepted)",
    )

    create_unknown_customers: bool = Field(
        default=False,
        description="an event (POST /v1/events, Segment track) for a customer id never seen "
        "creates the customer instead of being refused",
    )
    segment_event_types: dict[str, str] = Field(
        default_factory=dict,
        description='Segment event names mapped to event types, as JSON: {"Order Completed": '
        '"order_placed"}; a name not listed becomes its snake_case (order_completed)',
    )

    @field_validator("segment_event_types")
    @classmethod
    def _event_types(cls, value: dict[str, str]) -> dict[str, str]:
        from engine.data.segment import check_event_type_name

        for name, event_type in value.items():
            check_event_type_name(event_type, f"the event type for {name!r}")
        return value

    @field_validator("default_phone_region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        from engine.data.contacts import check_region

        return check_region(value) if value else None

    def secret_keys(self) -> list[str]:
        """Every key that verifies a signed link, oldest first, the current one last (the
        order itsdangerous expects: it signs with the last)."""
        previous = self.secret_key_previous.get_secret_value() if self.secret_key_previous else ""
        earlier = [key.strip() for key in previous.split(",") if key.strip()]
        return [*earlier, self.secret_key.get_secret_value()]

    # Input bounds: larger API bodies are 413, larger values a 422 or an import row error
    max_body_bytes: int = Field(
        default=1_000_000, ge=1024, description="largest ingest API request body (bytes)"
    )
    max_property_bytes: int = Field(
        default=10_000, ge=16, description="largest event property or customer attribute value"
    )
    max_properties_bytes: int = Field(
        default=64_000, ge=16, description="largest properties (or attributes) of one event"
    )
    max_properties: int = Field(default=100, ge=1, description="most keys in properties")

    # Console sign-in: failed attempts per account and per client address in a window
    sign_in_attempts: int = Field(
        default=5, ge=1, description="failed sign-ins per account or address in the window"
    )
    sign_in_window_s: int = Field(default=60, ge=1, description="the sign-in window (seconds)")
    # Concurrent password verifications (PBKDF2 is CPU-bound: a flood waits here)
    sign_in_hash_workers: int = Field(
        default=1, ge=1, description="password checks at once (PBKDF2: a flood waits here)"
    )

    # /docs and /openapi.json for everyone (else: the API key or a signed-in staff member)
    api_docs: bool = Field(
        default=False,
        description="serve `/docs` and `/openapi.json` to everyone (else only to staff and "
        "API-key holders)",
    )

    # Webhook receipts older than this are pruned (SendGrid retries for 24 h, Twilio for
    # seconds: engine.runners.housekeeping)
    webhook_receipt_days: int = Field(
        default=7, ge=2, description="webhook receipts (the replay guard) are kept this long"
    )

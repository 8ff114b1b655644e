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
    model_config = SettingsConfigDict(env_prefix="LIFECYCLE_", env_file=".env", extra="ignore")

    database_url: str = "sqlite:///lifecycle.db"
    rules_dir: Path = Path("rules")
    templates_dir: Path = Path("templates/messages")
    outbox_dir: Path = Path("outbox")

    # Evaluation
    workers: int = Field(default=0, description="evaluation worker processes; 0 = one per core")
    batch_size: int = 2000
    engine: str = Field(default="durable", pattern="^(durable|reference)$")

    # Channels: console (the default, no credentials), sendgrid, twilio. None means "not
    # set", which acts as console; the start-up check tells it from an explicit console.
    email_channel: str | None = Field(default=None, pattern="^(console|sendgrid)$")
    sms_channel: str | None = Field(default=None, pattern="^(console|twilio)$")
    from_email: str = "hello@lifecycle.example"
    from_name: str = "Lifecycle"
    sendgrid_api_key: SecretStr | None = None
    sendgrid_host: str = "https://api.sendgrid.com"
    sendgrid_webhook_public_key: str | None = None
    twilio_account_sid: str | None = None
    twilio_auth_token: SecretStr | None = None
    twilio_from_number: str | None = None
    twilio_base_url: str | None = None

    # Web
    public_base_url: str = "http://127.0.0.1:8000"
    secret_key: SecretStr = SecretStr(DEFAULT_SECRET_KEY)  # signs unsubscribe tokens, sessions
    # Earlier secret keys, comma-separated: unsubscribe links signed with them still work.
    secret_key_previous: SecretStr | None = None
    api_key: SecretStr | None = None
    unsubscribe_mailto: str = "unsubscribe@lifecycle.example"

    # Escalations roster: a YAML file of support leads (name, email, phone, tier);
    # None means support_roster.yaml in the rules directory.
    roster_file: Path | None = None

    # Web console staff accounts (engine.web.auth): comma-separated
    # "name:pbkdf2_sha256$iterations$salt$hash" entries, hashes made with
    # `lifecycle staff add NAME`. Unset: nobody can sign in to the console.
    staff_passwords: SecretStr | None = None
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
    sign_in_attempts: int = Field(default=5, ge=1)
    sign_in_window_s: int = Field(default=60, ge=1)
    # Concurrent password verifications (PBKDF2 is CPU-bound: a flood waits here)
    sign_in_hash_workers: int = Field(default=1, ge=1)

    # /docs and /openapi.json for everyone (else: the API key or a signed-in staff member)
    api_docs: bool = False

    # Webhook receipts older than this are pruned (SendGrid retries for 24 h, Twilio for
    # seconds: engine.runners.housekeeping)
    webhook_receipt_days: int = Field(default=7, ge=2)

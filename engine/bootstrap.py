"""The composition root: the one place that builds the real things from settings.

The CLI, ``scheduler.py``, the web app and the tests all call ``bootstrap``; tests pass
their own pieces (a database URL, an in-memory channel, a fixed clock) instead.
Channel adapters (and so the provider SDKs) are imported only here, and only the ones
the settings ask for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from engine.clock import utcnow
from engine.data.db import make_engine, upgrade
from engine.data.ingest import InputLimits
from engine.delivery.templates import TemplateStore
from engine.errors import ConfigurationError
from engine.playbooks.loader import load_rules
from engine.playbooks.model import RuleSet
from engine.settings import Settings


@dataclass
class App:
    """Everything a command needs, built once."""

    settings: Settings
    db: Engine
    templates: TemplateStore
    clock: Callable[[], datetime] = utcnow
    channels: dict[str, Any] = field(default_factory=dict)
    _rules: RuleSet | None = None

    @property
    def rules(self) -> RuleSet:
        """The rules, loaded on first use; raises RulesInvalid with every problem."""
        if self._rules is None:
            self._rules = load_rules(self.settings.rules_dir, self.settings.templates_dir)
        return self._rules

    def reload_rules(self) -> RuleSet:
        """Load the rules again; on any problem the last good rules stay in force."""
        fresh = load_rules(self.settings.rules_dir, self.settings.templates_dir)
        self._rules = fresh
        self.templates = TemplateStore(Path(self.settings.templates_dir))
        return fresh

    @property
    def input_limits(self) -> InputLimits:
        """The size caps of properties, attributes and import rows, from the settings."""
        s = self.settings
        return InputLimits(
            max_value_bytes=s.max_property_bytes,
            max_total_bytes=s.max_properties_bytes,
            max_keys=s.max_properties,
            max_row_bytes=s.max_body_bytes,
        )

    def workers(self) -> int:
        import os

        return self.settings.workers or os.cpu_count() or 1


def bootstrap(
    settings: Settings | None = None,
    *,
    db: Engine | None = None,
    channels: dict[str, Any] | None = None,
    clock: Callable[[], datetime] | None = None,
    migrate: bool = True,
) -> App:
    settings = settings or Settings()
    engine = db or make_engine(settings.database_url)
    if migrate:
        upgrade(engine)
    app = App(
        settings=settings,
        db=engine,
        templates=TemplateStore(Path(settings.templates_dir)),
        clock=clock or utcnow,
    )
    app.channels = channels if channels is not None else build_channels(settings)
    return app


def build_channels(settings: Settings) -> dict[str, Any]:
    """The email and SMS channels the settings choose (console when nothing is set)."""
    built: dict[str, Any] = {}
    if settings.email_channel == "sendgrid":
        if settings.sendgrid_api_key is None:
            raise ConfigurationError(
                "LIFECYCLE_SENDGRID_API_KEY", "required for the sendgrid channel"
            )
        from channels.sendgrid_email import SendGridEmailChannel

        built["email"] = SendGridEmailChannel(
            api_key=settings.sendgrid_api_key.get_secret_value(),
            from_email=settings.from_email,
            from_name=settings.from_name,
            host=settings.sendgrid_host,
        )
    if settings.sms_channel == "twilio":
        missing = [
            name
            for name, value in (
                ("LIFECYCLE_TWILIO_ACCOUNT_SID", settings.twilio_account_sid),
                ("LIFECYCLE_TWILIO_AUTH_TOKEN", settings.twilio_auth_token),
                ("LIFECYCLE_TWILIO_FROM_NUMBER", settings.twilio_from_number),
            )
            if not value
        ]
        if missing:
            raise ConfigurationError(", ".join(missing), "required for the twilio channel")
        from channels.twilio_sms import TwilioSmsChannel

        assert settings.twilio_account_sid is not None
        assert settings.twilio_auth_token is not None
        built["sms"] = TwilioSmsChannel(
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_auth_token.get_secret_value(),
            from_number=settings.twilio_from_number,
            status_callback_url=f"{settings.public_base_url}/webhooks/twilio/status",
            base_url=settings.twilio_base_url,
        )
    if "email" not in built or "sms" not in built:
        from channels.console import ConsoleChannel

        console = ConsoleChannel(Path(settings.outbox_dir))
        built.setdefault("email", console)
        built.setdefault("sms", console)
    return built

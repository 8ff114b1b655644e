"""The composition root: the one place that builds the real things from settings.

The CLI, ``scheduler.py``, the web app and the tests all call ``bootstrap``; tests pass
their own pieces (a database URL, an in-memory channel, a fixed clock) instead.
Channel adapters (and so the provider SDKs) are imported only here, and only the ones
the settings ask for.

Every command that sends or serves (``run``, ``serve``, ``dispatch``, ``tick``, and a
queue ``worker``) calls ``check_startup(settings, command)`` first: it refuses settings
that would lose messages or let strangers sign unsubscribe links, before anything is
opened.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from engine.clock import utcnow
from engine.data.db import make_engine, upgrade
from engine.data.erasure import ErasedAddresses
from engine.data.ingest import InputLimits
from engine.data.scratch import scratch_copy
from engine.delivery.templates import TemplateStore
from engine.errors import ConfigurationError, StartupRefused
from engine.evaluation.evaluators import durable_unavailable
from engine.playbooks.loader import load_rules
from engine.playbooks.model import RuleSet
from engine.settings import DEFAULT_SECRET_KEY, Settings

MIN_SECRET_KEY_LENGTH = 16
MAKE_A_KEY = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'


@dataclass
class App:
    """Everything a command needs, built once."""

    settings: Settings
    db: Engine
    templates: TemplateStore
    clock: Callable[[], datetime] = utcnow
    channels: dict[str, Any] = field(default_factory=dict)
    throttle: Any = None  # engine.delivery.throttle.Throttle, when rate limits are set
    _rules: RuleSet | None = None

    @property
    def rules(self) -> RuleSet:
        """The rules, loaded on first use; raises RulesInvalid with every problem."""
        if self._rules is None:
            self._rules = self._load_rules()
        return self._rules

    @property
    def loaded_version(self) -> str | None:
        """The version of the rules in force, or None before they are first loaded."""
        return self._rules.version if self._rules is not None else None

    def reload_rules(self) -> RuleSet:
        """Load the rules again; on any problem the last good rules stay in force."""
        fresh = self._load_rules()
        self._rules = fresh
        self.templates = TemplateStore(Path(self.settings.templates_dir))
        return fresh

    def _load_rules(self) -> RuleSet:
        settings = self.settings
        return load_rules(
            settings.rules_dir, settings.templates_dir, roster_file=settings.roster_file
        )

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

    @property
    def erased_addresses(self) -> ErasedAddresses:
        """The digests that keep erased people's addresses suppressed (engine.data.erasure)."""
        return ErasedAddresses(tuple(self.settings.secret_keys()))

    @property
    def phone_region(self) -> str | None:
        """The country of national phone numbers (LIFECYCLE_DEFAULT_PHONE_REGION)."""
        return self.settings.default_phone_region

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
    app.throttle = build_throttle(settings)
    return app


def rate_limit_url(settings: Settings) -> str | None:
    """The Redis of the rate limits: LIFECYCLE_RATE_LIMIT_URL, else a Redis broker's."""
    if settings.rate_limit_url:
        return settings.rate_limit_url
    broker = settings.broker_url or ""
    return broker if broker.startswith(("redis://", "rediss://")) else None


def build_throttle(settings: Settings) -> Any:
    """The provider rate limits (engine.delivery.throttle), or None when none is set: on
    Redis when there is one (every worker shares it), else in this process (the inline
    runner is one process; the start-up check refuses the dramatiq runner without Redis)."""
    rates = {"email": settings.email_per_second, "sms": settings.sms_per_second}
    if not any(rates.values()):
        return None
    try:
        from dramatiq.rate_limits.backends import RedisBackend, StubBackend

        from engine.delivery.throttle import Throttle
    except ImportError as exc:
        raise ConfigurationError(
            "LIFECYCLE_EMAIL_PER_SECOND, LIFECYCLE_SMS_PER_SECOND",
            f"rate limits need Dramatiq ({exc}): pip install 'lifecycle[distributed]'",
        ) from None
    url = rate_limit_url(settings)
    backend = RedisBackend(url=url) if url else StubBackend()
    return Throttle(backend, rates, prefix=settings.queue_prefix)


def distributed_problems(settings: Settings, command: str) -> list[ConfigurationError]:
    """What the dramatiq runner lacks (a broker, PostgreSQL, a shared rate limit store)."""
    if settings.runner != "dramatiq" and command != "worker":
        return []
    problems = []
    if not settings.broker_url:
        problems.append(
            ConfigurationError(
                "LIFECYCLE_BROKER_URL",
                f"required by `lifecycle {command}` with the dramatiq runner: "
                "amqp://guest:guest@127.0.0.1:5672/ (RabbitMQ) or redis://127.0.0.1:6379/0",
            )
        )
    if not settings.database_url.startswith(("postgresql", "postgres:")):
        problems.append(
            ConfigurationError(
                "LIFECYCLE_DATABASE_URL",
                "the dramatiq runner needs PostgreSQL: workers on several machines share "
                "one database, and one scheduler is chosen by its advisory lock",
            )
        )
    if (settings.email_per_second or settings.sms_per_second) and not rate_limit_url(settings):
        problems.append(
            ConfigurationError(
                "LIFECYCLE_RATE_LIMIT_URL",
                "required with rate limits on the dramatiq runner: the limits are held in "
                "Redis across workers (without it each worker would allow the whole rate)",
            )
        )
    try:
        import dramatiq  # noqa: F401
    except ImportError:
        problems.append(
            ConfigurationError(
                "LIFECYCLE_RUNNER",
                "the dramatiq runner needs Dramatiq: pip install 'lifecycle[distributed]'",
            )
        )
    return problems


@contextmanager
def simulation_app(
    settings: Settings, *, work_db: Path | None = None, outbox: Path | None = None
) -> Iterator[App]:
    """The app a simulation runs in: never the configured database, never a real provider.

    The database is a scratch copy of the configured one (engine.data.scratch; ``work_db``
    keeps a SQLite copy there), and email and SMS go to one quiet console channel whose
    files land in ``outbox``, or in a temporary directory removed at the end: whatever
    LIFECYCLE_EMAIL_CHANNEL and LIFECYCLE_SMS_CHANNEL say, nothing leaves this machine.
    """
    scratch_outbox = None
    if outbox is None:
        scratch_outbox = outbox = Path(tempfile.mkdtemp(prefix="lifecycle-outbox-"))
    try:
        with scratch_copy(settings.database_url, keep=work_db) as db:
            copy = settings.model_copy(
                update={
                    "database_url": db.url.render_as_string(hide_password=False),
                    "outbox_dir": outbox,
                    "email_channel": "console",
                    "sms_channel": "console",
                }
            )
            channels = console_channels(outbox, quiet=True)
            yield bootstrap(copy, db=db, channels=channels, migrate=False)
    finally:
        if scratch_outbox is not None:
            shutil.rmtree(scratch_outbox, ignore_errors=True)


def check_startup(settings: Settings, command: str) -> list[str]:
    """The start-up check of a command that sends or serves; returns warnings to log once.

    With a real channel (SendGrid or Twilio) configured, it refuses (StartupRefused, every
    problem at once, each naming its variable):
    - the other channel left unset: its messages would be written to local files and
      recorded as sent; set it to its provider, or to ``console`` on purpose;
    - the published default secret key (current or previous), or a short one: anyone
      could sign unsubscribe links and opt customers out;
    - a real channel without its credentials;
    - the dramatiq runner (and every ``worker``) without a broker, PostgreSQL, or, with
      rate limits, the Redis that holds them across workers.
    With console channels only, the default key is a warning; so is the reference
    evaluator standing in for durable_rules where it is not installed (Python 3.13+).
    """
    problems = [*_channel_pairing_problems(settings), *credential_problems(settings)]
    real = _real_channels(settings)
    key = settings.secret_key.get_secret_value()
    if real:
        problems.extend(_secret_key_problems(settings, real))
    problems.extend(distributed_problems(settings, command))
    if problems:
        raise StartupRefused(command, problems)
    warnings = []
    if key == DEFAULT_SECRET_KEY:
        warnings.append(
            "LIFECYCLE_SECRET_KEY is the published default: fine with console channels, but "
            f"set it before configuring SendGrid or Twilio (make one with: {MAKE_A_KEY})"
        )
    if settings.engine == "durable" and (unavailable := durable_unavailable()) is not None:
        warnings.append(unavailable)
    return warnings


def _real_channels(settings: Settings) -> list[str]:
    real = []
    if settings.email_channel == "sendgrid":
        real.append("LIFECYCLE_EMAIL_CHANNEL=sendgrid")
    if settings.sms_channel == "twilio":
        real.append("LIFECYCLE_SMS_CHANNEL=twilio")
    return real


def _channel_pairing_problems(settings: Settings) -> list[ConfigurationError]:
    problems = []
    if settings.email_channel == "sendgrid" and settings.sms_channel is None:
        problems.append(_unpaired("LIFECYCLE_EMAIL_CHANNEL=sendgrid", "SMS", "twilio"))
    if settings.sms_channel == "twilio" and settings.email_channel is None:
        problems.append(_unpaired("LIFECYCLE_SMS_CHANNEL=twilio", "email", "sendgrid"))
    return problems


def _unpaired(real: str, what: str, provider: str) -> ConfigurationError:
    variable = f"LIFECYCLE_{what.upper()}_CHANNEL"
    return ConfigurationError(
        variable,
        f"not set while {real} is: every {what} would be written to local files and "
        f"recorded as sent; set {variable}={provider}, or {variable}=console to keep "
        f"{what} local on purpose",
    )


def _secret_key_problems(settings: Settings, real: list[str]) -> list[ConfigurationError]:
    because = (
        f"with {' and '.join(real)} it signs the unsubscribe links of real messages, and "
        "anyone who knows the key can opt any customer out"
    )
    key = settings.secret_key.get_secret_value()
    problems = []
    if key == DEFAULT_SECRET_KEY:
        problems.append(
            ConfigurationError(
                "LIFECYCLE_SECRET_KEY",
                f"is the published default; {because}. Make one with: {MAKE_A_KEY}",
            )
        )
    elif len(key) < MIN_SECRET_KEY_LENGTH:
        problems.append(
            ConfigurationError(
                "LIFECYCLE_SECRET_KEY",
                f"is {len(key)} characters, fewer than {MIN_SECRET_KEY_LENGTH}; {because}. "
                f"Make one with: {MAKE_A_KEY}",
            )
        )
    if DEFAULT_SECRET_KEY in settings.secret_keys()[:-1]:
        problems.append(
            ConfigurationError(
                "LIFECYCLE_SECRET_KEY_PREVIOUS",
                f"lists the published default key; {because}. Remove it from the list",
            )
        )
    return problems


def credential_problems(settings: Settings) -> list[ConfigurationError]:
    """What a chosen real channel lacks to send (empty when nothing is missing)."""
    problems = []
    if settings.email_channel == "sendgrid" and not settings.sendgrid_api_key:
        problems.append(
            ConfigurationError("LIFECYCLE_SENDGRID_API_KEY", "required for the sendgrid channel")
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
            problems.append(
                ConfigurationError(", ".join(missing), "required for the twilio channel")
            )
    return problems


def console_channels(outbox: Path, *, quiet: bool = False) -> dict[str, Any]:
    """One console channel for email and SMS: files under ``outbox`` (and a short block on
    stdout unless ``quiet``)."""
    from channels.console import ConsoleChannel

    console = ConsoleChannel(outbox, stream=None) if quiet else ConsoleChannel(outbox)
    return {"email": console, "sms": console}


def build_channels(settings: Settings) -> dict[str, Any]:
    """The email and SMS channels the settings choose (console when nothing is set)."""
    problems = credential_problems(settings)
    if problems:
        raise problems[0]
    built: dict[str, Any] = {}
    if settings.email_channel == "sendgrid":
        assert settings.sendgrid_api_key is not None
        from channels.sendgrid_email import SendGridEmailChannel

        built["email"] = SendGridEmailChannel(
            api_key=settings.sendgrid_api_key.get_secret_value(),
            from_email=settings.from_email,
            from_name=settings.from_name,
            host=settings.sendgrid_host,
        )
    if settings.sms_channel == "twilio":
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
        for name, channel in console_channels(Path(settings.outbox_dir)).items():
            built.setdefault(name, channel)
    return built

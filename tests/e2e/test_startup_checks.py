"""Start-up checks: the commands that send or serve refuse settings that would lose
messages or let strangers sign unsubscribe links, naming the variable, exit 1.

Each command runs as a person runs it (the CLI; `serve` also as a real process).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.bootstrap import check_startup
from engine.cli import app
from engine.errors import StartupRefused
from engine.evaluation.evaluators import durable_unavailable
from engine.settings import DEFAULT_SECRET_KEY, Settings
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES, ROOT
from tests.support.server import free_port, wait_for_json

runner = CliRunner()
GOOD_KEY = "a-secret-key-that-is-long-enough-0123"
SENDGRID = {"LIFECYCLE_EMAIL_CHANNEL": "sendgrid", "LIFECYCLE_SENDGRID_API_KEY": "SG.test"}
TWILIO = {
    "LIFECYCLE_SMS_CHANNEL": "twilio",
    "LIFECYCLE_TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
    "LIFECYCLE_TWILIO_AUTH_TOKEN": "token",
    "LIFECYCLE_TWILIO_FROM_NUMBER": "+447700900000",
}
# `run` and `serve` would keep running once started; they are asked only to refuse.
COMMANDS = [["run"], ["serve"], ["dispatch"], ["tick"]]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.chdir(tmp_path)  # no .env of the checkout is read
    for name in os.environ:
        if name.startswith("LIFECYCLE_"):
            monkeypatch.delenv(name)
    values = {
        "LIFECYCLE_DATABASE_URL": f"sqlite:///{tmp_path / 'startup.db'}",
        "LIFECYCLE_RULES_DIR": str(FIXTURE_RULES),
        "LIFECYCLE_TEMPLATES_DIR": str(FIXTURE_TEMPLATES),
        "LIFECYCLE_OUTBOX_DIR": str(tmp_path / "outbox"),
        "COLUMNS": "300",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def initialised(env: dict[str, str], sqlite_template: Path) -> dict[str, str]:
    """The environment with its database as `lifecycle init` leaves it (the commands that
    send or serve never create one)."""
    shutil.copy(sqlite_template, env["LIFECYCLE_DATABASE_URL"].removeprefix("sqlite:///"))
    return env


def cli(monkeypatch: pytest.MonkeyPatch, settings: dict[str, str], *args: str) -> tuple[int, str]:
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_real_email_channel_with_sms_left_unset_refuses_to_start(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    code, output = cli(monkeypatch, {**SENDGRID, "LIFECYCLE_SECRET_KEY": GOOD_KEY}, *command)
    assert code == 1, output
    assert f"lifecycle {command[0]} refuses to start" in output
    assert (
        "setting LIFECYCLE_SMS_CHANNEL: not set while LIFECYCLE_EMAIL_CHANNEL=sendgrid is: every "
        "SMS would be written to local files and recorded as sent; set "
        "LIFECYCLE_SMS_CHANNEL=twilio, or LIFECYCLE_SMS_CHANNEL=console to keep SMS local on "
        "purpose"
    ) in output
    assert not (Path(env["LIFECYCLE_DATABASE_URL"].removeprefix("sqlite:///"))).exists()


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_real_sms_channel_with_email_left_unset_refuses_to_start(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    code, output = cli(monkeypatch, {**TWILIO, "LIFECYCLE_SECRET_KEY": GOOD_KEY}, *command)
    assert code == 1, output
    assert "setting LIFECYCLE_EMAIL_CHANNEL: not set while LIFECYCLE_SMS_CHANNEL=twilio" in output


@pytest.mark.parametrize("command", [["dispatch"], ["tick"]], ids=" ".join)
def test_the_other_channel_set_to_console_on_purpose_starts(
    initialised: dict[str, str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    settings = {**SENDGRID, "LIFECYCLE_SMS_CHANNEL": "console", "LIFECYCLE_SECRET_KEY": GOOD_KEY}
    code, output = cli(monkeypatch, settings, *command)
    assert code == 0, output
    assert "refuses" not in output


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_the_default_secret_key_with_a_real_channel_refuses_to_start(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    settings = {**SENDGRID, "LIFECYCLE_SMS_CHANNEL": "console"}
    code, output = cli(monkeypatch, settings, *command)
    assert code == 1, output
    assert (
        "setting LIFECYCLE_SECRET_KEY: is the published default; with "
        "LIFECYCLE_EMAIL_CHANNEL=sendgrid it signs the unsubscribe links of real messages, and "
        "anyone who knows the key can opt any customer out. Make one with: "
        'python -c "import secrets; print(secrets.token_urlsafe(32))"'
    ) in output


def test_with_console_channels_the_default_key_is_one_warning_in_the_log(
    initialised: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="lifecycle"):
        code, output = cli(monkeypatch, {}, "tick", "--now", "2026-03-02T09:00:00")
    assert code == 0, output
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "LIFECYCLE_SECRET_KEY is the published default: fine with console channels, but set it "
        "before configuring SendGrid or Twilio (make one with: "
        'python -c "import secrets; print(secrets.token_urlsafe(32))")',
        *ENGINE_WARNING,
    ]


def test_every_problem_is_named_at_once() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        email_channel="sendgrid",
        secret_key_previous=f"an-older-key-of-ours-0123456789,{DEFAULT_SECRET_KEY}",
    )
    with pytest.raises(StartupRefused) as refused:
        check_startup(settings, "worker")
    assert [p.setting for p in refused.value.problems] == [
        "LIFECYCLE_SMS_CHANNEL",
        "LIFECYCLE_SENDGRID_API_KEY",
        "LIFECYCLE_SECRET_KEY",
        "LIFECYCLE_SECRET_KEY_PREVIOUS",
        # A worker is the dramatiq runner's: it needs a broker and PostgreSQL too.
        "LIFECYCLE_BROKER_URL",
        "LIFECYCLE_DATABASE_URL",
    ]
    assert str(refused.value).splitlines()[0] == "lifecycle worker refuses to start:"
    assert "lists the published default key" in str(refused.value)
    short = Settings(  # type: ignore[call-arg]
        _env_file=None,
        sms_channel="twilio",
        email_channel="console",
        secret_key="short",
        twilio_account_sid="AC1",
        twilio_auth_token="t",
        twilio_from_number="+447700900000",
    )
    with pytest.raises(
        StartupRefused, match="LIFECYCLE_SECRET_KEY: is 5 characters, fewer than 16"
    ):
        check_startup(short, "run")
    assert check_startup(Settings(_env_file=None, secret_key=GOOD_KEY), "run") == ENGINE_WARNING  # type: ignore[call-arg]
    # The reference evaluator chosen on purpose is no news.
    reference = Settings(_env_file=None, secret_key=GOOD_KEY, engine="reference")  # type: ignore[call-arg]
    assert check_startup(reference, "run") == []


# Python 3.13+: the engine "durable" is the reference evaluator, said once at start.
ENGINE_WARNING = [unavailable] if (unavailable := durable_unavailable()) else []


def _serve(env: dict[str, str], extra: dict[str, str], port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from engine.cli import app; app()", "serve", "--port", str(port)],
        cwd=env["LIFECYCLE_OUTBOX_DIR"].removesuffix("/outbox"),
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env, **extra},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_serve_as_a_process_refuses_the_default_key_with_a_real_channel(
    env: dict[str, str],
) -> None:
    server = _serve(env, {**SENDGRID, "LIFECYCLE_SMS_CHANNEL": "console"}, free_port())
    _, stderr = server.communicate(timeout=120)
    assert server.returncode == 1
    assert "lifecycle serve refuses to start" in stderr
    assert "setting LIFECYCLE_SECRET_KEY: is the published default" in stderr


def test_serve_as_a_process_with_console_channels_warns_once_and_serves(
    initialised: dict[str, str],
) -> None:
    port = free_port()
    server = _serve(initialised, {}, port)
    try:
        health = wait_for_json(server, f"http://127.0.0.1:{port}/healthz")
        assert health == {"status": "ok"}
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=60)
    assert stderr.count("LIFECYCLE_SECRET_KEY is the published default") == 1, stderr


def test_the_dramatiq_runner_names_what_it_lacks() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        secret_key=GOOD_KEY,
        runner="dramatiq",
        database_url="sqlite:///lifecycle.db",
        sms_per_second=10,
        broker_url="amqp://guest:guest@127.0.0.1:5672/",
    )
    with pytest.raises(StartupRefused) as refused:
        check_startup(settings, "run")
    assert [p.setting for p in refused.value.problems] == [
        "LIFECYCLE_DATABASE_URL",
        "LIFECYCLE_RATE_LIMIT_URL",
    ]
    assert "the dramatiq runner needs PostgreSQL" in str(refused.value)
    assert "without it each worker would allow the whole rate" in str(refused.value)
    ready = settings.model_copy(
        update={
            "database_url": "postgresql://lifecycle@db.internal/lifecycle",
            "rate_limit_url": "redis://127.0.0.1:6379/0",
        }
    )
    assert check_startup(ready, "run") == ENGINE_WARNING
    # The inline runner needs none of it.
    inline = Settings(_env_file=None, secret_key=GOOD_KEY)  # type: ignore[call-arg]
    assert check_startup(inline, "run") == ENGINE_WARNING

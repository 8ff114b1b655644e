"""`lifecycle worker` refuses to start without what it needs, naming it, before it opens
anything; an unknown queue is named with the queues there are."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES, ROOT

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(FIXTURE_RULES))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    return tmp_path


def test_a_worker_without_broker_or_postgresql_refuses_to_start(env: Path) -> None:
    result = runner.invoke(app, ["worker"])
    assert result.exit_code == 1
    assert "lifecycle worker refuses to start:" in result.output
    assert "setting LIFECYCLE_BROKER_URL: required by `lifecycle worker`" in result.output
    assert "setting LIFECYCLE_DATABASE_URL: the dramatiq runner needs PostgreSQL" in result.output
    assert not (env / "cli.db").exists()  # nothing was opened, nothing created


@pytest.mark.postgres
def test_a_worker_names_an_unknown_queue(
    env: Path, postgres_schema_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", postgres_schema_url)
    monkeypatch.setenv("LIFECYCLE_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
    result = runner.invoke(app, ["worker", "--queues", "lifecycle-evaluate,emails"])
    assert result.exit_code == 1
    assert (
        "--queues: no queue emails; the queues are lifecycle-realtime, lifecycle-dispatch, "
        "lifecycle-sla, lifecycle-evaluate"
    ) in result.output


def _closed_port() -> int:
    """A local port nothing listens on (bound, then let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.postgres
@pytest.mark.parametrize("scheme", ["amqp://guest:secret@127.0.0.1:{}/", "redis://127.0.0.1:{}/0"])
def test_a_worker_whose_broker_does_not_answer_refuses_to_start(
    env: Path, postgres_schema_url: str, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    # Before: the worker started, logged pika tracebacks forever, and its heartbeat
    # showed it alive in `lifecycle status`.
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", postgres_schema_url)
    monkeypatch.setenv("LIFECYCLE_BROKER_URL", scheme.format(_closed_port()))
    result = runner.invoke(app, ["worker", "--migrate"])
    assert result.exit_code == 1, result.output
    assert "the broker at LIFECYCLE_BROKER_URL=" in result.output
    assert "does not answer" in result.output
    assert "secret" not in result.output and "Traceback" not in result.output


@pytest.mark.postgres
def test_status_says_the_broker_does_not_answer(
    env: Path, postgres_schema_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", postgres_schema_url)
    assert runner.invoke(app, ["init"]).exit_code == 0
    monkeypatch.setenv("LIFECYCLE_RUNNER", "dramatiq")
    monkeypatch.setenv("LIFECYCLE_BROKER_URL", f"amqp://guest:guest@127.0.0.1:{_closed_port()}/")
    text = runner.invoke(app, ["status"])
    assert text.exit_code == 0, text.output
    assert "queues: unknown: the broker at LIFECYCLE_BROKER_URL=" in text.output
    data = runner.invoke(app, ["status", "--json"])
    assert data.exit_code == 0, data.output
    report = json.loads(data.output)
    assert report["queues"] is None
    assert "does not answer" in report["broker_unreachable"]

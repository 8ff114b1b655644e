"""`lifecycle status`: the lag of what waits, and the last tick of each kind (inline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES, ROOT

runner = CliRunner()
NOW = "2026-03-02T09:00:00Z"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("LIFECYCLE_OUTBOX_DIR", str(tmp_path / "outbox"))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("LIFECYCLE_RULES_DIR", str(FIXTURE_RULES))
    monkeypatch.setenv("LIFECYCLE_TEMPLATES_DIR", str(FIXTURE_TEMPLATES))
    return tmp_path


def status() -> dict[str, object]:
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def test_status_shows_what_waits_and_the_last_ticks(env: Path) -> None:
    assert runner.invoke(app, ["seed", "--customers", "30", "--now", NOW]).exit_code == 0
    before = status()
    assert before["runner"] == "inline"
    assert before["pending_events"] > 0  # type: ignore[operator]
    assert before["oldest_pending_event_lag_s"] > 0  # type: ignore[operator]
    assert before["last_ticks"]["evaluate"] == {"ran_at": None}  # type: ignore[index]
    assert before["queues"] is None and before["workers"] == []
    assert runner.invoke(app, ["tick", "--now", NOW]).exit_code == 0
    after = status()
    assert after["pending_events"] == 0
    assert after["oldest_pending_event_lag_s"] is None
    ticks = after["last_ticks"]
    assert ticks["full_sweep"] == {"ran_at": "2026-03-02T09:00:00+00:00"}  # type: ignore[index]
    assert ticks["dispatch"] == {"ran_at": "2026-03-02T09:00:00+00:00"}  # type: ignore[index]
    text = runner.invoke(app, ["status"])
    assert text.exit_code == 0
    assert "pending events: 0 (oldest waiting -)" in text.output
    assert "last full_sweep: 2026-03-02T09:00:00+00:00" in text.output

"""`lifecycle run` starts the scheduler, ticks, and stops cleanly on SIGTERM and SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from engine.data.db import make_engine
from engine.data.models import Message, WebhookReceipt
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_ticks_and_stops_cleanly_on_a_signal(tmp_path: Path, signum: signal.Signals) -> None:
    url = f"sqlite:///{tmp_path / 'run.db'}"
    env = {
        **os.environ,
        "LIFECYCLE_DATABASE_URL": url,
        "LIFECYCLE_OUTBOX_DIR": str(tmp_path / "outbox"),
        "LIFECYCLE_RULES_DIR": str(FIXTURE_RULES),
        "LIFECYCLE_TEMPLATES_DIR": str(FIXTURE_TEMPLATES),
    }
    cli = [sys.executable, "-c", "from engine.cli import app; app()"]
    subprocess.run(
        [*cli, "seed", "--customers", "30"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    process = subprocess.Popen(
        [*cli, "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    engine = make_engine(url)
    try:
        deadline = time.monotonic() + 90
        sent = 0
        while time.monotonic() < deadline and not sent:  # wait for real work, not a timer
            time.sleep(0.5)
            with Session(engine) as session:
                sent = (
                    session.scalar(
                        select(func.count()).select_from(Message).where(Message.status == "sent")
                    )
                    or 0
                )
        assert sent > 0, "the scheduler sent nothing within 90 s"
        process.send_signal(signum)
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
        engine.dispose()
    assert process.returncode == 0, output
    assert f"received {signum.name}: stopping after the running ticks finish" in output
    assert output.rstrip().endswith("stopped cleanly")


def test_run_prunes_old_webhook_receipts_in_its_housekeeping_job(tmp_path: Path) -> None:
    """The periodic job of issue 10 point 14: `lifecycle run` itself prunes receipts past
    LIFECYCLE_WEBHOOK_RECEIPT_DAYS (a `tick` does too; a scheduler without the job never)."""
    url = f"sqlite:///{tmp_path / 'run.db'}"
    env = {
        **os.environ,
        "LIFECYCLE_DATABASE_URL": url,
        "LIFECYCLE_OUTBOX_DIR": str(tmp_path / "outbox"),
        "LIFECYCLE_RULES_DIR": str(FIXTURE_RULES),
        "LIFECYCLE_TEMPLATES_DIR": str(FIXTURE_TEMPLATES),
    }
    cli = [sys.executable, "-c", "from engine.cli import app; app()"]
    subprocess.run([*cli, "init"], cwd=ROOT, env=env, check=True, capture_output=True)
    engine = make_engine(url)
    real_now = datetime.now(UTC)
    with Session(engine) as session:
        for key, age in (("old", timedelta(days=30)), ("recent", timedelta(hours=1))):
            session.add(
                WebhookReceipt(provider="sendgrid", event_key=key, received_at=real_now - age)
            )
        session.commit()
    process = subprocess.Popen(
        [*cli, "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        kept: list[str] = ["old", "recent"]
        while time.monotonic() < deadline and "old" in kept and process.poll() is None:
            time.sleep(0.5)
            with Session(engine) as session:
                kept = sorted(session.scalars(select(WebhookReceipt.event_key)))
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
        engine.dispose()
    assert kept == ["recent"], output
    assert "housekeeping: pruned 1 webhook receipts" in output
    assert process.returncode == 0, output

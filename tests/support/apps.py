"""The app over a test database and a fixture project, with one in-memory channel for
email and SMS (what the journey tests read back as "sent")."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import Engine

from channels.memory import MemoryChannel
from engine.bootstrap import App, bootstrap
from engine.settings import Settings


def fixture_app(
    db: Engine,
    db_url: str,
    outbox: Path,
    rules_dir: Path,
    templates_dir: Path,
    channel: MemoryChannel | None = None,
) -> App:
    settings = Settings(
        database_url=db_url,
        rules_dir=rules_dir,
        templates_dir=templates_dir,
        outbox_dir=outbox,
    )
    memory = channel if channel is not None else MemoryChannel()
    return bootstrap(settings, db=db, channels={"email": memory, "sms": memory}, migrate=False)

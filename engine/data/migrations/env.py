"""Alembic environment: the engine comes from engine.data.db (config.attributes) or the env URL."""

from __future__ import annotations

import os

from alembic import context
from sqlmodel import SQLModel

from engine.data import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from engine.data.db import make_engine

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        engine = make_engine(os.environ.get("LIFECYCLE_DATABASE_URL", "sqlite:///lifecycle.db"))
    with engine.begin() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        context.run_migrations()


run_migrations_online()

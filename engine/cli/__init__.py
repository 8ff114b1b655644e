"""The ``lifecycle`` command line: one thin module per group of commands.

Every command builds the app through ``engine.bootstrap`` and calls the engine's
functions; formatting the answer is all a command does itself.
"""

from __future__ import annotations

from engine.cli import (  # noqa: F401
    customers,
    data,
    escalations,
    evaluate,
    explain,
    messages,
    report,
    rules,
    rules_tools,
    running,
    staff,
    workers,
)
from engine.cli.common import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console script entry
    app()

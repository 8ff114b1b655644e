"""The `lifecycle` command line as a real process, for tests that must see exactly what a
marketer's terminal shows (no in-process runner, no shared state)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.paths import ROOT


def rules_check(rules: Path, templates: Path) -> subprocess.CompletedProcess[str]:
    """``lifecycle rules check RULES --templates TEMPLATES``, wide enough that no line wraps."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from engine.cli import app; app()",
            "rules",
            "check",
            str(rules),
            "--templates",
            str(templates),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"COLUMNS": "300", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )

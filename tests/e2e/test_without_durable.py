"""Python 3.13 has no durable-rules (it does not build there). This machine's Python has it,
so the test hides it from a real `lifecycle` process the way a 3.13 install lacks it, and
runs a new project end to end on the reference evaluator, which every command names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

# An import of durable_rules_engine raises ImportError, as on a Python it was not installed on.
WITHOUT_DURABLE = (
    "import sys; sys.modules['durable_rules_engine'] = None; from engine.cli import app; app()"
)


def lifecycle(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LIFECYCLE_DATABASE_URL": f"sqlite:///{cwd / 'lifecycle.db'}"}
    for name in ("LIFECYCLE_RULES_DIR", "LIFECYCLE_TEMPLATES_DIR", "LIFECYCLE_ENGINE"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_DURABLE, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_new_project_runs_on_the_reference_evaluator_and_says_so(tmp_path: Path) -> None:
    assert lifecycle(tmp_path, "new", "shop").returncode == 0
    project = tmp_path / "shop"
    said = "durable_rules is not available on Python"
    for command in (["init"], ["rules", "check"]):
        done = lifecycle(project, *command)
        assert done.returncode == 0, done.stderr
        words = " ".join(done.stdout.split())  # the line is wrapped to the terminal
        assert said in words and "the reference evaluator is used" in words
    assert lifecycle(project, "seed", "--customers", "200").returncode == 0
    evaluated = lifecycle(project, "evaluate")
    assert evaluated.returncode == 0, evaluated.stderr
    assert said in " ".join(evaluated.stdout.split())
    ticked = lifecycle(project, "tick")
    assert ticked.returncode == 0, ticked.stderr
    enrolled = re.search(r"(\d+) enrolled", ticked.stdout)
    assert enrolled is not None and int(enrolled.group(1)) > 0, ticked.stdout

"""The shipped playbooks pass their own playbook tests (rules/tests/*.yaml), run as a
marketer runs them: `lifecycle rules test` as a process, from the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.paths import ROOT, SHIPPED_RULES

SHIPPED_PLAYBOOKS = (
    "complaint_escalation",
    "loyalty_reward",
    "re_engagement",
    "referral_ask",
    "welcome_series",
)


def test_every_shipped_playbook_has_tests() -> None:
    tests = {p.stem for p in (SHIPPED_RULES / "tests").glob("*.yaml")}
    assert tests == set(SHIPPED_PLAYBOOKS)


def test_the_shipped_playbook_tests_pass(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from engine.cli import app; app()", "rules", "test"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        # A database URL that must never be made: each case has a scratch database.
        env={
            "PATH": "/usr/bin:/bin",
            "COLUMNS": "300",
            "LIFECYCLE_DATABASE_URL": f"sqlite:///{tmp_path / 'never.db'}",
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    assert " in 5 files: " in result.stdout and " passed, 0 failed" in result.stdout
    assert not (tmp_path / "never.db").exists()


def test_the_readme_example_case_passes(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("```yaml\n# rules/tests/loyalty_reward.yaml\n") + len("```yaml\n")
    example = tmp_path / "example.yaml"
    example.write_text(readme[start : readme.index("```", start)])
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from engine.cli import app; app()",
            "rules",
            "test",
            str(example),
            "--rules",
            str(SHIPPED_RULES),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "300"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 case in 1 file: 1 passed, 0 failed" in result.stdout

"""The shipped rules/ and templates/messages/ are the marketers' files: tested as examples.

They must pass `lifecycle rules check`, run as a user runs it; nothing here depends on
what the playbooks say, so a marketer's edit never breaks a test unless it breaks the
rules.
"""

from __future__ import annotations

import subprocess
import sys

from tests.support.paths import ROOT


def test_the_shipped_rules_pass_rules_check() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from engine.cli import app; app()", "rules", "check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "playbooks ok" in result.stdout

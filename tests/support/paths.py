"""Where the tests find their rule files and templates.

Engine tests run on fixture playbooks written for the tests (``tests/fixtures/playbooks``),
so a marketer's edit of the shipped ``rules/`` never breaks an engine test. The shipped
files are tested as examples only: they pass ``rules check`` and their own playbook tests.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_RULES = ROOT / "tests" / "fixtures" / "playbooks" / "rules"
FIXTURE_TEMPLATES = ROOT / "tests" / "fixtures" / "playbooks" / "templates"
SHIPPED_RULES = ROOT / "rules"
SHIPPED_TEMPLATES = ROOT / "templates" / "messages"

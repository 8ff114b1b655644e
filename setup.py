"""Build hook: the wheel carries the example project that `lifecycle new` writes.

The top-level ``rules/`` and ``templates/messages/`` are the one source of the example
playbooks and their templates (marketers edit them there). When a wheel is built, they
are copied into the package as ``engine/examples/project/``; nothing is duplicated in git.
Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
EXAMPLE = {"rules": HERE / "rules", "templates/messages": HERE / "templates" / "messages"}


class BuildPyWithExamples(build_py):
    """build_py, then the example project into the build tree (a source checkout, where an
    editable install runs, finds the top-level directories themselves)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "engine" / "examples" / "project"
        for name, source in EXAMPLE.items():
            if not source.is_dir():
                raise SystemExit(f"cannot build the wheel: {source} is missing")
            shutil.rmtree(target / name, ignore_errors=True)
            shutil.copytree(
                source, target / name, ignore=shutil.ignore_patterns(".*", "__pycache__")
            )


setup(cmdclass={"build_py": BuildPyWithExamples})

"""Editing copies of rule files in tests, and finding where a text sits in one."""

from __future__ import annotations

from pathlib import Path


def edit(path: Path, old: str, new: str) -> None:
    """Replace the first ``old`` in the file with ``new``; ``old`` must be there."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def line_col(path: Path, needle: str) -> tuple[int, int]:
    """The 1-based line and column of the first ``needle`` in the file."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number, line.index(needle) + 1
    raise AssertionError(needle)

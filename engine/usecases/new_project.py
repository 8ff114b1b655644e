"""`lifecycle new DIR`: a working project to start from, the way `django-admin startproject`
gives one: the example playbooks in ``rules/`` and their templates in
``templates/messages/``."""

from __future__ import annotations

import shutil
from pathlib import Path

from engine.errors import WouldOverwrite
from engine.examples import example_project


def write_new_project(directory: Path) -> list[Path]:
    """Copy the example project into ``directory`` (made if missing); returns the files
    written. Refuses (WouldOverwrite, nothing written) when any of them already exists."""
    files = example_project().files()
    existing = [str(relative) for _, relative in files if (directory / relative).exists()]
    if existing:
        raise WouldOverwrite(str(directory), existing)
    written = []
    for source, relative in files:
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(target)
    return written

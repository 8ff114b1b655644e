"""The rules to compare against (`lifecycle rules diff --against`): a directory, or the
rules directory as of a git revision.

A revision is read with ``git archive REV -- <rules dir>`` into a temporary directory
that is removed afterwards; the working copy and the repository are only read. Every
failure is a RulesRevisionError saying which part failed: no git, not a git checkout, an
unknown revision, a revision without the rules directory.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import RulesRevisionError

GIT_TIMEOUT_S = 60


@contextmanager
def rules_at(against: str, rules_dir: Path) -> Iterator[Path]:
    """The directory holding the rules ``against`` names: itself when it is a directory,
    else ``rules_dir`` as of the git revision ``against``."""
    if Path(against).is_dir():
        yield Path(against)
        return
    top = _toplevel(against, rules_dir)
    try:
        inside = rules_dir.resolve().relative_to(top)
    except ValueError:
        raise RulesRevisionError(
            against, f"{rules_dir} is not inside the git checkout {top}"
        ) from None
    commit = _git(against, top, "rev-parse", "--verify", "--quiet", f"{against}^{{commit}}")
    if commit.returncode != 0:
        raise RulesRevisionError(against, f"no such directory, and no such git revision in {top}")
    archive = _git(against, top, "archive", "--format=tar", against, "--", inside.as_posix())
    if archive.returncode != 0:
        raise RulesRevisionError(
            against, f"revision {against} has no {inside.as_posix()}/ directory"
        )
    workdir = Path(tempfile.mkdtemp(prefix="lifecycle-rules-"))
    try:
        _extract(archive.stdout, workdir)
        yield workdir / inside
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _extract(archive: bytes, workdir: Path) -> None:
    """The regular files of a tar archive into ``workdir``, none outside it (written one
    by one: tarfile's extraction filters need Python 3.11.4 or later)."""
    root = workdir.resolve()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        for member in tar.getmembers():
            target = (workdir / member.name).resolve()
            if not member.isfile() or not target.is_relative_to(root):
                continue  # directories are made below; links and odd paths are not rules
            source = tar.extractfile(member)
            if source is None:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read())


def _toplevel(against: str, rules_dir: Path) -> Path:
    if not rules_dir.is_dir():
        raise RulesRevisionError(against, f"the rules directory {rules_dir} does not exist")
    found = _git(against, rules_dir, "rev-parse", "--show-toplevel")
    if found.returncode != 0:
        raise RulesRevisionError(
            against,
            f"no such directory, and {rules_dir} is not in a git checkout to read a revision from",
        )
    return Path(found.stdout.decode().strip()).resolve()


def _git(against: str, where: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            ["git", "-C", str(where), *args],
            capture_output=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        raise RulesRevisionError(
            against, "no such directory, and git is not installed to read a revision"
        ) from None
    except subprocess.TimeoutExpired:
        raise RulesRevisionError(against, f"git did not answer within {GIT_TIMEOUT_S}s") from None

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
        with tarfile.open(fileobj=io.BytesIO(archive.stdout), mode="r:") as tar:
            tar.extractall(workdir, filter="data")
        yield workdir / inside
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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

"""What the benchmark cases share: the memory sampler, the databases they run on, paths.

Every database a case uses is its own: a SQLite file in a temporary folder, or a schema
of its own on the local PostgreSQL server; both are removed at the end of a run.
"""

from __future__ import annotations

import resource
import socket
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The engine's cases run on the tests' fixture playbooks, so that the figures of two runs
# compare whatever the marketers did to the shipped rules in between.
RULES = ROOT / "tests" / "fixtures" / "playbooks" / "rules"
TEMPLATES = ROOT / "tests" / "fixtures" / "playbooks" / "templates"
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


class _TreeSampler:
    """Samples the resident memory of this process and all its descendants (forkserver
    workers are grandchildren, which ``RUSAGE_CHILDREN`` never sees) and keeps the peak."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, tree_rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(max(self.peak, tree_rss_mb()), 1)


def tree_rss_mb() -> float:
    import os

    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/statm") as statm:
                rss[int(name)] = int(statm.read().split()[1]) * page
            parents[int(name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    me = os.getpid()
    tree = {me}
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                changed = True
    return sum(rss.get(pid, 0) for pid in tree) / 2**20


SAMPLER: _TreeSampler | None = None


def start_sampling() -> None:
    global SAMPLER
    SAMPLER = _TreeSampler()


def peak_mb() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = SAMPLER.stop() if SAMPLER is not None else own
    return {"peak_mb": round(own, 1), "peak_total_mb": max(round(own, 1), total)}


def fresh_postgres(url: str) -> str:
    """A schema of its own on the server, so the bench never touches other data."""
    from sqlalchemy import create_engine, text

    from engine.data.db import normalize_url

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with create_engine(normalize_url(url)).begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


def database(kind: str, workdir: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}"
    return fresh_postgres("postgresql://postgres@127.0.0.1:5432/test")


def drop_database(kind: str, url: str, workdir: Path) -> None:
    """Leave nothing behind: the SQLite file's folder, or the PostgreSQL schema."""
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    if kind == "postgres":
        from sqlalchemy import create_engine, text

        from engine.data.db import normalize_url

        schema = url.rsplit("%3D", 1)[1]
        with create_engine(normalize_url(url.split("?", 1)[0])).begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def free_port() -> int:

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int) -> None:

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the fake provider did not start on port {port}")

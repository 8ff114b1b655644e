"""A small cluster of real processes for the distributed runner's tests and `make chaos`:
`lifecycle worker` and `lifecycle run --runner dramatiq` subprocesses over one PostgreSQL
schema and the local RabbitMQ, each logging to its own file; SIGKILL on request.

The brokers must answer: .ci/run starts RabbitMQ and Redis when they do not, so a test
that finds one missing fails, naming it, instead of skipping.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine, text

from engine.delivery.outbound import body_digest

ROOT = Path(__file__).resolve().parents[2]
LIFECYCLE = [sys.executable, "-c", "from engine.cli import app; app(prog_name='lifecycle')"]
RABBITMQ_URL = os.environ.get("LIFECYCLE_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("LIFECYCLE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def answering(url: str, timeout: float = 2.0) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout):
            return True
    except OSError:
        return False


def broker_problem(url: str, what: str) -> str | None:
    """Why the tests cannot use this broker (None: it answers)."""
    if answering(url):
        return None
    return (
        f"{what} is not answering at {url}; .ci/run starts it (see there), or set "
        f"LIFECYCLE_TEST_{what.upper()}_URL"
    )


def delete_queues(url: str, queues: list[str]) -> None:
    """Remove a test's RabbitMQ queues (with Dramatiq's delay and dead-letter queues)."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for queue in queues:
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                channel.queue_delete(name)
    finally:
        connection.close()


@dataclass
class Cluster:
    """Worker and scheduler processes sharing ``env``; logs under ``logs``."""

    env: Mapping[str, str]
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [*LIFECYCLE, *args],
            cwd=ROOT,
            env=dict(self.env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def worker(self, name: str, threads: int = 2) -> subprocess.Popen[bytes]:
        return self.start(name, "worker", "--threads", str(threads))

    def scheduler(self, name: str) -> subprocess.Popen[bytes]:
        return self.start(name, "run", "--runner", "dramatiq")

    def kill(self, name: str) -> None:
        """SIGKILL: no handler runs, nothing is acknowledged or cleaned up."""
        process = self.processes[name]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_log(self, name: str, needle: str, timeout: float) -> float:
        """Seconds until ``needle`` appears in the process's log; fails after ``timeout``."""
        started = time.monotonic()
        while needle not in self.log(name):
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{name} never logged {needle!r}:\n{self.log(name)[-3000:]}")
            process = self.processes[name]
            if process.poll() is not None:
                raise AssertionError(
                    f"{name} exited {process.returncode}:\n{self.log(name)[-3000:]}"
                )
            time.sleep(0.05)
        return time.monotonic() - started

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        for name, process in self.processes.items():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            del name


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, every: float = 0.1
) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - started


def tick_progress(db: Engine, tick_id: str) -> tuple[int, int, bool]:
    """(tasks done, tasks, complete) of one tick."""
    with db.connect() as connection:
        done = connection.execute(
            text("SELECT COUNT(done_at), COUNT(*) FROM tick_tasks WHERE tick_id = :id"),
            {"id": tick_id},
        ).one()
        completed = connection.execute(
            text("SELECT completed_at FROM ticks WHERE id = :id"), {"id": tick_id}
        ).scalar()
    return int(done[0]), int(done[1]), completed is not None


def message_statuses(db: Engine) -> Counter[str]:
    with db.connect() as connection:
        return Counter(
            dict(
                connection.execute(
                    text("SELECT status, COUNT(*) FROM messages GROUP BY status")
                ).all()
            )  # type: ignore[arg-type]
        )


def receipts(fake: Any, db: Engine) -> dict[str, Any]:
    """What the fake provider received, matched to the outbox: each message id's receipt
    count (SendGrid by our custom arg, Twilio by recipient and body digest), the
    receipts matching no message, and the messages sent that the provider never had."""
    with db.connect() as connection:
        rows = connection.execute(
            text("SELECT id, channel, status, to_address, body_digest FROM messages")
        ).all()
    by_sms = {(r.to_address, r.body_digest): r.id for r in rows if r.channel == "sms"}
    counts: Counter[str] = Counter()
    unmatched = 0
    for email in fake.sent_emails():
        if email.message_id:
            counts[email.message_id] += 1
        else:
            unmatched += 1
    for sms in fake.sent_sms():
        message_id = by_sms.get((sms.to, body_digest(sms.body)))
        if message_id is None:
            unmatched += 1
        else:
            counts[message_id] += 1
    sent_states = {"sent", "delivered"}
    lost = [r.id for r in rows if r.status in sent_states and counts[r.id] == 0]
    never_received_ambiguous = [r.id for r in rows if r.status == "ambiguous" and counts[r.id] == 0]
    received_ambiguous = [r.id for r in rows if r.status == "ambiguous" and counts[r.id] > 0]
    return {
        "received": sum(counts.values()),
        "duplicates": sum(n - 1 for n in counts.values() if n > 1),
        "unmatched": unmatched,
        "lost": len(lost),
        "ambiguous_never_received": len(never_received_ambiguous),
        "ambiguous_received": len(received_ambiguous),
        "sent_rows": sum(1 for r in rows if r.status in sent_states),
    }

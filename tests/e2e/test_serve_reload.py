"""`lifecycle serve` reloads the rule files like the scheduler: a real server process, a
rule file changed under it, the new version in its log and in use; a broken change is
logged with its problems and the last good rules keep serving."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES, ROOT
from tests.support.server import free_port, wait_for_json

API_KEY = "serve-reload-api-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CLICK = {
    "id": "ev-click-1",
    "customer_id": "ann",
    "type": "newsletter_clicked",
    "occurred_at": "2026-03-02T09:00:00Z",
}


class Server:
    """`lifecycle serve` as a process; its log lines are collected as they come."""

    def __init__(self, tmp_path: Path, rules: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            "PATH": os.environ["PATH"],
            "PYTHONPATH": str(ROOT),
            "LIFECYCLE_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
            "LIFECYCLE_RULES_DIR": str(rules),
            "LIFECYCLE_TEMPLATES_DIR": str(FIXTURE_TEMPLATES),
            "LIFECYCLE_OUTBOX_DIR": str(tmp_path / "outbox"),
            "LIFECYCLE_API_KEY": API_KEY,
            "LIFECYCLE_RULES_RELOAD_S": "0.2",
        }
        # serve needs a database made by init (commands that only serve never create one)
        command = [sys.executable, "-c", "from engine.cli import app; app()"]
        subprocess.run([*command, "init"], cwd=tmp_path, env=env, check=True, capture_output=True)
        self.process = subprocess.Popen(
            [*command, "serve"] + ["--port", str(self.port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, what: str, ready: Callable[[], bool], tries: int = 300) -> None:
        """Poll ``ready`` a fifth of a second apart until it holds (the server must live)."""
        for _ in range(tries):
            if ready():
                return
            assert self.process.poll() is None, "\n".join(self.lines)
            time.sleep(0.2)
        raise AssertionError(f"never saw {what}:\n" + "\n".join(self.lines))

    def logged(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._reader.join(timeout=10)


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(FIXTURE_RULES, target)
    return target


@pytest.fixture
def server(tmp_path: Path, rules: Path) -> Iterator[Server]:
    running = Server(tmp_path, rules)
    try:
        wait_for_json(running.process, f"{running.url}/healthz")
        yield running
    finally:
        running.stop()


def version_of(line: str) -> str:
    return line.split("rules reloaded: version ", 1)[1].split()[0]


def test_serve_takes_a_good_rule_change_and_keeps_the_last_good_rules_on_a_bad_one(
    server: Server, rules: Path
) -> None:
    api = httpx.Client(base_url=server.url, headers=AUTH, timeout=10)
    ann = {"id": "ann", "email": "ann@example.com", "email_opt_in": True}
    assert api.post("/v1/customers", json=ann).status_code == 201
    refused = api.post("/v1/events", json=CLICK)
    assert refused.status_code == 422 and "unknown event type" in refused.text

    catalog = rules / "catalog.yaml"
    catalog.write_text(
        catalog.read_text().replace(
            "events:\n", "events:\n  newsletter_clicked:\n    description: A newsletter click.\n"
        )
    )
    server.wait_for("the new event type accepted", lambda: bool(server.logged("rules reloaded")))
    (reloaded,) = server.logged("rules reloaded")
    assert "lifecycle.web" in reloaded and "(was " in reloaded
    assert api.post("/v1/events", json=CLICK).status_code == 201  # the new rules are in use

    welcome = rules / "welcome_series.yaml"
    welcome.write_text(welcome.read_text().replace("orders_count >= 1", "order_count >= 1"))
    server.wait_for("the broken change logged", lambda: bool(server.logged("have problems")))
    (failed,) = server.logged("have problems")
    assert "ERROR lifecycle.web: rule files have problems; keeping the last good rules " in failed
    assert f"(version {version_of(reloaded)})" in failed
    assert any(
        "unknown fact 'order_count' (did you mean 'orders_count'?)" in line for line in server.lines
    )
    # The last good rules keep serving: the event type the good change added still counts.
    second = {**CLICK, "id": "ev-click-2"}
    assert api.post("/v1/events", json=second).status_code == 201
    time.sleep(0.5)  # a few more reloads of the same broken files...
    assert len(server.logged("have problems")) == 1  # ...are not logged again

"""Web test support: an App for the web tests, and uvicorn in a background thread on a
free 127.0.0.1 port.

For browser tests::

    with serve(create_app(app)) as base_url:
        page.goto(f"{base_url}/console")
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import uvicorn

from channels.memory import MemoryChannel
from engine.bootstrap import App, bootstrap
from engine.settings import Settings
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

ROOT = Path(__file__).resolve().parent.parent.parent


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:
        """The test process keeps its own signal handlers (Ctrl-C still stops pytest)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(app: Any, *, startup_timeout_s: float = 10.0) -> Iterator[str]:
    """Serve ``app`` until the block ends; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", access_log=False
    )
    server = _Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_for_json(process: subprocess.Popen[str], url: str, *, tries: int = 300) -> Any:
    """GET ``url`` from a server ``process`` that is starting, once it answers: a refused
    connection is retried (a fifth of a second apart) until the process exits or ``tries``
    have passed."""
    import httpx

    for _ in range(tries):
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}")
        try:
            return httpx.get(url, timeout=5).json()
        except httpx.ConnectError:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.2)  # a pause that ends early if the server exits
    raise AssertionError(f"nothing answered at {url}")


def web_app(
    db_url: str,
    tmp_path: Path,
    now: datetime,
    **settings: Any,
) -> App:
    """An App over ``db_url`` (already migrated) with the real rules and templates, memory
    channels and a clock fixed at ``now``; ``settings`` override Settings fields."""
    values: dict[str, Any] = {
        "database_url": db_url,
        "rules_dir": FIXTURE_RULES,
        "templates_dir": FIXTURE_TEMPLATES,
        "outbox_dir": tmp_path / "outbox",
        "secret_key": "test-secret-key-not-the-default",
        **settings,
    }
    return bootstrap(
        Settings(_env_file=None, **values),  # type: ignore[call-arg]
        channels={"email": MemoryChannel(), "sms": MemoryChannel()},
        clock=lambda: now,
        migrate=False,
    )

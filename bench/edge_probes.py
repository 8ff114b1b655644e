"""Two probes of the HTTP edge, against a real ``lifecycle serve`` on 127.0.0.1.

    python -m bench.edge_probes flood [--attempts 200] [--limit-off]
    python -m bench.edge_probes body [--megabytes 100]

``flood``: /healthz latency (p50, p95) with nothing else going on, then while 20 clients
post wrong passwords (real PBKDF2, 600,000 iterations) as fast as they are answered.
``--limit-off`` raises the sign-in limit out of reach, to measure the hashing pool alone.

``body``: the server's resident memory before and after one authenticated request with a
body of N MB streamed to /v1/events, and the status it got.

``--code DIR`` serves the code in another checkout (to measure before a change). Every
loop is bounded; only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "bench-edge-key"
STAFF = "Flood Target"


def _serve(code: Path, workdir: Path, extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    sys.path.insert(0, str(code))
    from engine.web.auth import hash_password

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
    env.update(
        {
            "PYTHONPATH": str(code),
            "LIFECYCLE_DATABASE_URL": f"sqlite:///{workdir / 'edge.db'}",
            "LIFECYCLE_API_KEY": API_KEY,
            "LIFECYCLE_STAFF_PASSWORDS": f"{STAFF}:{hash_password('the right one')}",
            "LIFECYCLE_SECRET_KEY": "bench-edge-secret",
            "LIFECYCLE_RULES_DIR": str(ROOT / "rules"),
            "LIFECYCLE_TEMPLATES_DIR": str(ROOT / "templates" / "messages"),
            **extra,
        }
    )
    log = (workdir / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-c", "from engine.cli import app; app()", "serve", "--port", str(port)],
        cwd=code,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"serve exited with {server.returncode}: see {workdir / 'serve.log'}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return server, base
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("serve did not start")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return round(int(found.group(1)) / 1024, 1) if found else float("nan")


async def _healthz(base: str, stop: asyncio.Event, samples: int) -> list[float]:
    times: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        while not stop.is_set() and len(times) < samples:
            started = time.perf_counter()
            await http.get("/healthz")
            times.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.02)
    return times


async def _flood_client(base: str, attempts: list[int], statuses: dict[int, int]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        form = await http.get("/console/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert csrf, "no CSRF token on the sign-in page"
        while attempts:
            attempts.pop()
            response = await http.post(
                "/console/login",
                data={"csrf_token": csrf.group(1), "name": STAFF, "password": "wrong"},
            )
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1


async def _flood(base: str, attempts: int) -> dict[str, object]:
    quiet = await _healthz(base, asyncio.Event(), 50)
    stop = asyncio.Event()
    remaining = list(range(attempts))
    statuses: dict[int, int] = {}
    probe = asyncio.create_task(_healthz(base, stop, 10_000))
    started = time.perf_counter()
    await asyncio.gather(*(_flood_client(base, remaining, statuses) for _ in range(20)))
    seconds = time.perf_counter() - started
    stop.set()
    busy = await probe
    return {
        "healthz_quiet_p50_ms": round(statistics.median(quiet), 1),
        "healthz_flood_p50_ms": round(statistics.median(busy), 1),
        "healthz_flood_p95_ms": round(sorted(busy)[int(0.95 * (len(busy) - 1))], 1),
        "healthz_samples_during_flood": len(busy),
        "sign_in_statuses": statuses,
        "flood_seconds": round(seconds, 2),
    }


def _body(base: str, pid: int, megabytes: int) -> dict[str, object]:
    before = _rss_mb(pid)
    chunk = b" " * (1024 * 1024)

    def body():  # type: ignore[no-untyped-def]
        for _ in range(megabytes):
            yield chunk

    try:
        response = httpx.post(
            f"{base}/v1/events",
            content=body(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            timeout=120,
        )
        status: object = response.status_code
    except httpx.HTTPError as exc:  # the server may close the connection after its 413
        status = f"{type(exc).__name__} (connection closed by the server)"
    time.sleep(1)
    return {"status": status, "rss_before_mb": before, "rss_after_mb": _rss_mb(pid)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.edge_probes", description=__doc__)
    parser.add_argument("probe", choices=("flood", "body"))
    parser.add_argument("--attempts", type=int, default=200)
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--limit-off", action="store_true")
    parser.add_argument("--code", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    if not 1 <= args.attempts <= 2_000 or not 1 <= args.megabytes <= 500:
        parser.error("--attempts must be 1-2000 and --megabytes 1-500")
    extra = {"LIFECYCLE_SIGN_IN_ATTEMPTS": "1000000"} if args.limit_off else {}
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        server, base = _serve(args.code.resolve(), Path(tmp), extra)
        try:
            if args.probe == "flood":
                result = asyncio.run(_flood(base, args.attempts))
            else:
                result = _body(base, server.pid, args.megabytes)
        finally:
            server.terminate()
            server.wait(timeout=20)
    print(f"{args.probe} ({args.code}): {result}; load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

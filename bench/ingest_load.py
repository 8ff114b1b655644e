"""Ingest under load: 2,000 API requests from 20 concurrent clients while 3 ticks run.

    python -m bench.ingest_load --database sqlite|postgres [--requests 2000] [--clients 20]

Serves the real app (``lifecycle serve``) with uvicorn in a subprocess over a fresh
database seeded with synthetic customers, drives it with httpx (async, one connection per
client), and meanwhile runs three ``lifecycle tick`` processes, one after another's start.
Prints requests/s and the p50/p95/p99 latency, counts every status, and checks that the
edge held: no 5xx, and no lost event (the events stored afterwards are exactly the ones
answered 2xx). The figures go to ``bench-results/ingest_load.json`` (one entry per
database, with the machine's load average). Only 127.0.0.1 is ever contacted, and every
loop is bounded by the request count and a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.common import database as _database
from bench.common import drop_database as _drop_database

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results" / "ingest_load.json"
API_KEY = "bench-ingest-load-key"
CUSTOMERS = 1_000
TICKS = 3
DEADLINE_S = 600.0  # the whole run, whatever happens


@dataclass
class LoadReport:
    database: str
    requests: int
    clients: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    statuses: dict[str, int]
    server_errors: int
    transport_errors: int
    events_accepted: int
    events_stored: int
    lost_events: int
    ticks: list[dict[str, Any]] = field(default_factory=list)
    load_average: dict[str, list[float]] = field(default_factory=dict)
    measured_at: str = ""


def _environment(url: str, workdir: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("LIFECYCLE_")  # nothing from the caller's own setup
    }
    env.update(
        {
            "LIFECYCLE_DATABASE_URL": url,
            "LIFECYCLE_API_KEY": API_KEY,
            "LIFECYCLE_RULES_DIR": str(ROOT / "rules"),
            "LIFECYCLE_TEMPLATES_DIR": str(ROOT / "templates" / "messages"),
            "LIFECYCLE_OUTBOX_DIR": str(workdir / "outbox"),
            "LIFECYCLE_SECRET_KEY": "bench-secret-not-the-default",
            "LIFECYCLE_WORKERS": "1",
            "COLUMNS": "200",
        }
    )
    return env


def _lifecycle(*args: str) -> list[str]:
    return [sys.executable, "-c", "from engine.cli import app; app()", *args]


def _prepare(url: str, now: datetime) -> list[str]:
    """Migrate and seed the database; returns the customer ids to post events for."""
    from sqlalchemy import select
    from sqlmodel import col

    from engine.data.db import make_engine, upgrade
    from engine.data.models import Customer
    from engine.data.seed import seed

    engine = make_engine(url)
    try:
        upgrade(engine)
        seed(engine, CUSTOMERS, now)
        with engine.connect() as connection:
            return list(connection.scalars(select(col(Customer.id)).order_by(col(Customer.id))))
    finally:
        engine.dispose()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(base: str, server: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"lifecycle serve exited with {server.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("lifecycle serve did not answer /healthz in time")


def _bodies(count: int, customer_ids: list[str], now: datetime) -> list[tuple[str, dict[str, Any]]]:
    """Nine events to one customer update, every event id new."""
    run = uuid.uuid4().hex[:8]
    bodies: list[tuple[str, dict[str, Any]]] = []
    for n in range(count):
        customer = customer_ids[n % len(customer_ids)]
        if n % 10 == 9:
            body = {"id": customer, "attributes": {"plan": "plus" if n % 20 == 9 else "pro"}}
            bodies.append(("/v1/customers", body))
            continue
        kind = "order_placed" if n % 3 == 0 else "site_visit"
        event = {
            "id": f"load-{run}-{n}",
            "customer_id": customer,
            "type": kind,
            "occurred_at": (now - timedelta(seconds=n)).isoformat(),
            "properties": {"amount_cents": 1000 + n} if kind == "order_placed" else {},
        }
        bodies.append(("/v1/events", event))
    return bodies


async def _drive(
    base: str, bodies: list[tuple[str, dict[str, Any]]], clients: int
) -> tuple[list[float], dict[str, int], int, int, float]:
    """Send every body once, ``clients`` at a time; returns latencies (s), statuses,
    transport errors, events answered 2xx, and the wall time."""
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    counters = {"transport": 0, "events_ok": 0}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def client() -> None:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
            while True:
                try:
                    path, body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                started = time.perf_counter()
                try:
                    response = await http.post(path, json=body)
                except httpx.HTTPError:
                    counters["transport"] += 1
                    continue
                latencies.append(time.perf_counter() - started)
                key = str(response.status_code)
                statuses[key] = statuses.get(key, 0) + 1
                if path == "/v1/events" and 200 <= response.status_code < 300:
                    counters["events_ok"] += 1

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), DEADLINE_S)
    return (
        latencies,
        statuses,
        counters["transport"],
        counters["events_ok"],
        (time.perf_counter() - started),
    )


def _count_events(url: str, prefix: str = "load-") -> int:
    from sqlalchemy import func, select
    from sqlmodel import col

    from engine.data.db import make_engine
    from engine.data.models import Event

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            statement = select(func.count()).where(col(Event.id).startswith(prefix))
            return int(connection.scalar(statement) or 0)
    finally:
        engine.dispose()


def _error_lines(lines: list[str]) -> list[str]:
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return errors[-2:] or lines[-3:]


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, round(share * (len(ranked) - 1)))]


def run(database: str, requests: int, clients: int) -> LoadReport:
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    url = _database(database, workdir)
    now = datetime.now(UTC).replace(microsecond=0)
    load = {"before": list(os.getloadavg())}
    server: subprocess.Popen[bytes] | None = None
    ticks: list[tuple[float, subprocess.Popen[bytes]]] = []
    try:
        customer_ids = _prepare(url, now - timedelta(minutes=1))
        env = _environment(url, workdir)
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        with (workdir / "serve.log").open("wb") as log:
            server = subprocess.Popen(
                _lifecycle("serve", "--host", "127.0.0.1", "--port", str(port)),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + DEADLINE_S
        _wait_until_up(base, server, deadline)
        bodies = _bodies(requests, customer_ids, now)

        async def with_ticks() -> tuple[list[float], dict[str, int], int, int, float]:
            driving = asyncio.create_task(_drive(base, bodies, clients))
            for _ in range(TICKS):  # started while the load runs, a moment apart
                await asyncio.sleep(0.5)
                tick = subprocess.Popen(
                    _lifecycle("tick"),
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
                ticks.append((time.perf_counter(), tick))
            return await driving

        latencies, statuses, transport, accepted, seconds = asyncio.run(with_ticks())
        load["during"] = list(os.getloadavg())
        tick_reports = []
        for started, tick in ticks:
            output, _ = tick.communicate(timeout=DEADLINE_S)
            lines = output.decode(errors="replace").strip().splitlines()
            tick_reports.append(
                {
                    "exit": tick.returncode,
                    "seconds": round(time.perf_counter() - started, 2),
                    # A failed tick: the exception's own line, not the traceback's last one.
                    "output": lines[-1:] if tick.returncode == 0 else _error_lines(lines),
                }
            )
        stored = _count_events(url)
        answered = sum(statuses.values())
        return LoadReport(
            database=database,
            requests=answered + transport,
            clients=clients,
            seconds=round(seconds, 2),
            requests_per_s=round(answered / seconds, 1) if seconds else 0.0,
            p50_ms=round(statistics.median(latencies) * 1000, 1) if latencies else 0.0,
            p95_ms=round(_percentile(latencies, 0.95) * 1000, 1),
            p99_ms=round(_percentile(latencies, 0.99) * 1000, 1),
            statuses=dict(sorted(statuses.items())),
            server_errors=sum(n for status, n in statuses.items() if status.startswith("5")),
            transport_errors=transport,
            events_accepted=accepted,
            events_stored=stored,
            lost_events=accepted - stored,
            ticks=tick_reports,
            load_average=load,
            measured_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        )
    finally:
        for _, tick in ticks:
            if tick.poll() is None:
                tick.kill()
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        _drop_database(database, url, workdir)


def _save(report: LoadReport) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    saved: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    saved[report.database] = asdict(report)
    RESULTS.write_text(json.dumps(saved, indent=2) + "\n")


def _print(report: LoadReport) -> None:
    held = report.server_errors == 0 and report.lost_events == 0 and report.transport_errors == 0
    print(
        f"ingest load, {report.database}: {report.requests:,} requests from {report.clients} "
        f"clients in {report.seconds:.2f} s = {report.requests_per_s:,.1f} requests/s; "
        f"p50 {report.p50_ms} ms, p95 {report.p95_ms} ms, p99 {report.p99_ms} ms"
    )
    print(
        f"  statuses {report.statuses}; 5xx {report.server_errors}; transport errors "
        f"{report.transport_errors}; events answered 2xx {report.events_accepted:,}, stored "
        f"{report.events_stored:,}, lost {report.lost_events}"
    )
    for number, tick in enumerate(report.ticks, start=1):
        print(f"  tick {number}: exit {tick['exit']} after {tick['seconds']} s: {tick['output']}")
    print(f"  load average (1, 5, 15 min): {report.load_average}")
    print("  the edge held" if held else "  THE EDGE DID NOT HOLD")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_load", description=__doc__)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 100_000 or not 1 <= args.clients <= 200:
        parser.error("--requests must be 1-100000 and --clients 1-200")
    report = run(args.database, args.requests, args.clients)
    _print(report)
    _save(report)
    held = report.server_errors == 0 and report.lost_events == 0 and report.transport_errors == 0
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())

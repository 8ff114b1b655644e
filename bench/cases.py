"""Benchmark cases. Each runs in a fresh process (``python -m bench.cases NAME ...``) and
prints one JSON object, so peak memory is that case's own (``ru_maxrss`` of the process
and of its worker children)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
BATCH = 2000


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


def peak_mb() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = SAMPLER.stop() if SAMPLER is not None else own
    return {"peak_mb": round(own, 1), "peak_total_mb": max(round(own, 1), total)}


def _rules() -> Any:
    from engine.playbooks.loader import load_rules

    return load_rules(ROOT / "rules", ROOT / "templates" / "messages")


def fact_batches(count: int, rules: Any) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Facts of ``count`` synthetic customers (the seeder's, built by the facts builder),
    generated batch by batch so memory stays flat."""
    from engine.data.facts import build_facts
    from engine.data.seed import generate_customer

    for start in range(1, count + 1, BATCH):
        batch = []
        for number in range(start, min(count, start + BATCH - 1) + 1):
            row = SimpleNamespace(**generate_customer(number, NOW).row)
            batch.append((row.id, build_facts(row, rules.catalog, NOW)))
        yield batch


def case_evaluate(count: int, engine: str, workers: int) -> dict[str, Any]:
    """Evaluation alone: facts generated in this process, evaluated by ``engine``."""
    from engine.evaluation.evaluators import make_evaluator
    from engine.evaluation.workers import evaluate_in_workers

    rules = _rules()
    conditions = rules.conditions()
    generate = 0.0
    evaluate = 0.0
    matched = 0
    started = time.perf_counter()
    if workers == 0:
        evaluator = make_evaluator(conditions, engine)
        batches = fact_batches(count, rules)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            generate += time.perf_counter() - t0
            if batch is None:
                break
            t0 = time.perf_counter()
            for _, fired in evaluator.evaluate_many(batch):
                matched += bool(fired)
            evaluate += time.perf_counter() - t0
        total = time.perf_counter() - started
        return {
            "case": "evaluate",
            "customers": count,
            "engine": engine,
            "workers": 0,
            "seconds": round(evaluate, 2),
            "per_second": round(count / evaluate),
            "generate_seconds": round(generate, 2),
            "wall_seconds": round(total, 2),
            "customers_matching_something": matched,
            **peak_mb(),
        }
    for results in evaluate_in_workers(
        conditions, fact_batches(count, rules), workers=workers, engine=engine
    ):
        matched += sum(1 for _, fired in results if fired)
    total = time.perf_counter() - started
    return {
        "case": "evaluate",
        "customers": count,
        "engine": engine,
        "workers": workers,
        "seconds": round(total, 2),
        "per_second": round(count / total),
        "note": "wall time including fact generation in the parent",
        "customers_matching_something": matched,
        **peak_mb(),
    }


def _app(url: str, channels: dict[str, Any] | None = None, **settings: Any) -> Any:
    from engine.bootstrap import bootstrap
    from engine.settings import Settings

    base = Settings(
        database_url=url,
        rules_dir=ROOT / "rules",
        templates_dir=ROOT / "templates" / "messages",
        outbox_dir=Path(tempfile.mkdtemp(prefix="bench-outbox-")),
        **settings,
    )
    return bootstrap(base, channels=channels)


def _fresh_postgres(url: str) -> str:
    """A schema of its own on the server, so the bench never touches other data."""
    from sqlalchemy import create_engine, text

    from engine.data.db import normalize_url

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with create_engine(normalize_url(url)).begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


def _database(kind: str, workdir: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}"
    return _fresh_postgres("postgresql://postgres@127.0.0.1:5432/test")


def _drop_database(kind: str, url: str, workdir: Path) -> None:
    """Leave nothing behind: the SQLite file's folder, or the PostgreSQL schema."""
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    if kind == "postgres":
        from sqlalchemy import create_engine, text

        from engine.data.db import normalize_url

        schema = url.rsplit("%3D", 1)[1]
        with create_engine(normalize_url(url.split("?", 1)[0])).begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def case_sweep(count: int, database: str, changed: int) -> dict[str, Any]:
    """A full sweep from the database (facts, evaluation, journeys, outbox), twice; then an
    incremental tick after ``changed`` customers got a new event."""
    from sqlmodel import Session

    from engine.data.ingest import EventIn, record_events
    from engine.data.seed import seed
    from engine.runners.ticks import evaluation_tick

    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    url = _database(database, workdir)
    app = _app(url, channels={})
    t0 = time.perf_counter()
    seed(app.db, count, NOW)
    seeded = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = evaluation_tick(app, NOW, full=True)
    first_seconds = time.perf_counter() - t0
    later = NOW + timedelta(hours=6)
    t0 = time.perf_counter()
    evaluation_tick(app, later, full=True)
    second_seconds = time.perf_counter() - t0
    # Incremental: `changed` customers place an order; only they (and due steps) are looked at.
    step = max(1, count // changed)
    ids = [f"seed-{n:08d}" for n in range(1, count + 1, step)][:changed]
    moment = later + timedelta(minutes=30)
    with Session(app.db) as session:
        record_events(
            session,
            [
                EventIn(
                    id=f"bench-{i}",
                    customer_id=cid,
                    type="order_placed",
                    occurred_at=moment,
                    properties={"amount_cents": 2500},
                )
                for i, cid in enumerate(ids)
            ],
            moment,
        )
        session.commit()
    t0 = time.perf_counter()
    incremental = evaluation_tick(app, moment + timedelta(minutes=1))
    incremental_seconds = time.perf_counter() - t0
    j = first.journeys
    app.db.dispose()
    _drop_database(database, url, workdir)
    return {
        "case": "sweep",
        "database": database,
        "customers": count,
        "seed_seconds": round(seeded, 1),
        "first_sweep_seconds": round(first_seconds, 2),
        "first_sweep_per_second": round(count / first_seconds),
        "first_sweep_enrolled": sum(j.enrolled.values()),
        "first_sweep_queued": sum(j.queued.values()),
        "steady_sweep_seconds": round(second_seconds, 2),
        "steady_sweep_per_second": round(count / second_seconds),
        "incremental_changed": len(ids),
        "incremental_customers": incremental.customers,
        "incremental_seconds": round(incremental_seconds, 2),
        **peak_mb(),
    }


def case_dispatch(count: int) -> dict[str, Any]:
    """Dispatch through the real SDKs to the fake provider running in its own process."""
    from sqlmodel import Session

    from engine.data.ingest import CustomerIn, upsert_customer
    from engine.data.models import Message, MessageStatus
    from engine.runners.ticks import dispatch_tick

    port = _free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_provider", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port)
        from tests.support.fake_provider import (
            DEFAULT_SENDGRID_KEY,
            DEFAULT_TWILIO_SID,
            DEFAULT_TWILIO_TOKEN,
        )

        workdir = Path(tempfile.mkdtemp(prefix="bench-"))
        url = f"http://127.0.0.1:{port}"
        app = _app(
            f"sqlite:///{workdir / 'dispatch.db'}",
            email_channel="sendgrid",
            sendgrid_api_key=DEFAULT_SENDGRID_KEY,
            sendgrid_host=url,
            sms_channel="twilio",
            twilio_account_sid=DEFAULT_TWILIO_SID,
            twilio_auth_token=DEFAULT_TWILIO_TOKEN,
            twilio_from_number="+15005550006",
            twilio_base_url=url,
        )
        results: dict[str, Any] = {"case": "dispatch", "messages_per_channel": count}
        for channel, template, playbook in (
            ("email", "welcome", "welcome_series"),
            ("sms", "last_chance", "re_engagement"),
        ):
            with Session(app.db) as session:
                for n in range(count):
                    cid = f"{channel}-{n}"
                    upsert_customer(
                        session,
                        CustomerIn(
                            id=cid,
                            email=f"{cid}@example.com",
                            phone=f"+1555{n:07d}",
                            first_name="Bench",
                            email_opt_in=True,
                            sms_opt_in=True,
                            signed_up_at=NOW,
                        ),
                        NOW,
                    )
                    session.add(
                        Message(
                            id=str(uuid.uuid4()),
                            dedupe_key=f"bench:{cid}",
                            customer_id=cid,
                            playbook=playbook,
                            step_id=template,
                            kind="marketing",
                            channel=channel,
                            template=template,
                            to_address="",
                            context={"event": {}},
                            status=MessageStatus.QUEUED,
                            due_at=NOW,
                            created_at=NOW,
                            updated_at=NOW,
                        )
                    )
                session.commit()
            t0 = time.perf_counter()
            report = dispatch_tick(
                app, NOW + timedelta(hours=4)
            )  # 13:00 London, inside every window
            seconds = time.perf_counter() - t0
            results[channel] = {
                "sent": report.total_sent,
                "seconds": round(seconds, 2),
                "per_second": round(report.total_sent / seconds),
            }
        results.update(peak_mb())
        return results
    finally:
        fake.terminate()
        fake.wait(timeout=10)


def case_render(count: int) -> dict[str, Any]:
    from engine.delivery.templates import TemplateStore, sample_context

    rules = _rules()
    store = TemplateStore(ROOT / "templates" / "messages")
    context = sample_context(rules.catalog.sample_facts())
    context["brand"] = rules.policies.brand
    t0 = time.perf_counter()
    for _ in range(count):
        store.render_email("loyalty_reward", context)
    email_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(count):
        store.render_sms("last_chance", context)
    sms_seconds = time.perf_counter() - t0
    return {
        "case": "render",
        "renders": count,
        "email_per_second": round(count / email_seconds),
        "sms_per_second": round(count / sms_seconds),
        **peak_mb(),
    }


def case_soak(count: int, workers: int) -> dict[str, Any]:
    """``count`` evaluations through durable_rules in worker processes; memory sampled."""
    from engine.evaluation.workers import evaluate_in_workers

    rules = _rules()
    distinct = [row for batch in fact_batches(20_000, rules) for row in batch]

    def batches() -> Iterator[list[tuple[str, dict[str, Any]]]]:
        done = 0
        while done < count:
            size = min(BATCH, count - done)
            start = done % len(distinct)
            chunk = (
                (distinct + distinct)[start : start + size]
                if start + size > len(distinct)
                else distinct[start : start + size]
            )
            yield [(f"{done + i}", facts) for i, (_, facts) in enumerate(chunk)]
            done += size

    samples: list[tuple[int, float]] = []
    evaluated = 0
    t0 = time.perf_counter()
    for results in evaluate_in_workers(rules.conditions(), batches(), workers=workers):
        evaluated += len(results)
        if evaluated % 1_000_000 < BATCH:
            samples.append((evaluated, _workers_rss_mb()))
    seconds = time.perf_counter() - t0
    return {
        "case": "soak",
        "evaluations": evaluated,
        "workers": workers,
        "seconds": round(seconds, 1),
        "per_second": round(evaluated / seconds),
        "worker_rss_mb_by_million": samples,
        **peak_mb(),
    }


def _workers_rss_mb() -> float:
    """Resident memory of this process and its workers now (not the peak)."""
    return round(tree_rss_mb(), 1)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int) -> None:
    import socket

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the fake provider did not start on port {port}")


CASES = {
    "evaluate": lambda a: case_evaluate(int(a[0]), a[1], int(a[2])),
    "sweep": lambda a: case_sweep(int(a[0]), a[1], int(a[2])),
    "dispatch": lambda a: case_dispatch(int(a[0])),
    "render": lambda a: case_render(int(a[0])),
    "soak": lambda a: case_soak(int(a[0]), int(a[1])),
}

if __name__ == "__main__":
    SAMPLER = _TreeSampler()
    print(json.dumps(CASES[sys.argv[1]](sys.argv[2:])))

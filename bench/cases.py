"""Benchmark cases other than the journey core's (bench/journeys.py): evaluation alone,
dispatch through the real SDKs, template rendering, the soak. Each runs in a fresh
process (``python -m bench.cases NAME ...``) and prints one JSON object, so peak memory
is that case's own (the process and all its descendants)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.common import (
    NOW,
    ROOT,
    RULES,
    TEMPLATES,
    free_port,
    peak_mb,
    start_sampling,
    tree_rss_mb,
    wait_for_port,
)

BATCH = 2000


def _rules() -> Any:
    from engine.playbooks.loader import load_rules

    return load_rules(RULES, TEMPLATES)


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
        rules_dir=RULES,
        templates_dir=TEMPLATES,
        outbox_dir=Path(tempfile.mkdtemp(prefix="bench-outbox-")),
        **settings,
    )
    return bootstrap(base, channels=channels)


def case_dispatch(count: int) -> dict[str, Any]:
    """Dispatch through the real SDKs to the fake provider running in its own process."""
    from sqlmodel import Session

    from engine.data.ingest import CustomerIn, upsert_customer
    from engine.data.models import Message, MessageStatus
    from engine.runners.ticks import dispatch_tick

    port = free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_provider", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
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
    store = TemplateStore(TEMPLATES)
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


CASES = {
    "evaluate": lambda a: case_evaluate(int(a[0]), a[1], int(a[2])),
    "dispatch": lambda a: case_dispatch(int(a[0])),
    "render": lambda a: case_render(int(a[0])),
    "soak": lambda a: case_soak(int(a[0]), int(a[1])),
}

if __name__ == "__main__":
    start_sampling()
    print(json.dumps(CASES[sys.argv[1]](sys.argv[2:])))

"""Two evaluators racing over the same 10,000 customers on PostgreSQL write no duplicates."""

from __future__ import annotations

import multiprocessing
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlmodel import Session

from engine.data.db import make_engine
from engine.data.models import Enrollment, Message
from engine.data.seed import seed
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

ROOT = Path(__file__).resolve().parents[2]
CUSTOMERS = 10_000


def _evaluate(
    url: str,
    now_iso: str,
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue,
) -> None:  # type: ignore[name-defined]
    from engine.bootstrap import bootstrap
    from engine.runners.ticks import evaluation_tick
    from engine.settings import Settings

    settings = Settings(database_url=url, rules_dir=FIXTURE_RULES, templates_dir=FIXTURE_TEMPLATES)
    app = bootstrap(settings, channels={}, migrate=False)
    barrier.wait()
    report = evaluation_tick(app, datetime.fromisoformat(now_iso), full=True, workers=0)
    results.put((report.customers, report.journeys.total("queued"), report.journeys.lost_races))


@pytest.mark.postgres
@pytest.mark.slow
def test_two_concurrent_evaluators_write_no_duplicate_messages(
    postgres_schema_url: str, now: datetime
) -> None:
    engine = make_engine(postgres_schema_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "TRUNCATE webhook_receipts, decisions, messages, escalation_history, escalations, enrollments, suppressions, events, customers, engine_state RESTART IDENTITY CASCADE"
            )
        )
    seed(engine, CUSTOMERS, now)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    workers = [
        context.Process(
            target=_evaluate, args=(postgres_schema_url, now.isoformat(), barrier, results)
        )
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert all(customers == CUSTOMERS for customers, _, _ in outcomes), outcomes
    with Session(engine) as session:
        messages = session.scalar(
            select(func.count()).select_from(Message).where(Message.kind != "staff")
        )
        duplicates = session.execute(
            select(
                Message.customer_id,
                Message.playbook,
                Message.step_id,
                Message.channel,
                func.count(),
            )
            .group_by(Message.customer_id, Message.playbook, Message.step_id, Message.channel)
            .having(func.count() > 1)
        ).all()
        double_enrolled = session.execute(
            select(Enrollment.customer_id, Enrollment.playbook, func.count())
            .group_by(Enrollment.customer_id, Enrollment.playbook)
            .having(func.count() > 1)
        ).all()
    assert messages and messages > 1000
    assert duplicates == []
    assert double_enrolled == []
    # Every customer message was queued by exactly one of the two; the other found it
    # done, or lost the race to it and rolled that customer back.
    assert sum(queued for _, queued, _ in outcomes) == messages, outcomes
    assert sum(lost for _, _, lost in outcomes) > 0, outcomes
    engine.dispose()

"""The distributed runner as real processes on PostgreSQL and RabbitMQ: SIGKILL a worker
mid-sweep and another mid-dispatch, kill the scheduler, and count (tests/support/chaos.py;
`make chaos` runs it with 100,000 customers)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text

from engine.data.db import make_engine
from tests.conftest import TABLES
from tests.support.chaos import ChaosConfig, run_chaos
from tests.support.cluster import RABBITMQ_URL, broker_problem

NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)  # 13:00 in London: inside every window


@pytest.fixture
def rabbitmq() -> str:
    problem = broker_problem(RABBITMQ_URL, "RabbitMQ")
    if problem is not None:
        pytest.fail(problem)
    return RABBITMQ_URL


@pytest.mark.postgres
@pytest.mark.slow
def test_killed_workers_and_scheduler_lose_and_double_nothing(
    postgres_schema_url: str, rabbitmq: str, tmp_path: Path
) -> None:
    engine = make_engine(postgres_schema_url)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()
    config = ChaosConfig(
        database_url=postgres_schema_url,
        customers=3000,
        now=NOW,
        work=tmp_path,
        prefix=f"t{uuid.uuid4().hex[:10]}",
        batch_size=250,
        dispatch_kill_after=60,
        timeout_s=240,
    )
    result = run_chaos(config)
    print(f"\nchaos {json.dumps({k: v for k, v in result.items() if 'counts' not in k})}")
    assert result["sweep_counts"] == result["control_counts"]
    assert result["sweep_counts"]["messages"]  # the sweep queued something to dispatch
    assert result["sweep_shards_done_at_kill"] < result["sweep_shards"]  # killed mid-sweep
    assert result["dispatch_killed"]
    assert result["provider_duplicates"] == 0
    assert result["provider_lost"] == 0
    assert result["provider_unmatched"] == 0
    assert result["provider_ambiguous_received"] == 0  # what the provider has is settled
    assert result["standby_took_over_s"] < 10

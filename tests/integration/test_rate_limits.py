"""Provider rate limits held across dispatchers on the real Redis (127.0.0.1:6379): two
throttles with their own connections, as two workers have, share one limit and one pause;
and a dispatcher that meets a 429 pauses the others."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime

import pytest
from dramatiq.rate_limits.backends import RedisBackend
from sqlalchemy import Engine

from channels.memory import MemoryChannel
from engine.delivery.dispatch import DispatchConfig, Dispatcher
from engine.delivery.templates import TemplateStore
from engine.delivery.throttle import Throttle
from engine.errors import TransientChannelError
from engine.playbooks.loader import load_rules
from tests.support.cluster import REDIS_URL, broker_problem
from tests.support.outbox import queue_for_many
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES


@pytest.fixture
def prefix() -> Iterator[str]:
    problem = broker_problem(REDIS_URL, "Redis")
    if problem is not None:
        pytest.fail(problem)
    yield f"test-{uuid.uuid4().hex[:12]}"


def worker_throttle(prefix: str, limit: int) -> Throttle:
    return Throttle(RedisBackend(url=REDIS_URL), {"sms": limit}, prefix=prefix)


def test_two_workers_share_one_limit(prefix: str) -> None:
    landed: Counter[int] = Counter()
    lock = threading.Lock()

    def send(throttle: Throttle, count: int) -> None:
        for _ in range(count):
            throttle.acquire("sms")
            with lock:
                landed[int(time.time())] += 1

    workers = [
        threading.Thread(target=send, args=(worker_throttle(prefix, 5), 8)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert sum(landed.values()) == 16
    assert max(landed.values()) <= 5  # together, never more than the one limit a second


def test_a_429_at_one_worker_pauses_the_other(prefix: str) -> None:
    first, second = worker_throttle(prefix, 100), worker_throttle(prefix, 100)
    started = time.time()
    first.cool_down("sms", 1.5)
    limiter = second.limiter("sms")
    assert limiter is not None
    with limiter.acquire(raise_on_failure=False) as acquired:
        assert not acquired
    second.acquire("sms")
    assert int(time.time()) > int(started + 1.5)


def test_a_dispatcher_that_meets_a_429_waits_out_the_pause(db: Engine, now: datetime) -> None:
    from dramatiq.rate_limits.backends import StubBackend

    backend = StubBackend()
    channel = MemoryChannel()
    channel.fail_next(
        1, TransientChannelError("memory", "too many requests", status=429, retry_after=2)
    )
    queue_for_many(db, 3, ("sms",), now)
    throttle = Throttle(backend, {"sms": 100})
    rules = load_rules(FIXTURE_RULES, FIXTURE_TEMPLATES)
    dispatcher = Dispatcher(
        db,
        rules,
        TemplateStore(FIXTURE_TEMPLATES),
        {"email": channel, "sms": channel},
        DispatchConfig(send_threads=0),
        throttle=throttle,
    )
    try:
        report = dispatcher.run_once(now)
    finally:
        dispatcher.close()
    assert report.retried == 1  # the message that met the 429 goes back to the queue
    assert report.total_sent == 2
    # The two after it waited out the pause (nothing else in this test fills a bucket).
    assert throttle.waited > 0

"""Provider rate limits (engine.delivery.throttle) on Dramatiq's in-memory StubBackend:
never more than the limit in one second's bucket, and a 429 pauses everyone sharing it.
(tests/integration/test_rate_limits.py runs the same over Redis, across "workers".)"""

from __future__ import annotations

import time
from collections import Counter

from dramatiq.rate_limits.backends import StubBackend

from engine.delivery.throttle import Throttle


def buckets_of(throttle: Throttle, channel: str, count: int) -> Counter[int]:
    """Acquire ``count`` slots one by one; how many landed in each wall-clock second."""
    landed: Counter[int] = Counter()
    for _ in range(count):
        throttle.acquire(channel)
        landed[int(time.time())] += 1
    return landed


def test_no_second_holds_more_than_the_limit() -> None:
    throttle = Throttle(StubBackend(), {"sms": 4})
    landed = buckets_of(throttle, "sms", 10)
    assert sum(landed.values()) == 10
    assert max(landed.values()) <= 4
    assert len(landed) >= 3  # 10 at 4 a second spans at least three seconds
    assert throttle.waited > 0


def test_a_channel_without_a_limit_never_waits() -> None:
    throttle = Throttle(StubBackend(), {"sms": 4, "email": 0})
    assert throttle.acquire("email", 1000) == 0.0
    assert throttle.limiter("email") is None


def test_a_429_pauses_every_sender_sharing_the_backend() -> None:
    backend = StubBackend()
    first, second = Throttle(backend, {"email": 50}), Throttle(backend, {"email": 50})
    started = time.time()
    first.cool_down("email", 1.2)
    limiter = second.limiter("email")
    assert limiter is not None
    with limiter.acquire(raise_on_failure=False) as acquired:
        assert not acquired  # the other sender's bucket is full too
    second.acquire("email")
    # The pause fills every bucket up to the one holding started + 1.2 s: the slot is taken
    # in a later second.
    assert int(time.time()) > int(started + 1.2)
    assert second.waited > 0

"""Provider rate limits held across every dispatcher: messages per second per channel, and
one shared pause when the provider answers 429.

The limit is Dramatiq's ``BucketRateLimiter`` (one-second buckets) over a rate limiter
backend: Redis for workers on several machines (engine.bootstrap builds it from
LIFECYCLE_RATE_LIMIT_URL), Dramatiq's in-memory ``StubBackend`` for one process. Each
message takes one slot of its channel's bucket before its provider call; a dispatcher
that finds the bucket full waits for the next one.

A 429 from the provider means every sender is too fast, not only the one that got it:
``cool_down`` fills the channel's buckets for the provider's Retry-After (or a default),
so every dispatcher on every worker waits, instead of each discovering the limit alone.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from dramatiq.rate_limits import BucketRateLimiter

log = logging.getLogger(__name__)

BUCKET_MS = 1000
DEFAULT_PAUSE_S = 1.0  # a 429 without Retry-After
MAX_PAUSE_S = 60.0


class Throttle:
    """Per-channel messages per second (``rates``: channel -> limit; 0 or absent: none)."""

    def __init__(
        self,
        backend: Any,
        rates: Mapping[str, int],
        *,
        prefix: str = "lifecycle",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.backend = backend
        self.rates = {channel: limit for channel, limit in rates.items() if limit > 0}
        self.prefix = prefix
        self.sleep = sleep
        self._limiters = {
            channel: BucketRateLimiter(backend, self._key(channel), limit=limit, bucket=BUCKET_MS)
            for channel, limit in self.rates.items()
        }
        self._lock = threading.Lock()
        self.waited = 0.0  # seconds spent waiting for a slot (for reports and tests)

    def limiter(self, channel: str) -> BucketRateLimiter | None:
        return self._limiters.get(channel)

    def _key(self, channel: str) -> str:
        return f"{self.prefix}:rate:{channel}"

    def acquire(self, channel: str, count: int = 1) -> float:
        """Take ``count`` slots of ``channel``'s limit, waiting as long as it takes;
        returns the seconds waited."""
        limiter = self._limiters.get(channel)
        if limiter is None:
            return 0.0
        waited = 0.0
        for _ in range(count):
            while True:
                with limiter.acquire(raise_on_failure=False) as acquired:
                    if acquired:
                        break
                pause = self._to_next_bucket()
                self.sleep(pause)
                waited += pause
        with self._lock:
            self.waited += waited
        return waited

    def cool_down(self, channel: str, seconds: float | None) -> None:
        """The provider said 429: fill the channel's buckets for ``seconds`` (its
        Retry-After; a second when it gave none), for every dispatcher sharing them."""
        limit = self.rates.get(channel)
        if limit is None:
            return
        pause = min(MAX_PAUSE_S, max(seconds or DEFAULT_PAUSE_S, 0.001))
        now_ms = int(time.time() * 1000)  # the limiter's clock: its buckets are wall-clock seconds
        first = now_ms - now_ms % BUCKET_MS
        last = now_ms + int(pause * 1000)
        for bucket in range(first, last + 1, BUCKET_MS):
            key = f"{self._key(channel)}@{bucket}"
            ttl = bucket + BUCKET_MS - now_ms
            # A bucket nobody used yet is created full; one in use is topped up to full.
            if not self.backend.add(key, limit, ttl=ttl):
                self.backend.incr(key, limit, maximum=math.inf, ttl=ttl)
        log.warning("%s: provider rate limit (429): every sender pauses %.1fs", channel, pause)

    def _to_next_bucket(self) -> float:
        now_ms = time.time() * 1000
        return max(0.001, (BUCKET_MS - now_ms % BUCKET_MS) / 1000)

"""A channel that keeps what it sent in a list: the dispatcher's tests use it as the fake.

It can be told to fail the next *n* sends with a given error, to rehearse retries and
suppression without a provider::

    channel = MemoryChannel()
    channel.fail_next(2, TransientChannelError("memory", "rate limited", status=429))
    channel.send(email)   # raises the 429, twice; the third send succeeds

It accepts emails and SMS alike and offers ``send_batch`` (one outcome per message), so
both of the dispatcher's paths can be tested against it, and ``lookup`` (what it holds
for a message id), so settlement can. It is safe to share between threads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from engine.delivery.outbound import Attempt, Email, ProviderRecord, Sent, Sms
from engine.errors import ChannelError


@dataclass(frozen=True)
class Delivery:
    """One message the memory channel accepted, with the outcome it returned."""

    message: Email | Sms
    sent: Sent


class MemoryChannel:
    """Records every message it accepts; fails on request."""

    name = "memory"
    provider = "memory"
    max_batch = 1000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deliveries: list[Delivery] = []
        self._failures: list[ChannelError] = []
        self._attempts = 0

    def __repr__(self) -> str:
        return f"MemoryChannel(sent={len(self._deliveries)}, failing_next={len(self._failures)})"

    def fail_next(self, n: int, error: ChannelError) -> None:
        """The next ``n`` sends raise ``error`` (added after any failures already queued)."""
        if n < 0:
            raise ValueError(f"cannot fail the next {n} sends")
        with self._lock:
            self._failures.extend([error] * n)

    def send(self, message: Email | Sms) -> Sent:
        with self._lock:
            self._attempts += 1
            if self._failures:
                # The same instance may be queued n times: drop the last raise's traceback.
                raise self._failures.pop(0).with_traceback(None)
            sent = Sent(provider_id=f"memory-{len(self._deliveries) + 1}", provider=self.provider)
            self._deliveries.append(Delivery(message, sent))
            return sent

    def send_batch(self, messages: Sequence[Email]) -> list[Sent | ChannelError]:
        outcomes: list[Sent | ChannelError] = []
        for message in messages:
            try:
                outcomes.append(self.send(message))
            except ChannelError as error:
                outcomes.append(error)
        return outcomes

    def lookup(self, attempt: Attempt) -> list[ProviderRecord]:
        """What it holds for the attempt's message id (settlement)."""
        return [
            ProviderRecord(d.sent.provider_id, "sent", matches=True)
            for d in self.deliveries
            if d.message.message_id == attempt.message_id
        ]

    @property
    def attempts(self) -> int:
        """Every call to ``send``, failed ones included."""
        return self._attempts

    @property
    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    @property
    def sent(self) -> list[Email | Sms]:
        """The messages accepted so far, in order."""
        return [d.message for d in self.deliveries]

    def emails(self) -> list[Email]:
        return [m for m in self.sent if isinstance(m, Email)]

    def sms(self) -> list[Sms]:
        return [m for m in self.sent if isinstance(m, Sms)]

    def clear(self) -> None:
        """Forget what was sent and any failures still queued."""
        with self._lock:
            self._deliveries.clear()
            self._failures.clear()
            self._attempts = 0

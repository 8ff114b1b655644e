"""The one small protocol every channel speaks, and the messages it carries (the port
that channel adapters in channels/ implement; the domain owns it).

A channel is ``send(message) -> Sent``: it either hands the message to a provider and
returns the provider's id, or raises a ``ChannelError`` (``TransientChannelError`` when
trying again can help, ``PermanentChannelError`` when it cannot). SDK exceptions never
cross this edge; each adapter translates them with ``raise ... from exc``.

Channels that can carry many messages in one request (SendGrid) also offer
``send_batch(messages) -> list[Sent | ChannelError]``, one outcome per message in the
order given. ``send_many`` picks ``send_batch`` when a channel has it and falls back to
one ``send`` per message otherwise, so a dispatcher needs only one code path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from engine.errors import ChannelError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _no_line_breaks(what: str, value: str) -> None:
    # A CR or LF in a header would let a template inject headers of its own.
    _require("\r" not in value and "\n" not in value, f"{what} must not contain a line break")


@dataclass(frozen=True)
class Email:
    """A rendered email, ready to send.

    ``message_id`` is our outbox id; providers carry it back in their events (SendGrid as
    the custom arg ``lifecycle_message_id``). ``headers`` are set by the caller
    (``List-Unsubscribe`` and ``List-Unsubscribe-Post`` for marketing mail); ``category`` is
    the playbook id, sent as a SendGrid category.
    """

    message_id: str
    to: str
    subject: str
    html: str
    text: str
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    category: str = ""

    def __post_init__(self) -> None:
        _require(bool(self.message_id), "an email needs a message_id")
        _require("@" in self.to, f"email {self.message_id}: {self.to!r} is not an email address")
        _no_line_breaks(f"email {self.message_id}: the recipient", self.to)
        _require(bool(self.subject.strip()), f"email {self.message_id}: the subject is empty")
        _no_line_breaks(f"email {self.message_id}: the subject", self.subject)
        _require(
            bool(self.html.strip() or self.text.strip()),
            f"email {self.message_id}: both the HTML and the text body are empty",
        )
        for name, value in self.headers.items():
            _require(
                bool(name) and ":" not in name and name.isascii(),
                f"email {self.message_id}: {name!r} is not a header name",
            )
            _no_line_breaks(f"email {self.message_id}: header {name}", name + str(value))
        # Frozen means frozen: keep a private copy the caller cannot change afterwards.
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))


@dataclass(frozen=True)
class Sms:
    """A rendered text message; ``to`` is an E.164 number such as ``+15558675310``.

    The number is not checked here: the provider's verdict (Twilio 21211) is what tells
    the dispatcher to suppress it.
    """

    message_id: str
    to: str
    body: str

    def __post_init__(self) -> None:
        _require(bool(self.message_id), "an SMS needs a message_id")
        _require(bool(self.to.strip()), f"sms {self.message_id}: the recipient is empty")
        _require(bool(self.body.strip()), f"sms {self.message_id}: the body is empty")


Message = Email | Sms


@dataclass(frozen=True)
class Sent:
    """A provider accepted the message; ``provider_id`` is its id for it (for webhooks)."""

    provider_id: str
    provider: str  # "sendgrid" | "twilio" | "console" | "memory"


@runtime_checkable
class Channel(Protocol):
    """Sends one rendered message.

    ``name`` is what the channel carries: ``"email"`` or ``"sms"`` for the provider
    channels; the console and memory channels carry both and are named after themselves.
    ``send`` raises ``TransientChannelError`` or ``PermanentChannelError`` and nothing else
    on purpose; it never returns ``None``.
    """

    name: str

    def send(self, message: Email | Sms) -> Sent: ...


@runtime_checkable
class BatchChannel(Channel, Protocol):
    """A channel that can hand many emails to its provider in few requests."""

    def send_batch(self, messages: Sequence[Email]) -> list[Sent | ChannelError]: ...


def send_many(channel: Channel, messages: Sequence[Email | Sms]) -> list[Sent | ChannelError]:
    """Send every message; one outcome per message, in order, never an exception per message.

    Uses ``send_batch`` when the channel has it and every message is an email.
    """
    if isinstance(channel, BatchChannel) and all(isinstance(m, Email) for m in messages):
        return channel.send_batch(messages)  # type: ignore[arg-type]
    outcomes: list[Sent | ChannelError] = []
    for message in messages:
        try:
            outcomes.append(channel.send(message))
        except ChannelError as error:
            outcomes.append(error)
    return outcomes


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value (delay-seconds or an HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None

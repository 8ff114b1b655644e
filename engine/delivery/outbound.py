"""The one small protocol every channel speaks, and the messages it carries (the port
that channel adapters in channels/ implement; the domain owns it).

A channel is ``send(message) -> Sent``: it either hands the message to a provider and
returns the provider's id, or raises a ``ChannelError`` (``TransientChannelError`` when
trying again can help, ``PermanentChannelError`` when it cannot). SDK exceptions never
cross this edge; each adapter translates them with ``raise ... from exc``.

Channels that can carry many messages in one request (SendGrid) also offer
``send_batch(messages) -> list[Sent | ChannelError]``, one outcome per message in the
order given, and ``max_batch``. ``units`` splits messages into the provider calls they
will make (emails of identical content share one, up to ``max_batch``; everything else
goes one by one), ``send_unit`` makes one such call, and ``send_many`` does both: a
dispatcher needs only one code path.

``send_unit`` and ``send_many`` never raise for a message: a ``ChannelError`` is that
message's outcome, and so is any other exception a channel lets out (a bug in an
adapter), logged with its traceback and turned into a ``TransientChannelError`` that
names it, so one broken message never takes the rest of a batch with it.

Channels whose provider can be asked what it received (Twilio) are ``LookupChannel``s:
``lookup(attempt)`` lists the provider's records that could be that attempt, which is
how the dispatcher settles a message left ambiguous by a crash.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import Literal, Protocol, runtime_checkable

from engine.errors import ChannelError, TransientChannelError

log = logging.getLogger(__name__)


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
    """A channel that can hand many emails of identical content to its provider in one
    request (at most ``max_batch`` of them)."""

    max_batch: int

    def send_batch(self, messages: Sequence[Email]) -> list[Sent | ChannelError]: ...


def content_key(email: Email) -> Hashable:
    """What emails must share to travel in one batched request."""
    return (email.subject, email.html, email.text, email.category)


def body_digest(body: str) -> str:
    """The SHA-256 of a text, as stored with an SMS before its provider call."""
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def units(channel: Channel, messages: Sequence[Email | Sms]) -> list[list[int]]:
    """The provider calls ``messages`` make, as lists of their indexes, in order.

    A batch channel carries identical emails together (up to its ``max_batch``);
    everything else is one call per message.
    """
    if not isinstance(channel, BatchChannel):
        return [[i] for i in range(len(messages))]
    groups: dict[Hashable, list[int]] = {}
    singles: list[list[int]] = []
    for index, message in enumerate(messages):
        if isinstance(message, Email):
            groups.setdefault(content_key(message), []).append(index)
        else:
            singles.append([index])
    batched = [
        indexes[start : start + channel.max_batch]
        for indexes in groups.values()
        for start in range(0, len(indexes), max(1, channel.max_batch))
    ]
    return sorted(batched + singles, key=lambda unit: unit[0])


ProviderCall = Callable[[], list[Sent | ChannelError]]


@runtime_checkable
class PreparingChannel(Channel, Protocol):
    """A channel that can build a provider call's request ahead of making it."""

    def prepare(self, messages: Sequence[Email | Sms]) -> ProviderCall:
        """Build the request for one call (see ``units``) and return what makes it: one
        outcome per message, in order, raising nothing for a message."""
        ...


def prepare_unit(channel: Channel, messages: Sequence[Email | Sms]) -> ProviderCall:
    """The provider call ``send_unit`` would make, its request built now where the
    channel can (``PreparingChannel``), so whoever marks the messages attempted does so
    with nothing left to do but the call. Never raises for a message (``send_unit``)."""
    if not isinstance(channel, PreparingChannel):
        return lambda: send_unit(channel, messages)
    try:
        call = channel.prepare(messages)
    except Exception as exc:
        bug = _channel_bug(channel, exc, "preparing " + _ids(messages))
        return lambda: [bug] * len(messages)

    def guarded() -> list[Sent | ChannelError]:
        try:
            outcomes = list(call())
            if len(outcomes) != len(messages):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(messages)} messages")
            return outcomes
        except Exception as exc:
            bug = _channel_bug(channel, exc, "sending " + _ids(messages))
            return [bug] * len(messages)

    return guarded


def send_unit(channel: Channel, messages: Sequence[Email | Sms]) -> list[Sent | ChannelError]:
    """Make one provider call (see ``units``); one outcome per message, in order.

    Never raises for a message: anything other than a ``ChannelError`` is a bug in the
    channel, logged with its traceback and reported as a transient error naming it.
    """
    try:
        if len(messages) > 1 and isinstance(channel, BatchChannel):
            emails = [m for m in messages if isinstance(m, Email)]
            if len(emails) == len(messages):
                outcomes = channel.send_batch(emails)
                if len(outcomes) != len(messages):
                    raise RuntimeError(
                        f"send_batch returned {len(outcomes)} outcomes for {len(messages)} emails"
                    )
                return list(outcomes)
        results: list[Sent | ChannelError] = []
        for message in messages:
            try:
                results.append(channel.send(message))
            except ChannelError as error:
                results.append(error)
        return results
    except Exception as exc:  # a bug in the channel: visible, and confined to its messages
        bug = _channel_bug(channel, exc, "sending " + _ids(messages))
        return [bug] * len(messages)


def _ids(messages: Sequence[Email | Sms], shown: int = 5) -> str:
    ids = ", ".join(m.message_id for m in messages[:shown])
    return ids + (f" and {len(messages) - shown} more" if len(messages) > shown else "")


def _channel_bug(channel: Channel, exc: Exception, doing: str) -> TransientChannelError:
    """Log an exception a channel should never have let out, with its traceback at ERROR
    (a bug must be visible), and turn it into a transient error that names it."""
    log.error("channel %s raised %s %s", channel.name, type(exc).__name__, doing, exc_info=exc)
    provider = str(getattr(channel, "provider", channel.name))
    return TransientChannelError(provider, f"the channel raised {type(exc).__name__}: {exc}")


def send_many(channel: Channel, messages: Sequence[Email | Sms]) -> list[Sent | ChannelError]:
    """Send every message; one outcome per message, in order, never an exception per message.

    Identical emails share a request when the channel batches (``units``).
    """
    outcomes: list[Sent | ChannelError | None] = [None] * len(messages)
    for unit in units(channel, messages):
        for index, outcome in zip(
            unit, send_unit(channel, [messages[i] for i in unit]), strict=True
        ):
            outcomes[index] = outcome
    return [o for o in outcomes if o is not None]


# ── settlement: asking a provider what it received ─────────────────────────────────


@dataclass(frozen=True)
class Attempt:
    """A provider call whose answer we never recorded (the dispatcher died in it).

    ``attempted_at`` is when it was made (lease clock); ``body_digest`` is the SHA-256 of
    the SMS body handed over; ``provider_id`` is known only when a webhook told us.
    """

    message_id: str
    to: str
    attempted_at: datetime
    body_digest: str | None = None
    provider_id: str | None = None


@dataclass(frozen=True)
class ProviderRecord:
    """One message the provider holds that could be an ``Attempt``.

    ``matches`` says its content is what we sent (same body digest, or our own id);
    a record that does not match may still be ours (a provider can rewrite a body) or
    another sender's, so it proves nothing either way. ``status`` is the provider's
    verdict folded to ours; ``detail`` is the provider's own words for it.
    """

    provider_id: str
    status: Literal["sent", "delivered", "failed"]
    matches: bool
    detail: str = ""


@runtime_checkable
class LookupChannel(Channel, Protocol):
    """A channel whose provider can be asked what it received."""

    def lookup(self, attempt: Attempt) -> list[ProviderRecord]:
        """Every record the provider holds for the attempt's recipient from the attempt's
        time on (an empty list: it provably never received it). Raises ``ChannelError``
        when the provider cannot tell now (unreachable, or too many records to read)."""
        ...


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


def lookup_safely(channel: LookupChannel, attempt: Attempt) -> list[ProviderRecord] | ChannelError:
    """``channel.lookup(attempt)``, with its ``ChannelError`` as the answer, and any other
    exception (a bug in the channel) logged with its traceback and answered as a
    transient error naming it."""
    try:
        return list(channel.lookup(attempt))
    except ChannelError as error:
        return error
    except Exception as exc:
        return _channel_bug(channel, exc, f"looking up {attempt.message_id}")

"""Channel adapters: one small protocol (``engine.delivery.outbound``), several implementations.

``ConsoleChannel`` (the default, no credentials) and ``MemoryChannel`` (the tests' fake)
are light; ``SendGridEmailChannel`` and ``TwilioSmsChannel`` import their SDKs, so they
are loaded only when first named here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from channels.console import ConsoleChannel
from channels.memory import MemoryChannel
from engine.delivery.outbound import BatchChannel, Channel, Email, Message, Sent, Sms, send_many

if TYPE_CHECKING:
    from channels.sendgrid_email import SendGridEmailChannel
    from channels.twilio_sms import TwilioSmsChannel

__all__ = [
    "BatchChannel",
    "Channel",
    "ConsoleChannel",
    "Email",
    "MemoryChannel",
    "Message",
    "SendGridEmailChannel",
    "Sent",
    "Sms",
    "TwilioSmsChannel",
    "send_many",
]

_LAZY = {
    "SendGridEmailChannel": "channels.sendgrid_email",
    "TwilioSmsChannel": "channels.twilio_sms",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'channels' has no attribute {name!r}")

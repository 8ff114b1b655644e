"""The states of the engine's state machines, by name (stored as their text values).

Plain enums with no I/O: the journey planner decides in them, the SQL model stores them.
"""

from __future__ import annotations

from enum import StrEnum


class EnrollmentStatus(StrEnum):
    ACTIVE = "active"  # waiting for its next step (or, with no step left, for its last message)
    COMPLETED = "completed"  # every step done, its last message due
    CONVERTED = "converted"  # the playbook's goal was reached: pending steps cancelled
    EXITED = "exited"  # no longer eligible (the playbook's exit condition): steps cancelled
    DROPPED = "dropped"  # a frequency cap dropped its message (when_capped: drop): it ends
    CANCELLED = "cancelled"  # ended by a rules change: its playbook or its step removed


class MessageStatus(StrEnum):
    QUEUED = "queued"  # due at due_at, waiting for a dispatcher
    SENDING = "sending"  # claimed by a dispatcher; engine.delivery.dispatch: recovery rule
    SENT = "sent"  # the provider accepted it
    DELIVERED = "delivered"
    FAILED = "failed"  # permanent error, or retries used up
    BOUNCED = "bounced"
    CANCELLED = "cancelled"  # journey exited, consent withdrawn before sending
    AMBIGUOUS = "ambiguous"  # a dispatcher died in its provider call: settlement decides


class EscalationStatus(StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"
    REOPENED = "reopened"

"""Settlement's verdict on an ambiguous message, from the provider's answer (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime

from engine.data.models import Message, MessageStatus
from engine.delivery.outbound import ProviderRecord
from engine.delivery.outbox import Found
from engine.delivery.settlement import Missing, Unknown, verdict
from engine.errors import TransientChannelError

NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)
AMBIGUOUS = Message(
    id="m-1",
    dedupe_key="k",
    channel="sms",
    template="last_chance",
    to_address="+447700900123",
    status=MessageStatus.AMBIGUOUS,
    due_at=NOW,
    created_at=NOW,
    updated_at=NOW,
)


def nobody(provider_id: str) -> bool:
    return False


def test_a_matching_record_nobody_owns_settles_the_message_with_it() -> None:
    records = [
        ProviderRecord("SM-other", "sent", matches=False, detail="queued"),
        ProviderRecord("SM-ours", "delivered", matches=True, detail="delivered"),
    ]
    found = verdict(AMBIGUOUS, "twilio", records, nobody)
    assert found == Found(
        AMBIGUOUS,
        "twilio",
        "SM-ours",
        MessageStatus.DELIVERED,
        "settled: twilio has it as SM-ours (delivered)",
    )


def test_no_record_at_all_means_it_never_arrived() -> None:
    assert verdict(AMBIGUOUS, "twilio", [], nobody) == Missing(
        AMBIGUOUS, "settled: twilio never received it; queued to send again"
    )


def test_records_that_belong_to_other_messages_prove_nothing_was_received() -> None:
    records = [ProviderRecord("SM-taken", "sent", matches=True)]
    result = verdict(AMBIGUOUS, "twilio", records, lambda pid: pid == "SM-taken")
    assert isinstance(result, Missing)


def test_a_record_that_does_not_match_leaves_the_message_for_a_person() -> None:
    records = [ProviderRecord("SM-rewritten", "sent", matches=False, detail="sent")]
    assert verdict(AMBIGUOUS, "twilio", records, nobody) == Unknown(
        AMBIGUOUS,
        "settlement: twilio holds 1 message(s) to +447700900123 from that time that do not "
        "match what we sent; retry by hand if it did not arrive",
    )


def test_a_provider_that_cannot_answer_leaves_it_ambiguous_with_the_reason() -> None:
    error = TransientChannelError("twilio", "cannot reach https://api.twilio.com: refused")
    assert verdict(AMBIGUOUS, "twilio", error, nobody) == Unknown(
        AMBIGUOUS,
        "settlement: twilio: cannot reach https://api.twilio.com: refused; asking again later",
    )

"""When an event sent again under a known id is the same event: the rule, as plain values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from engine.data.ingest import EventIn, EventPayload, payload_differences, same_json

AT = datetime(2026, 3, 1, 10, tzinfo=UTC)


def payload(**changes: object) -> EventPayload:
    values: dict[str, object] = {
        "id": "e1",
        "customer_id": "c1",
        "type": "order_placed",
        "occurred_at": AT,
        "properties": {"amount_cents": 4999, "items": [{"sku": "A", "qty": 2}]},
        **changes,
    }
    return EventPayload.of(EventIn.model_validate(values))


def test_the_same_event_spelt_otherwise_is_identical() -> None:
    same_instant = AT.astimezone(timezone(timedelta(hours=-5)))
    again = payload(
        customer_id="  c1 ",
        occurred_at=same_instant,
        properties={"items": [{"qty": 2.0, "sku": "A"}], "amount_cents": 4999},
    )
    assert payload_differences(payload(), again) == ()


def test_each_differing_field_and_property_is_named() -> None:
    other = payload(
        customer_id="c2",
        type="refund",
        occurred_at=AT + timedelta(microseconds=1),
        properties={"amount_cents": 4999, "items": [{"sku": "A", "qty": 3}], "note": "x"},
    )
    assert payload_differences(payload(), other) == (
        "customer_id",
        "type",
        "occurred_at",
        "properties.items",
        "properties.note",
    )


def test_json_values_compare_as_json_does_not_as_python_does() -> None:
    assert same_json(1, 1.0) and same_json({"a": [1, "x"]}, {"a": [1.0, "x"]})
    assert not same_json(True, 1) and not same_json(0, False) and not same_json(1.0, True)
    assert not same_json([1, 2], [2, 1]) and not same_json({"a": 1}, {"a": 1, "b": None})
    assert not same_json("1", 1) and not same_json(None, 0) and same_json(None, None)

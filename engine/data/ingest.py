"""Ingesting customers and events: validation, idempotency and the customer roll-ups.

The one path by which customers and events enter the database, used by the importer, the
HTTP API and the seeder. Input is validated by pydantic models, so a bad row is refused as
a whole with a reason naming the field; an event id seen before changes nothing.

An event sent again under an id seen before is a *duplicate* when its payload is identical
and a *conflict* otherwise (EventConflict; nothing changes either way). Identical means,
after validation (text stripped, ``occurred_at`` made UTC): the same ``customer_id`` and
``type``, the same instant for ``occurred_at`` (``10:00+01:00`` is ``09:00Z``), and
``properties`` equal as JSON values (see same_json).
Every input is bounded: ids, names, emails and phones hold no control characters (CR/LF
or an ANSI escape would break the staff notifications and emails that quote them);
properties and attributes hold no NUL at any depth; a moment must be representable in
UTC; and ``InputLimits`` caps the size of each property or attribute value and of all of
them together (``LIFECYCLE_MAX_PROPERTY_BYTES`` and friends, see engine.settings).
"""

from __future__ import annotations

import difflib
import json
import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from types import SimpleNamespace
from typing import Any, NamedTuple, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from sqlalchemy import bindparam, insert, select, update
from sqlmodel import Session

from engine.clock import as_utc
from engine.data.contacts import normalise_email, normalise_phone
from engine.data.models import Customer, Event
from engine.data.topics import set_topic
from engine.errors import CustomerErased, EventConflict, FactValueError
from engine.language.catalog import FactCatalog, FactSource, FactType
from engine.language.conditions import canonical_value

# The validation context key for the default phone region (LIFECYCLE_DEFAULT_PHONE_REGION):
# ``CustomerIn.model_validate(data, context=ingest_context(region))``.
PHONE_REGION = "phone_region"


def ingest_context(phone_region: str | None) -> dict[str, Any]:
    """What CustomerIn's validators need from the settings, as a pydantic context."""
    return {PHONE_REGION: phone_region}


class CustomerIn(BaseModel):
    """A customer as sent to the API or written in an import file.

    ``email`` is checked and normalised by email-validator (lower-cased); ``phone`` is
    parsed by phonenumbers and stored as E.164, a national number read in the region of
    the validation context (see ingest_context), an impossible one refused.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str = Field(min_length=1, max_length=64)
    email: str | None = Field(default=None, max_length=320)
    phone: str | None = None
    first_name: str | None = Field(default=None, max_length=100)
    timezone: str = "UTC"
    locale: str = Field(default="en-GB", pattern=r"^[a-z]{2}(-[A-Z]{2})?$")
    email_opt_in: bool = False
    sms_opt_in: bool = False
    signed_up_at: datetime | None = None
    attributes: dict[str, Any] = {}
    # Subscription topics the customer chose: {"offers": false, "newsletter": true}; topics
    # left out keep what is stored (engine.data.topics)
    topics: dict[str, StrictBool] = {}

    @field_validator("id", "email", "phone", "first_name", "timezone", "locale", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _no_control(value)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _not_a_path_step(value)

    @field_validator("attributes", mode="before")
    @classmethod
    def _attributes(cls, value: Any) -> Any:
        return _no_nul_inside(value)

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        return normalise_email(value)

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or value == "":
            return None
        region = (info.context or {}).get(PHONE_REGION)
        return normalise_phone(value, region)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        if value not in _zones():
            raise ValueError(f"{value!r} is not an IANA time zone like Europe/London")
        try:
            ZoneInfo(value)
        except ZoneInfoNotFoundError as exc:
            raise ValueError(f"{value!r} is not an IANA time zone like Europe/London") from exc
        return value

    @field_validator("signed_up_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        return _in_utc(value) if value is not None else None


class EventIn(BaseModel):
    """An event as sent to the API or written in an import file."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str = Field(min_length=1, max_length=128)
    customer_id: str = Field(min_length=1, max_length=64)
    type: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
    occurred_at: datetime
    properties: dict[str, Any] = {}

    @field_validator("id", "customer_id", "type", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _no_control(value)

    @field_validator("customer_id")
    @classmethod
    def _customer_id(cls, value: str) -> str:
        return _not_a_path_step(value)  # an unknown id may create the customer

    @field_validator("properties", mode="before")
    @classmethod
    def _properties(cls, value: Any) -> Any:
        return _no_nul_inside(value)

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return _in_utc(value)


def _in_utc(value: datetime) -> datetime:
    """The moment in UTC. A time without an offset is refused: ``2026-03-01T10:00`` could
    be any of 26 hours, and taking it as UTC would quietly move every local stamp.
    0001-01-01T00:00+05:00 is a valid datetime that UTC cannot hold: a ValueError (a 422
    or a row error naming the field), not an OverflowError (a 500)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{value.isoformat()} has no UTC offset; write it with one, like "
            f"{value.isoformat()}Z for UTC or {value.isoformat()}+01:00"
        )
    try:
        return as_utc(value)
    except OverflowError:
        raise ValueError(
            f"{value.isoformat()} is out of range: in UTC it must fall between "
            "0001-01-01 and 9999-12-31"
        ) from None


# Unicode's control characters (C0, DEL, C1: CR, LF, ESC for ANSI sequences, NUL...)
# and the line and paragraph separators, which break a line as LF does.
_LINE_SEPARATORS = {"\u2028", "\u2029"}


def _no_control(value: Any) -> Any:
    """Identity fields are quoted in emails, notifications and logs: no control characters."""
    if not isinstance(value, str):
        return value
    for position, char in enumerate(value, start=1):
        if unicodedata.category(char) == "Cc" or char in _LINE_SEPARATORS:
            raise ValueError(
                f"must not contain control characters: {_char_name(char)} at character {position}"
            )
    return value


def _not_a_path_step(customer_id: str) -> str:
    """Ids may hold ``/`` (console links encode it), but ``.`` and ``..`` are dot segments:
    a browser turns ``/console/customers/..`` (``%2E%2E`` too) into ``/console/``, so the
    customer's page could never be opened."""
    if customer_id in {".", ".."}:
        raise ValueError(
            f"{customer_id!r} cannot be a customer id: browsers read it as a step up in the "
            "console's links, so the customer's page could not be opened"
        )
    return customer_id


def _char_name(char: str) -> str:
    names = {
        "\x00": "NUL",
        "\n": "a line feed",
        "\r": "a carriage return",
        "\t": "a tab",
        "\x1b": "ESC (an ANSI escape)",
    }
    return names.get(char, f"U+{ord(char):04X}")


# Lists and objects inside a property or attribute nest at most this deep: every pass over
# a value (this check, the NaN check, the JSON encoders) recurses.
MAX_VALUE_DEPTH = 16


def _no_nul_inside(value: Any, where: str = "", depth: int = 0) -> Any:
    """PostgreSQL text and json cannot hold NUL: refused here at any depth, keys too,
    naming where, not by the database with a 500; and so is nesting past MAX_VALUE_DEPTH."""
    if depth > MAX_VALUE_DEPTH:
        raise ValueError(f"{where} is nested too deeply (at most {MAX_VALUE_DEPTH} levels)")
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where or 'the value'} must not contain the NUL character (\\u0000)")
    elif isinstance(value, dict):
        for key, item in value.items():
            inner = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and "\x00" in key:
                raise ValueError(f"the key {inner!r} must not contain the NUL character (\\u0000)")
            _no_nul_inside(item, inner, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _no_nul_inside(item, f"{where}[{index}]", depth + 1)
    return value


@dataclass(frozen=True)
class InputLimits:
    """How large one event's properties or one customer's attributes may be, in bytes of
    compact JSON (settings ``LIFECYCLE_MAX_PROPERTY_BYTES``, ``LIFECYCLE_MAX_PROPERTIES_BYTES``,
    ``LIFECYCLE_MAX_PROPERTIES``); declared or not, every key counts."""

    max_value_bytes: int = 10_000
    max_total_bytes: int = 64_000
    max_keys: int = 100
    max_row_bytes: int = 1_000_000  # an import row, as the API's request body


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode())


def check_sizes(values: dict[str, Any], field: str, limits: InputLimits) -> dict[str, str]:
    """``{"field.key": why}`` for every value over the cap, or for the whole (``field``)
    when it is over its caps although each value is within its own."""
    if len(values) > limits.max_keys:
        return {field: f"{len(values)} keys; at most {limits.max_keys}"}
    problems = {}
    for name, value in values.items():
        size = _json_size(value)
        if size > limits.max_value_bytes:
            problems[f"{field}.{name}"] = (
                f"{size:,} bytes; at most {limits.max_value_bytes:,} bytes a value"
            )
    if not problems and (total := _json_size(values)) > limits.max_total_bytes:
        problems[field] = f"{total:,} bytes in all; at most {limits.max_total_bytes:,} bytes"
    return problems


_ZONES: set[str] | None = None


def _zones() -> set[str]:
    global _ZONES
    if _ZONES is None:
        _ZONES = available_timezones()
    return _ZONES


def validation_reason(exc: ValidationError) -> str:
    """One line naming each bad field and why, for import reports and 422 answers."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "row"
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{field}: {message}")
    return "; ".join(parts)


def check_attributes(
    attributes: dict[str, Any], catalog: FactCatalog, limits: InputLimits | None = None
) -> list[str]:
    """Declared attributes must have their declared type; undeclared ones are refused."""
    oversized = check_sizes(attributes, "attributes", limits or InputLimits())
    if oversized:
        return [f"{where}: {why}" for where, why in oversized.items()]
    problems = []
    for name, value in attributes.items():
        spec = catalog.get(name)
        if spec is None or spec.source is not FactSource.ATTRIBUTE:
            problems.append(f"attributes.{name}: not declared in rules/catalog.yaml")
            continue
        if value is None:
            continue
        if not _has_type(value, spec.type):
            problems.append(f"attributes.{name}: expected {spec.type}, got {value!r}")
        elif (reason := _not_a_fact(value, spec.type)) is not None:
            problems.append(f"attributes.{name}: {reason}")
    return problems


def check_event_properties(
    event: EventIn, catalog: FactCatalog, limits: InputLimits | None = None
) -> list[str]:
    if event.type not in catalog.event_types:
        close = difflib.get_close_matches(event.type, sorted(catalog.event_types), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [f"type: unknown event type {event.type!r}{hint}; declare it in rules/catalog.yaml"]
    oversized = check_sizes(event.properties, "properties", limits or InputLimits())
    if oversized:
        return [f"{where}: {why}" for where, why in oversized.items()]
    problems = []
    for name, value in event.properties.items():
        spec = catalog.get(f"event.{name}")
        if spec is not None and value is not None and not _has_type(value, spec.type):
            problems.append(f"properties.{name}: expected {spec.type}, got {value!r}")
        elif spec is not None and (reason := _not_a_fact(value, spec.type)) is not None:
            problems.append(f"properties.{name}: {reason}")
        elif not _finite(value):
            problems.append(f"properties.{name}: NaN and Infinity are not JSON values")
    return problems


def _not_a_fact(value: Any, kind: FactType) -> str | None:
    """Why a value of the right type still cannot be a fact (a number beyond +-2**53, text
    too long for the rules engine): stored, it would stop every evaluation that reads it."""
    if value is None or kind is FactType.DATE:
        return None  # a date is written as text; _has_type checked it
    try:
        canonical_value("", value, kind)
    except FactValueError as exc:
        return exc.reason
    return None


def _finite(value: Any) -> bool:
    """No NaN or Infinity anywhere in a JSON value (PostgreSQL's json refuses them)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(item) for item in value.values())
    if isinstance(value, list):
        return all(_finite(item) for item in value)
    return True


def _has_type(value: Any, kind: FactType) -> bool:
    if kind is FactType.BOOL:
        return isinstance(value, bool)
    if kind in (FactType.INT, FactType.MONEY):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is FactType.DATE:
        if not isinstance(value, str):
            return False
        try:
            datetime.strptime(value, "%Y-%m-%d")
        except ValueError:
            return False
        return True
    return isinstance(value, str)


# Fields a customer row can carry besides its id, attributes and consent (handled apart).
_PLAIN_FIELDS = ("email", "phone", "first_name", "timezone", "locale")


def apply_customer(
    customer: Customer | None,
    data: CustomerIn,
    now: datetime,
    *,
    new: Callable[..., Customer] = Customer,
    via: str = "api",
) -> tuple[Customer, bool]:
    """Fold ``data`` into ``customer`` (a new one when None); says whether anything changed.

    Only the fields ``data`` was given are written, so a column or key missing from an
    import file never erases what is stored (consent above all), and attributes are merged
    key by key. When nothing differs, the row is left untouched: no stamp moves, so
    importing the same file twice changes nothing. ``new`` makes the new customer: the
    importer passes ``customer_draft`` to insert new customers in bulk. Topic choices are
    recorded topic by topic, stamped with ``now`` and ``via`` (where they came from).
    """
    given = data.model_fields_set
    if customer is None:
        customer = new(
            id=data.id,
            signed_up_at=data.signed_up_at or now,
            changed_at=now,
            created_at=now,
            updated_at=now,
        )
        given = given | set(_PLAIN_FIELDS)  # a new customer takes the defaults too
        changed = True
    else:
        changed = False
    for name in _PLAIN_FIELDS:
        if name in given and getattr(customer, name) != getattr(data, name):
            setattr(customer, name, getattr(data, name))
            changed = True
    if data.signed_up_at is not None and customer.signed_up_at != data.signed_up_at:
        customer.signed_up_at = data.signed_up_at
        changed = True
    if "email_opt_in" in given:
        changed = set_email_consent(customer, data.email_opt_in, now) or changed
    if "sms_opt_in" in given:
        changed = set_sms_consent(customer, data.sms_opt_in, now) or changed
    for topic, opted_in in data.topics.items():
        changed = set_topic(customer, topic, opted_in, now, via) or changed
    merged = {**(customer.attributes or {}), **data.attributes}
    if merged != customer.attributes:
        customer.attributes = merged
        changed = True
    if changed:
        customer.changed_at = now
        customer.updated_at = now
    return customer, changed


def customer_draft(**values: Any) -> Any:
    """A customer as a plain object, every column at its model default unless given.

    Building a SQLModel row costs about as much as inserting it; a draft is cheap, and
    ``vars(draft)`` is a row for a Core ``insert``.
    """
    row = {
        name: field.get_default(call_default_factory=True)
        for name, field in Customer.model_fields.items()
        if name not in values
    }
    return SimpleNamespace(**row, **values)


def first_sighting(customer_id: str, occurred_at: datetime, now: datetime) -> Customer:
    """A customer known only from an event for an id never seen (when
    LIFECYCLE_CREATE_UNKNOWN_CUSTOMERS allows it): the id alone, signed up when the event
    happened (never later than now), no contact details and no consent."""
    data = CustomerIn(id=customer_id, signed_up_at=min(occurred_at, now))
    return apply_customer(None, data, now)[0]


def upsert_customer(session: Session, data: CustomerIn, now: datetime) -> tuple[Customer, bool]:
    """Create or update a customer; returns it and whether anything changed (see
    apply_customer). Raises CustomerErased for a customer whose data was erased."""
    existing = session.get(Customer, data.id)
    if existing is not None and existing.erased_at is not None:
        raise CustomerErased(data.id)
    customer, changed = apply_customer(existing, data, now)
    if existing is None:
        session.add(customer)
    return customer, changed


def set_email_consent(customer: Customer, opted_in: bool, now: datetime) -> bool:
    """Record an email opt-in or opt-out stamped with ``now``; False when it was already so."""
    if opted_in and not customer.email_opt_in:
        customer.email_opt_in, customer.email_opt_in_at, customer.email_opt_out_at = True, now, None
    elif not opted_in and customer.email_opt_in:
        customer.email_opt_in, customer.email_opt_out_at = False, now
    else:
        return False
    customer.changed_at = now
    return True


def set_sms_consent(customer: Customer, opted_in: bool, now: datetime) -> bool:
    """Record an SMS opt-in or opt-out (STOP) stamped with ``now``; False when it was already so."""
    if opted_in and not customer.sms_opt_in:
        customer.sms_opt_in, customer.sms_opt_in_at, customer.sms_opt_out_at = True, now, None
    elif not opted_in and customer.sms_opt_in:
        customer.sms_opt_in, customer.sms_opt_out_at = False, now
    else:
        return False
    customer.changed_at = now
    return True


class HasRollups(Protocol):
    """What apply_rollups folds into: a Customer row, or a plain Rollups while seeding."""

    orders_count: int
    total_spend_cents: int
    last_order_at: datetime | None
    last_activity_at: datetime | None
    nps_score: int | None


@dataclass
class Rollups:
    """The customer roll-ups on their own, for folding events outside a session (the seeder)."""

    orders_count: int = 0
    total_spend_cents: int = 0
    last_order_at: datetime | None = None
    last_activity_at: datetime | None = None
    nps_score: int | None = None


def apply_rollups(
    customer: HasRollups, event_type: str, properties: dict[str, Any], occurred_at: datetime
) -> None:
    """Fold one event into the customer's roll-ups (see engine.data.models.Customer).

    The one implementation of the roll-ups: ingestion, the importer and the seeder all call it.
    The NPS score is the last one folded, so events are folded in the order they happened.
    """
    if customer.last_activity_at is None or occurred_at > customer.last_activity_at:
        customer.last_activity_at = occurred_at
    if event_type == "order_placed":
        customer.orders_count += 1
        amount = properties.get("amount_cents")
        if isinstance(amount, int) and not isinstance(amount, bool):
            customer.total_spend_cents += amount
        if customer.last_order_at is None or occurred_at > customer.last_order_at:
            customer.last_order_at = occurred_at
    elif event_type == "nps_submitted":
        score = properties.get("score")
        if isinstance(score, int) and not isinstance(score, bool) and 0 <= score <= 10:
            customer.nps_score = score


def _new_event(data: EventIn, now: datetime) -> Event:
    return Event(
        id=data.id,
        customer_id=data.customer_id,
        type=data.type,
        properties=data.properties,
        occurred_at=data.occurred_at,
        received_at=now,
    )


def _fold(customer: Customer, data: EventIn, now: datetime) -> None:
    apply_rollups(customer, data.type, data.properties, data.occurred_at)
    customer.changed_at = now
    customer.updated_at = now


class EventPayload(NamedTuple):
    """What an event says, compared when its id is sent again (received_at and
    evaluated_at are ours, not the sender's)."""

    customer_id: str
    type: str
    occurred_at: datetime
    properties: dict[str, Any]

    @classmethod
    def of(cls, event: EventIn | Event) -> EventPayload:
        return cls(event.customer_id, event.type, as_utc(event.occurred_at), event.properties)


def payload_differences(stored: EventPayload, incoming: EventPayload) -> tuple[str, ...]:
    """The fields in which ``incoming`` differs from ``stored``; empty when identical."""
    differences = [
        name
        for name in ("customer_id", "type", "occurred_at")
        if getattr(stored, name) != getattr(incoming, name)
    ]
    keys = sorted(set(stored.properties) | set(incoming.properties))
    differences.extend(
        f"properties.{key}"
        for key in keys
        if key not in stored.properties
        or key not in incoming.properties
        or not same_json(stored.properties[key], incoming.properties[key])
    )
    return tuple(differences)


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: objects by keys and values (in any order), arrays in order,
    numbers by value (``1`` is ``1.0``), and a boolean is never a number (Python's
    ``True == 1`` is not JSON's)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def record_event(
    session: Session, data: EventIn, now: datetime, *, create_unknown: bool = False
) -> Event | None:
    """Store an event once; returns None when its id was seen before with an identical
    payload (nothing changes) and raises EventConflict when the payload differs.

    An unknown customer raises LookupError, unless ``create_unknown`` creates them
    (first_sighting); an erased one raises CustomerErased; the roll-ups move in this
    transaction.
    """
    stored = session.get(Event, data.id)
    if stored is not None:
        check_same_event(stored, data)
        return None
    customer = session.get(Customer, data.customer_id, with_for_update=True)
    if customer is None and create_unknown:
        customer = first_sighting(data.customer_id, data.occurred_at, now)
        session.add(customer)
    if customer is None:
        raise LookupError(data.customer_id)
    if customer.erased_at is not None:
        raise CustomerErased(data.customer_id)
    event = _new_event(data, now)
    session.add(event)
    _fold(customer, data, now)
    return event


def check_same_event(stored: Event, data: EventIn) -> None:
    """Raises EventConflict unless ``data`` is the stored event sent again."""
    differences = payload_differences(EventPayload.of(stored), EventPayload.of(data))
    if differences:
        raise EventConflict(data.id, differences)


class Recorded(StrEnum):
    """What record_events did with one event."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # its id was seen before, in the database or earlier in the batch
    UNKNOWN_CUSTOMER = "unknown customer"
    ERASED_CUSTOMER = "erased customer"  # their personal data was erased: nothing more


ROLLUP_FIELDS = (
    "orders_count",
    "total_spend_cents",
    "last_order_at",
    "last_activity_at",
    "nps_score",
)


def record_events(
    session: Session, batch: Sequence[EventIn], now: datetime, *, history: bool = False
) -> list[Recorded | EventConflict]:
    """record_event for a batch, in four statements whatever its size (for the importer).

    Each event's outcome is a Recorded, or an EventConflict (naming what differs) for an
    id seen before, in the database or earlier in the batch, with a different payload.

    ``history`` stores past events as already evaluated: they fold into the roll-ups (and
    so into facts) but trigger no journey, so importing last year's sign-ups sends no
    welcome emails.

    One query finds the ids already stored (with their payloads), one reads (and locks) the
    customers' roll-ups;
    the events are folded in the order given, then inserted and the roll-ups written back
    with one executemany each. The writes go through SQLAlchemy Core, so Customer objects
    already loaded in ``session`` do not see them. The caller commits or rolls back.
    """
    customers = Customer.__table__  # type: ignore[attr-defined]
    seen = stored_payloads(session, [data.id for data in batch])
    wanted = sorted({data.customer_id for data in batch})  # lock in id order: no deadlocks
    rollups: dict[str, Rollups] = {}
    erased: set[str] = set()
    if wanted:
        columns = [
            customers.c.id,
            customers.c.erased_at,
            *(customers.c[name] for name in ROLLUP_FIELDS),
        ]
        statement = select(*columns).where(customers.c.id.in_(wanted)).with_for_update()
        for row in session.execute(statement):
            rollups[row.id] = Rollups(**{name: getattr(row, name) for name in ROLLUP_FIELDS})
            if row.erased_at is not None:
                erased.add(row.id)
    outcomes: list[Recorded | EventConflict] = []
    events: list[dict[str, Any]] = []
    touched: set[str] = set()
    for data in batch:
        folded = rollups.get(data.customer_id)
        earlier = seen.get(data.id)
        if earlier is not None:
            differences = payload_differences(earlier, EventPayload.of(data))
            outcomes.append(
                EventConflict(data.id, differences) if differences else Recorded.DUPLICATE
            )
        elif folded is None:
            outcomes.append(Recorded.UNKNOWN_CUSTOMER)
        elif data.customer_id in erased:
            outcomes.append(Recorded.ERASED_CUSTOMER)
        else:
            seen[data.id] = EventPayload.of(data)
            events.append(
                {
                    "id": data.id,
                    "customer_id": data.customer_id,
                    "type": data.type,
                    "properties": data.properties,
                    "occurred_at": data.occurred_at,
                    "received_at": now,
                    "evaluated_at": now if history else None,
                }
            )
            apply_rollups(folded, data.type, data.properties, data.occurred_at)
            touched.add(data.customer_id)
            outcomes.append(Recorded.STORED)
    if events:
        session.execute(insert(Event.__table__), events)  # type: ignore[attr-defined]
        changes = [
            {"_id": key, **vars(rollups[key]), "changed_at": now, "updated_at": now}
            for key in sorted(touched)
        ]
        session.execute(update(customers).where(customers.c.id == bindparam("_id")), changes)
    return outcomes


def stored_payloads(session: Session, ids: list[str]) -> dict[str, EventPayload]:
    """The payloads of the events among ``ids`` that are stored, by id (one query)."""
    if not ids:
        return {}
    events = Event.__table__  # type: ignore[attr-defined]
    statement = select(
        events.c.id, events.c.customer_id, events.c.type, events.c.occurred_at, events.c.properties
    ).where(events.c.id.in_(sorted(set(ids))))
    return {
        row.id: EventPayload(row.customer_id, row.type, as_utc(row.occurred_at), row.properties)
        for row in session.execute(statement)
    }

"""Segment's HTTP Tracking API calls, translated into Lifecycle's customers and events.

Pure functions on plain data: the web edge (engine.web.segment) hands in one call as sent
(a JSON object) and gets back what it means, as one of four explicit variants:

``Identify``  a customer to create or update (a CustomerIn), with warnings
``Track``     an event to record (an EventIn), with warnings
``Ignored``   a call Lifecycle does not store, and why (page, screen, group, alias; a
              call with no userId; an event type the catalog does not declare)
``Refused``   a call that is wrong, with every problem at its place in the call

The mapping (documented in the README, "Segment-compatible API"):

- ``userId`` is the customer id; ``anonymousId`` alone identifies nobody (ignored).
- identify ``traits``: ``email``, ``phone``, ``firstName``/``first_name``, ``timezone``,
  ``locale``, ``createdAt``/``created_at`` (signed_up_at), ``emailOptIn``/``email_opt_in``
  and ``smsOptIn``/``sms_opt_in`` are customer fields; any other trait is the attribute of
  that name, or of its snake_case (``marketingSegment`` → ``marketing_segment``), when
  ``rules/catalog.yaml`` declares one, and is otherwise left out with a warning naming it.
  ``context.timezone`` and ``context.locale`` fill in a missing timezone or locale (a
  value Lifecycle cannot use is left out with a warning, not refused: the device set it).
- track ``event`` is the event type listed for it in LIFECYCLE_SEGMENT_EVENT_TYPES, else
  its snake_case (``Order Completed`` → ``order_completed``); ``messageId`` is the event
  id (idempotency: resent identical, a duplicate; resent different, a conflict);
  ``timestamp`` (else ``originalTimestamp``, else the time of receipt) is when it
  happened; ``properties`` are the event's, each renamed to its snake_case when only
  that name is declared.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from pydantic import ValidationError

from engine.data.ingest import (
    CustomerIn,
    EventIn,
    InputLimits,
    check_attributes,
    check_event_properties,
)
from engine.language.catalog import EVENT_PROPERTY_PREFIX, FactCatalog, FactSource

# Segment's call types; only the first two are stored.
SEGMENT_TYPES = ("identify", "track", "page", "screen", "group", "alias")
EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_EVENT_TYPE = 64

# Traits that are customer fields, by the name Segment (or a snake_case sender) uses.
CUSTOMER_TRAITS = {
    "email": "email",
    "phone": "phone",
    "firstName": "first_name",
    "first_name": "first_name",
    "timezone": "timezone",
    "locale": "locale",
    "createdAt": "signed_up_at",
    "created_at": "signed_up_at",
    "emailOptIn": "email_opt_in",
    "email_opt_in": "email_opt_in",
    "smsOptIn": "sms_opt_in",
    "sms_opt_in": "sms_opt_in",
}
# Fields a device's context may fill in when the traits do not say.
CONTEXT_FIELDS = ("timezone", "locale")

Loc = tuple[str | int, ...]


class Problem(NamedTuple):
    """One thing wrong with a call, at its place in the call (``("traits", "email")``)."""

    loc: Loc
    msg: str
    type: str


@dataclass(frozen=True)
class Identify:
    customer: CustomerIn
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Track:
    event: EventIn
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ignored:
    reason: str


@dataclass(frozen=True)
class Refused:
    problems: tuple[Problem, ...]


Call = Identify | Track | Ignored | Refused


def snake_case(name: str) -> str:
    """``Order Completed``, ``orderCompleted`` and ``order-completed`` → ``order_completed``."""
    split = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.strip())
    return re.sub(r"[^A-Za-z0-9]+", "_", split).strip("_").lower()


def check_event_type_name(event_type: str, what: str) -> str:
    """An event type as the catalog spells them; ValueError naming ``what`` otherwise."""
    if not EVENT_TYPE.match(event_type) or len(event_type) > MAX_EVENT_TYPE:
        raise ValueError(
            f"{what} is {event_type!r}: an event type is lower-case letters, digits and "
            f"underscores, starting with a letter, at most {MAX_EVENT_TYPE} characters"
        )
    return event_type


@dataclass(frozen=True)
class Translator:
    """Translates calls against one fact catalog and the settings that shape the mapping."""

    catalog: FactCatalog
    event_types: Mapping[str, str]  # LIFECYCLE_SEGMENT_EVENT_TYPES
    context: dict[str, Any]  # the validation context (engine.data.ingest.ingest_context)
    limits: InputLimits

    def translate(self, call: Any, now: datetime, expected: str | None = None) -> Call:
        """What ``call`` means; ``expected`` is the type of a single-call endpoint
        (``/v1/identify``), which a call may leave out."""
        if not isinstance(call, dict):
            return _refused((), "a call is a JSON object", "type_error")
        kind = call.get("type", expected)
        if expected is not None and kind != expected:
            return _refused(("type",), f"this endpoint takes {expected} calls, not {kind!r}")
        if kind not in SEGMENT_TYPES:
            choices = ", ".join(SEGMENT_TYPES)
            return _refused(("type",), f"unknown call type {kind!r}; Segment's are {choices}")
        if kind not in ("identify", "track"):
            return Ignored(f"{kind} calls are not stored: Lifecycle takes identify and track")
        for name in ("traits", "properties", "context"):
            if call.get(name) is not None and not isinstance(call[name], dict):
                return _refused((name,), f"{name} must be a JSON object")
        user = call.get("userId")
        if user is None or user == "":
            return Ignored("no userId: Lifecycle knows customers by userId, not anonymousId")
        if isinstance(user, bool) or not isinstance(user, str | int):
            return _refused(("userId",), "userId must be a string")
        if kind == "identify":
            return self._identify(str(user), call)
        return self._track(str(user), call, now)

    # ------------------------------------------------------------ identify

    def _identify(self, user: str, call: dict[str, Any]) -> Call:
        fields: dict[str, Any] = {"id": user}
        where: dict[str, Loc] = {"id": ("userId",)}
        attributes: dict[str, Any] = {}
        left_out: list[str] = []
        for name, value in (call.get("traits") or {}).items():
            field = CUSTOMER_TRAITS.get(name)
            if field is not None:
                fields[field], where[field] = value, ("traits", name)
            elif (attribute := self._attribute(name)) is not None:
                attributes[attribute] = value
                where[f"attributes.{attribute}"] = ("traits", name)
            else:
                left_out.append(name)
        warnings = []
        if left_out:
            warnings.append(
                "traits not declared as attributes in rules/catalog.yaml, not stored: "
                + ", ".join(sorted(left_out))
            )
        if attributes:
            fields["attributes"] = attributes
        if isinstance(fields.get("locale"), str):
            fields["locale"] = fields["locale"].replace("_", "-")
        context = call.get("context") or {}
        for name in CONTEXT_FIELDS:
            value = context.get(name)
            if name not in fields and isinstance(value, str) and value:
                value = value.replace("_", "-") if name == "locale" else value
                if self._usable(name, value):
                    fields[name], where[name] = value, ("context", name)
                else:
                    warnings.append(f"context.{name} {value!r} is not usable, not stored")
        try:
            customer = CustomerIn.model_validate(fields, context=self.context)
        except ValidationError as exc:
            return Refused(_problems(exc, where))
        problems = check_attributes(customer.attributes, self.catalog, self.limits)
        if problems:
            return Refused(tuple(_catalog_problem(p, where) for p in problems))
        return Identify(customer, tuple(warnings))

    def _usable(self, name: str, value: str) -> bool:
        try:
            CustomerIn.model_validate({"id": "-", name: value}, context=self.context)
        except ValidationError:
            return False
        return True

    def _attribute(self, trait: str) -> str | None:
        for name in (trait, snake_case(trait)):
            spec = self.catalog.get(name)
            if spec is not None and spec.source is FactSource.ATTRIBUTE:
                return name
        return None

    # ------------------------------------------------------------ track

    def _track(self, user: str, call: dict[str, Any], now: datetime) -> Call:
        name = call.get("event")
        if not isinstance(name, str) or not name.strip():
            return _refused(("event",), "a track call needs its event name")
        message_id = call.get("messageId")
        if not isinstance(message_id, str) or not message_id.strip():
            return _refused(
                ("messageId",),
                "a track call needs its messageId: it is the event's id, which makes a "
                "retried delivery harmless",
            )
        event_type = self.event_types.get(name) or snake_case(name)
        try:
            check_event_type_name(event_type, f"the event type of {name!r}")
        except ValueError as exc:
            return _refused(("event",), str(exc))
        if event_type not in self.catalog.event_types:
            return Ignored(
                f"event type {event_type!r} (Segment event {name!r}) is not declared in "
                "rules/catalog.yaml: declare it, or map the name to a declared type with "
                "LIFECYCLE_SEGMENT_EVENT_TYPES"
            )
        properties: dict[str, Any] = {}
        where: dict[str, Loc] = {
            "id": ("messageId",),
            "customer_id": ("userId",),
            "type": ("event",),
            "occurred_at": ("timestamp",),
        }
        for key, value in (call.get("properties") or {}).items():
            own = self._property(key)
            properties[own] = value
            where[f"properties.{own}"] = ("properties", key)
        moment = call.get("timestamp") or call.get("originalTimestamp") or now
        if not call.get("timestamp") and call.get("originalTimestamp"):
            where["occurred_at"] = ("originalTimestamp",)
        fields = {
            "id": message_id,
            "customer_id": user,
            "type": event_type,
            "occurred_at": moment,
            "properties": properties,
        }
        try:
            event = EventIn.model_validate(fields)
        except ValidationError as exc:
            return Refused(_problems(exc, where))
        problems = check_event_properties(event, self.catalog, self.limits)
        if problems:
            return Refused(tuple(_catalog_problem(p, where) for p in problems))
        return Track(event)

    def _property(self, key: str) -> str:
        if self.catalog.get(EVENT_PROPERTY_PREFIX + key) is not None:
            return key
        snake = snake_case(key)
        return snake if self.catalog.get(EVENT_PROPERTY_PREFIX + snake) is not None else key


def _refused(loc: Loc, msg: str, kind: str = "value_error") -> Refused:
    return Refused((Problem(loc, msg, kind),))


def _problems(exc: ValidationError, where: Mapping[str, Loc]) -> tuple[Problem, ...]:
    """Pydantic's errors, each at the place in the call its value came from."""
    found = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"][:2])
        loc = where.get(field) or where.get(str(error["loc"][0])) or tuple(error["loc"])
        found.append(Problem(loc, str(error["msg"]), str(error["type"])))
    return tuple(found)


def _catalog_problem(problem: str, where: Mapping[str, Loc]) -> Problem:
    """``"attributes.plan: expected string, got 5"`` at the trait it came from."""
    field, _, message = problem.partition(": ")
    return Problem(where.get(field, tuple(field.split("."))), message, "catalog")

"""The fact catalog: every name a condition may use, with its type and meaning.

Built-in facts are computed from customers, orders and events by ``engine.data.facts``; the
marketing team adds customer attributes, event properties and subscription topics in
``rules/catalog.yaml``. A topic (newsletter, offers...) is a true/false fact
``topic.<name>``: whether the customer gets messages of that topic (their own choice, else
the topic's default; see ``Topic``).
Values are always typed and encoded so that durable_rules never compares across types:
booleans are strict ``bool``, money is integer cents, dates are whole days since the Unix
epoch, and text is ``str``. A missing value (``None``) makes every comparison with it false.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class FactType(StrEnum):
    """The types a fact can have; a condition may compare a fact only with its own type."""

    BOOL = "bool"
    INT = "int"  # whole numbers: counts, scores, days since something
    MONEY = "money"  # integer cents; literals are written $500 or $49.99
    DATE = "date"  # whole days since 1970-01-01; literals are written 2026-01-31
    STRING = "string"


class FactSource(StrEnum):
    BUILTIN = "builtin"
    ATTRIBUTE = "attribute"  # customers.attributes, declared in rules/catalog.yaml
    EVENT = "event"  # the triggering event's properties, declared in rules/catalog.yaml
    TOPIC = "topic"  # topic.<name>: gets messages of that subscription topic


@dataclass(frozen=True)
class FactSpec:
    """One fact a condition may name."""

    name: str
    type: FactType
    description: str
    source: FactSource = FactSource.BUILTIN
    example: object = None  # a sample value, used to render templates during `rules check`


BUILTIN_FACTS: tuple[FactSpec, ...] = (
    FactSpec(
        "days_since_signup", FactType.INT, "Whole days since the customer signed up.", example=3
    ),
    FactSpec(
        "days_since_last_activity",
        FactType.INT,
        "Whole days since the customer's last event of any kind (signup if none).",
        example=12,
    ),
    FactSpec("orders_count", FactType.INT, "Number of 'order_placed' events.", example=2),
    FactSpec(
        "total_spend_cents",
        FactType.MONEY,
        "Sum of the 'amount_cents' of every order, in cents (compare with $500 or 50000).",
        example=12_500,
    ),
    FactSpec(
        "last_order_days_ago",
        FactType.INT,
        "Whole days since the last order; unknown when there is none.",
        example=20,
    ),
    FactSpec(
        "nps_score",
        FactType.INT,
        "The latest NPS answer (0-10) from an 'nps_submitted' event; unknown when none.",
        example=9,
    ),
    FactSpec("open_complaints", FactType.INT, "Escalation cases that are not resolved.", example=0),
    FactSpec(
        "email_opt_in",
        FactType.BOOL,
        "Opted in to marketing email and not revoked since.",
        example=True,
    ),
    FactSpec(
        "sms_opt_in",
        FactType.BOOL,
        "Explicitly opted in to SMS and has not sent STOP.",
        example=True,
    ),
    FactSpec(
        "has_email", FactType.BOOL, "Has an email address that is not suppressed.", example=True
    ),
    FactSpec(
        "has_phone",
        FactType.BOOL,
        "Has an E.164 phone number that is not suppressed.",
        example=True,
    ),
    FactSpec("locale", FactType.STRING, "The customer's locale, like en-GB.", example="en-GB"),
    FactSpec(
        "timezone",
        FactType.STRING,
        "The customer's IANA timezone, like Europe/London.",
        example="Europe/London",
    ),
    FactSpec(
        "stage",
        FactType.STRING,
        "The customer's lifecycle stage (rules/stages.yaml), decided at this evaluation; "
        "unknown without a stage model.",
        example="active",
    ),
    FactSpec(
        "days_in_stage",
        FactType.INT,
        "Whole days since the customer entered their current stage (0 on the day it changed).",
        example=12,
    ),
    FactSpec(
        "previous_stage",
        FactType.STRING,
        "The stage before the current one; unknown for a customer who has only had one.",
        example="onboarding",
    ),
    FactSpec(
        "event",
        FactType.STRING,
        "The type of the event that triggered this evaluation, like 'complaint'; unknown in a sweep.",
        example="signed_up",
    ),
    FactSpec(
        "event_days_ago",
        FactType.INT,
        "Whole days since the triggering event happened; unknown in a sweep.",
        example=0,
    ),
)

EVENT_PROPERTY_PREFIX = "event."
TOPIC_PREFIX = "topic."


@dataclass(frozen=True)
class Topic:
    """A subscription topic of the preference centre. A customer who never chose gets its
    messages when ``opted_in_by_default`` (channel consent still applies), and only after
    opting in otherwise. ``description`` is shown to customers (the unsubscribe page)."""

    name: str
    description: str
    opted_in_by_default: bool = True

    @property
    def fact(self) -> str:
        return TOPIC_PREFIX + self.name


@dataclass(frozen=True)
class FactCatalog:
    """Every fact by name: the built-ins plus what ``rules/catalog.yaml`` declares."""

    facts: Mapping[str, FactSpec]
    event_types: frozenset[str]
    topics: Mapping[str, Topic] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        extra: Iterable[FactSpec] = (),
        event_types: Iterable[str] = (),
        topics: Iterable[Topic] = (),
    ) -> FactCatalog:
        facts = {spec.name: spec for spec in BUILTIN_FACTS}
        for spec in extra:
            facts[spec.name] = spec
        declared = {topic.name: topic for topic in topics}
        for topic in declared.values():
            default = "opted in" if topic.opted_in_by_default else "opted out"
            facts[topic.fact] = FactSpec(
                topic.fact,
                FactType.BOOL,
                f"Gets {topic.name} messages: {topic.description} ({default} unless the "
                "customer chose).",
                FactSource.TOPIC,
                True,
            )
        return cls(facts=facts, event_types=frozenset(event_types), topics=declared)

    def get(self, name: str) -> FactSpec | None:
        return self.facts.get(name)

    def names(self) -> list[str]:
        return sorted(self.facts)

    def attributes(self) -> list[FactSpec]:
        return [s for s in self.facts.values() if s.source is FactSource.ATTRIBUTE]

    def event_properties(self) -> list[FactSpec]:
        return [s for s in self.facts.values() if s.source is FactSource.EVENT]

    def sample_facts(self) -> dict[str, object]:
        """A plausible value for every fact, to render templates against during a check."""
        return {name: spec.example for name, spec in self.facts.items()}

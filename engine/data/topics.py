"""The preference centre: each customer's choices of subscription topics.

Topics (newsletter, offers, product news...) are declared in ``rules/catalog.yaml``, each
opted in or opted out by default. A customer's own choices are kept on the customer row
(``customers.topics``) as ``{"offers": {"opted_in": false, "at": "<ISO time>", "via":
"unsubscribe link"}}``, so the facts builder reads them in its one query and every choice
says when and how it was made. The fact ``topic.<name>`` is the choice, else the default.

Written by the API and the importer (``topics: {"offers": false}``, or a CSV column
``topic.offers``) and by the unsubscribe page; read by the consent policy, at planning
and again at send time.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

from engine.language.catalog import FactCatalog, Topic


class HasTopics(Protocol):
    """A customer row whose topic choices can be changed (the ORM Customer, a draft)."""

    topics: dict[str, Any]
    changed_at: datetime


def chosen(choices: Mapping[str, Any] | None, topic: str) -> bool | None:
    """The customer's own choice for ``topic``: True, False, or None when never made."""
    choice = (choices or {}).get(topic)
    if isinstance(choice, dict) and isinstance(choice.get("opted_in"), bool):
        return bool(choice["opted_in"])
    return None


def topic_facts(choices: Mapping[str, Any] | None, topics: Iterable[Topic]) -> dict[str, bool]:
    """``topic.<name>`` for every declared topic: the customer's choice, else the default."""
    facts = {}
    for topic in topics:
        choice = chosen(choices, topic.name)
        facts[topic.fact] = topic.opted_in_by_default if choice is None else choice
    return facts


def set_topic(customer: HasTopics, topic: str, opted_in: bool, now: datetime, via: str) -> bool:
    """Record the customer's choice for ``topic`` stamped with ``now``; False (nothing
    written) when it already was that choice."""
    if chosen(customer.topics, topic) is opted_in:
        return False
    # A new dict, so that the ORM sees the change of the JSON column.
    customer.topics = {
        **(customer.topics or {}),
        topic: {"opted_in": opted_in, "at": now.isoformat(), "via": via},
    }
    customer.changed_at = now
    return True


def check_topics(topics: Mapping[str, Any], catalog: FactCatalog) -> list[str]:
    """Problems with topic choices sent in (``{"offers": false}``), as ``topics.<name>:
    reason``: every topic must be declared in catalog.yaml (with a did-you-mean)."""
    problems = []
    declared = sorted(catalog.topics)
    for name in topics:
        if name not in catalog.topics:
            close = difflib.get_close_matches(name, declared, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(declared) or "none"
            problems.append(
                f"topics.{name}: not a topic declared in rules/catalog.yaml{hint}; topics: {known}"
            )
    return problems

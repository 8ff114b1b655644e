"""The facts builder's fast path gives exactly the facts of the typed ORM path."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import Session

from engine.data.facts import (
    build_facts,
    customer_rows,
    open_complaint_counts,
    subjects_for,
    subjects_in_range,
    suppressed_addresses,
)
from engine.data.models import Escalation, Suppression
from engine.data.seed import seed
from engine.playbooks.loader import load_rules
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES


def test_the_fast_reader_gives_the_facts_of_the_typed_rows(db: Engine, now: datetime) -> None:
    rules = load_rules(FIXTURE_RULES, FIXTURE_TEMPLATES)
    seed(db, 120, now)
    with Session(db) as session:
        session.add(
            Suppression(
                channel="email",
                address="olivia.1@example.com",
                reason="bounce",
                source="test",
                created_at=now,
            )
        )
        session.add(
            Escalation(
                customer_id="seed-00000003",
                reason="late",
                sla_due_at=now + timedelta(hours=4),
                opened_at=now,
                updated_at=now,
            )
        )
        session.commit()
        ids = [f"seed-{n:08d}" for n in range(1, 121)]
        fast = {s.customer_id: s.facts for s in subjects_for(session, ids, rules.catalog, now)}
        ranged = subjects_in_range(session, rules.catalog, now, after=None, upto=ids[-1])
        rows = customer_rows(session, ids)
        complaints = open_complaint_counts(session, ids)
        suppressed = suppressed_addresses(session, rows)
        typed = {
            row.id: build_facts(
                row,
                rules.catalog,
                now,
                open_complaints=complaints.get(row.id, 0),
                suppressed=suppressed,
            )
            for row in rows
        }
    assert fast == typed
    assert {s.customer_id: s.facts for s in ranged if s.event_id is None} == typed
    assert typed["seed-00000003"]["open_complaints"] == 1
    assert any(not facts["has_email"] for facts in typed.values())
    # The pending events of the range come with their own subjects, oldest first.
    events = [s for s in ranged if s.event_id is not None]
    assert events and all(s.occurred_at is not None for s in events)
    assert [s.occurred_at for s in events] == sorted(s.occurred_at for s in events)  # type: ignore[type-var]

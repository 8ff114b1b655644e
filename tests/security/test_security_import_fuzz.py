"""Hypothesis over the CSV and JSONL importers: whatever the file holds (stray quotes,
line breaks in and out of cells, control characters, huge or odd cells), an import never
raises, accounts for every row it read, and stores only valid rows (issue 10, points 6,
8, 9 and 11)."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from sqlmodel import Session

from engine.data.db import make_engine, upgrade
from engine.data.importing import import_customers, import_events
from engine.data.ingest import CustomerIn, EventIn, upsert_customer
from engine.data.models import Event
from engine.language.catalog import FactCatalog
from engine.playbooks.loader import load_rules
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
HEADER = "id,customer_id,type,occurred_at,prop.reason"
CELLS = st.sampled_from(
    [
        "ann",
        "bo",
        "complaint",
        "site_visit",
        "2026-03-01T10:00:00Z",
        "0001-01-01T00:00:00+05:00",
        "late",
        '"',
        '"quoted"',
        'a"b',
        "x\ny",
        "\x1b[2J",
        "\x00",
        "\r",
        "",
        " ",
        "é",
        "\u2028",
        "9999-12-31T23:00:00-05:00",
        "x" * 20_000,
    ]
) | st.text(max_size=12)


@pytest.fixture(scope="module")
def world() -> tuple[Engine, FactCatalog]:
    path = Path(tempfile.mkdtemp(prefix="fuzz-import-")) / "fuzz.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    with Session(engine) as session:
        for cid in ("ann", "bo"):
            upsert_customer(session, CustomerIn(id=cid), NOW)
        session.commit()
    return engine, load_rules(FIXTURE_RULES, FIXTURE_TEMPLATES).catalog


def _rows(data: st.DataObject) -> list[list[str]]:
    return data.draw(st.lists(st.lists(CELLS, min_size=1, max_size=7), max_size=8))


def _stored_ids(engine: Engine) -> set[str]:
    with Session(engine) as session:
        return set(session.scalars(select(Event.id)))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_csv_imports_without_an_exception_and_keeps_only_valid_rows(
    world: tuple[Engine, FactCatalog], data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    engine, catalog = world
    path = tmp_path_factory.mktemp("csv") / "events.csv"
    lines = [",".join(cells) for cells in _rows(data)]
    path.write_text(HEADER + "\n" + "\n".join(lines) + ("\n" if data.draw(st.booleans()) else ""))
    before = _stored_ids(engine)
    report = import_events(engine, path, catalog, NOW)
    assert report.created + report.duplicates + len(report.errors) == report.rows
    assert [e.row for e in report.errors] == sorted(e.row for e in report.errors)
    new = _stored_ids(engine) - before
    assert len(new) == report.created
    with Session(engine) as session:
        for event in session.scalars(select(Event).where(Event.id.in_(new))):  # type: ignore[attr-defined]
            EventIn.model_validate(  # what was stored passes the API's own validation
                {
                    "id": event.id,
                    "customer_id": event.customer_id,
                    "type": event.type,
                    "occurred_at": event.occurred_at,
                    "properties": event.properties,
                }
            )


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.dictionaries(
            st.sampled_from(["id", "first_name", "email", "phone", "attributes", "signed_up_at"]),
            CELLS | st.integers() | st.none(),
            max_size=6,
        ),
        max_size=6,
    )
)
def test_any_jsonl_of_customers_imports_without_an_exception(
    world: tuple[Engine, FactCatalog],
    rows: list[dict[str, object]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    engine, catalog = world
    path = tmp_path_factory.mktemp("jsonl") / "customers.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = import_customers(engine, path, catalog, NOW)
    assert report.created + report.updated + report.unchanged + len(report.errors) == report.rows

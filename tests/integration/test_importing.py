"""Importing customers and events from CSV and JSON Lines, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, delete, select, text
from sqlmodel import Session, col

from engine.data.importing import ImportFileError, import_customers, import_events
from engine.data.models import Customer, Event
from engine.data.uow import unit_of_work
from engine.errors import SourceProblem
from engine.language.catalog import FactCatalog
from engine.playbooks.loader import load_catalog

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "import"


def rules_catalog(rules_dir: Path) -> FactCatalog:
    """The shipped fact catalog, through the rules loader."""
    problems: list[SourceProblem] = []
    catalog, _ = load_catalog(rules_dir, problems)
    assert not problems, problems
    return catalog


@pytest.fixture(scope="module")
def catalog(rules_dir: Path) -> FactCatalog:
    return rules_catalog(rules_dir)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables an import writes, sorted (ids come first)."""
    tables = {"customers": Customer.__table__, "events": Event.__table__}  # type: ignore[attr-defined]
    with engine.connect() as connection:
        return {
            name: sorted(tuple(row) for row in connection.execute(select(table)))
            for name, table in tables.items()
        }


def customer(engine: Engine, customer_id: str) -> Customer:
    with Session(engine) as session:
        found = session.get(Customer, customer_id)
        assert found is not None, customer_id
        return found


def errors(report: Any) -> list[str]:
    return [str(error) for error in report.errors]


# ---------------------------------------------------------------- good files


def test_customers_csv_creates_customers_with_typed_attributes(
    db: Engine, catalog: FactCatalog, now: datetime
) -> None:
    path = FIXTURES / "customers.csv"
    report = import_customers(db, path, catalog, now)

    assert report.summary() == (
        f"{path}: 4 rows: 4 customers created, 0 updated, 0 unchanged, 0 bad rows"
    )
    ada = customer(db, "c-001")
    assert (ada.email, ada.phone, ada.first_name) == ("ada@example.com", "+447700900123", "Ada")
    assert (ada.timezone, ada.locale) == ("Europe/London", "en-GB")
    assert (ada.email_opt_in, ada.email_opt_in_at, ada.sms_opt_in) == (True, now, True)
    assert ada.signed_up_at == utc(2025, 11, 2, 9, 30)
    assert ada.attributes == {
        "plan": "plus",
        "marketing_segment": "loyal",
        "vip": True,
        "birthday": "1990-05-17",
    }
    assert (ada.changed_at, ada.created_at, ada.updated_at) == (now, now, now)
    bob = customer(db, "c-002")
    assert bob.signed_up_at == utc(2025, 12, 24, 23, 0)  # written at -05:00
    assert (bob.phone, bob.sms_opt_in, bob.sms_opt_in_at) == (None, False, None)
    assert bob.attributes == {"plan": "free", "marketing_segment": "new", "vip": False}
    chen = customer(db, "c-003")
    assert (chen.first_name, chen.phone) == ("Chen, Wei", "+12125550142")
    assert chen.signed_up_at == utc(2026, 1, 15)
    assert (chen.email_opt_in, chen.sms_opt_in) == (False, True)
    assert chen.attributes == {"plan": "pro", "vip": False, "birthday": "1985-02-28"}
    dana = customer(db, "c-004")
    assert (dana.email, dana.locale, dana.attributes) == (None, "en-AU", {})


def test_customers_jsonl_creates_customers_with_defaults(
    db: Engine, catalog: FactCatalog, now: datetime
) -> None:
    path = FIXTURES / "customers.jsonl"
    report = import_customers(db, path, catalog, now)

    assert report.summary() == (
        f"{path}: 3 rows: 3 customers created, 0 updated, 0 unchanged, 0 bad rows"
    )
    eve = customer(db, "j-001")
    assert eve.signed_up_at == utc(2026, 2, 1, 7, 0)
    assert eve.attributes == {"plan": "pro", "vip": False, "birthday": "1979-12-01"}
    assert (eve.sms_opt_in, eve.sms_opt_in_at) == (True, now)
    gia = customer(db, "j-003")
    assert (gia.timezone, gia.locale, gia.email_opt_in, gia.email) == ("UTC", "en-GB", False, None)


def test_events_csv_and_jsonl_are_stored_and_fold_the_rollups(
    db: Engine, catalog: FactCatalog, now: datetime
) -> None:
    later = now + timedelta(hours=1)
    import_customers(db, FIXTURES / "customers.csv", catalog, now)
    csv_report = import_events(db, FIXTURES / "events.csv", catalog, later)
    jsonl_report = import_events(db, FIXTURES / "events.jsonl", catalog, later)

    assert csv_report.summary() == (
        f"{FIXTURES / 'events.csv'}: 5 rows: 5 events stored, 0 duplicates, 0 bad rows"
    )
    assert (jsonl_report.created, jsonl_report.errors) == (3, [])
    ada = customer(db, "c-001")
    assert (ada.orders_count, ada.total_spend_cents, ada.nps_score) == (2, 17_499, 9)
    assert (ada.last_order_at, ada.last_activity_at) == (
        utc(2026, 1, 10, 10, 0),
        utc(2026, 1, 12, 8, 0),
    )
    assert (ada.changed_at, ada.updated_at, ada.created_at) == (later, later, now)
    bob = customer(db, "c-002")
    assert (bob.orders_count, bob.total_spend_cents, bob.nps_score) == (1, 2_599, 6)
    assert bob.last_activity_at == utc(2026, 2, 22, 9, 0)  # written at +01:00
    chen = customer(db, "c-003")
    assert (chen.orders_count, chen.last_order_at, chen.last_activity_at) == (
        0,
        None,
        utc(2026, 3, 1, 9, 0),
    )
    with Session(db) as session:
        complaint = session.get(Event, "e-005")
        assert complaint is not None
        assert complaint.properties == {
            "reason": "Parcel arrived broken, box crushed",
            "severity": 2,
        }
        assert (complaint.received_at, complaint.evaluated_at) == (later, None)
        order = session.get(Event, "e-101")
        assert order is not None
        assert (order.type, order.properties) == ("order_placed", {"amount_cents": 2599})


# ---------------------------------------------------------------- bad rows


def test_bad_customer_rows_in_csv_are_reported_and_good_rows_kept(
    db: Engine, catalog: FactCatalog, now: datetime
) -> None:
    path = FIXTURES / "customers_bad.csv"
    report = import_customers(db, path, catalog, now)

    assert errors(report) == [
        f"{path}: row 2: line 3: email: 'not-an-email' is not an email address: "
        "An email address must have an @-sign.",
        f"{path}: row 3: line 4: phone: '12345' is not an international number (like "
        "+447700900123); write it with its country code, or set "
        "LIFECYCLE_DEFAULT_PHONE_REGION (e.g. GB) to read national numbers",
        f"{path}: row 4: line 5: timezone: 'Mars/Olympus_Mons' is not an IANA time zone "
        "like Europe/London",
        f"{path}: row 5: line 6: attributes.vip: expected bool (true/false, yes/no or 1/0), "
        "got 'maybe'",
        f"{path}: row 6: line 7: signed_up_at: Input should be a valid datetime or date, "
        "month value is outside expected range of 1-12",
        # line 8 is blank: not a row
        f"{path}: row 7: line 9: expected 13 columns as in the header, found 5",
        f"{path}: row 8: line 10: attributes.shoe_size: not declared in rules/catalog.yaml",
        f"{path}: row 9: line 11: attributes.birthday: expected date as YYYY-MM-DD, "
        "got '17/05/1990'",
        f"{path}: row 10: line 12: email: must not contain control characters: a line feed at character 6",
    ]
    assert [(e.row, e.path) for e in report.errors][:2] == [(2, str(path)), (3, str(path))]
    assert report.summary() == (
        f"{path}: 11 rows: 2 customers created, 0 updated, 0 unchanged, 9 bad rows"
    )
    stored = [row[0] for row in dump(db)["customers"]]
    assert stored == ["b-001", "b-011"]  # b-011 comes after a quoted two-line cell
    assert customer(db, "b-011").attributes == {
        "plan": "pro",
        "vip": True,
        "birthday": "2000-02-29",
    }


def test_bad_customer_rows_in_jsonl_are_reported_and_good_rows_kept(
    db: Engine, catalog: FactCatalog, now: datetime
) -> None:
    path = FIXTURES / "customers_bad.jsonl"
    report = import_customers(db, path, catalog, now)

    assert errors(report) == [
        f"{path}: row 2: attributes.favourite_colour: not declared in rules/catalog.yaml",
        f"{path}: row 3: attributes.vip: expected bool, got 'yes'; "
        "attributes.birthday: expected date, got '1990-02-30'",
        f"{path}: row 4: malformed JSON: Expecting property name enclosed in double quotes "
        "at column 47",
        f"{path}: row 5: expected a JSON object {{...}}, got an array",
        f"{path}: row 6: emial: Extra inputs are not permitted",
        f"{path}: row 7: signed_up_at: Input should be a valid datetime or date, "
        "invalid character in year",
    ]
    assert (report.rows, report.created) == (8, 2)  # line 8 is blank; rows are line numbers
    assert [row[0] for row in dump(db)["customers"]] == ["k-001", "k-009"]


def test_bad_event_rows_are_reported_and_good_rows_kept(
    db: Engine, catalog: FactCatalog, now: datetime
) -> None:
    import_customers(db, FIXTURES / "customers.csv", catalog, now)
    csv_path, jsonl_path = FIXTURES / "events_bad.csv", FIXTURES / "events_bad.jsonl"
    csv_report = import_events(db, csv_path, catalog, now)
    jsonl_report = import_events(db, jsonl_path, catalog, now)

    assert errors(csv_report) == [
        f"{csv_path}: row 2: line 3: type: unknown event type 'order_shipped' (did you mean "
        "'order_placed'?); declare it in rules/catalog.yaml",
        f"{csv_path}: row 3: line 4: customer_id: no customer with id 'nobody'",
        f"{csv_path}: row 4: line 5: properties.amount_cents: expected money in whole cents "
        "(4999 for $49.99), got '49.99'",
        f"{csv_path}: row 5: line 6: occurred_at: Input should be a valid datetime or date, "
        "input is too short",
        f"{csv_path}: row 6: line 7: properties.score: expected int (a whole number), got 'ten'",
        f"{csv_path}: row 8: line 9: type: String should match pattern '^[a-z][a-z0-9_]*$'",
    ]
    # Row 7 repeats row 1's id: a duplicate, not an error.
    assert (csv_report.rows, csv_report.created, csv_report.duplicates) == (9, 2, 1)
    assert errors(jsonl_report) == [
        f"{jsonl_path}: row 2: properties.amount_cents: expected money, got '49.99'",
        f"{jsonl_path}: row 3: customer_id: no customer with id 'ghost'",
        f"{jsonl_path}: row 4: malformed JSON: NaN is not a JSON value",
        f"{jsonl_path}: row 5: type: unknown event type 'refund'; declare it in rules/catalog.yaml",
        f"{jsonl_path}: row 6: malformed JSON: Expecting ',' delimiter at column 16",
        f"{jsonl_path}: row 7: occurred_at: Field required",
    ]
    assert [row[0] for row in dump(db)["events"]] == ["x-001", "x-008", "y-001", "y-008"]
    ada, chen = customer(db, "c-001"), customer(db, "c-003")
    assert (ada.orders_count, ada.total_spend_cents) == (1, 1_999)  # x-001 once, not twice
    assert (chen.nps_score, chen.last_activity_at) == (10, utc(2026, 2, 2, 15, 0))


def test_a_batch_the_database_refuses_is_retried_row_by_row(
    db: Engine, catalog: FactCatalog, now: datetime, tmp_path: Path
) -> None:
    import_customers(db, FIXTURES / "customers.csv", catalog, now)
    path = tmp_path / "events.csv"
    path.write_text(
        "id,customer_id,type,occurred_at,prop.amount_cents\n"
        "o-1,c-001,order_placed,2026-02-01T10:00:00Z,1000\n"
        "o-2,c-001,order_placed,2026-02-02T10:00:00Z,2000\n"
        "boom,c-001,order_placed,2026-02-03T10:00:00Z,4000\n"
        "o-3,c-002,order_placed,2026-02-04T10:00:00Z,8000\n"
    )
    with _refusing_trigger(db):
        report = import_events(db, path, catalog, now)

    assert errors(report) == [
        f"{path}: row 3: line 4: the database refused the row: refused by the test trigger"
    ]
    assert (report.created, report.duplicates) == (3, 0)
    assert [row[0] for row in dump(db)["events"]] == ["o-1", "o-2", "o-3"]
    ada = customer(db, "c-001")
    assert (ada.orders_count, ada.total_spend_cents) == (2, 3_000)  # folded once, not twice


class _refusing_trigger:
    """A real trigger that refuses the event with id 'boom' (a row-level database error)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"

    def __enter__(self) -> None:
        with self.engine.begin() as connection:
            if self.sqlite:
                connection.execute(
                    text(
                        "CREATE TRIGGER refuse_boom BEFORE INSERT ON events "
                        "WHEN NEW.id = 'boom' "
                        "BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END"
                    )
                )
                return
            connection.execute(
                text(
                    "CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN IF NEW.id = 'boom' THEN RAISE EXCEPTION 'refused by the test trigger' "
                    "USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$"
                )
            )
            connection.execute(
                text(
                    "CREATE TRIGGER refuse_boom BEFORE INSERT ON events "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_boom()"
                )
            )

    def __exit__(self, *exc: object) -> None:
        with self.engine.begin() as connection:
            if self.sqlite:
                connection.execute(text("DROP TRIGGER refuse_boom"))
            else:
                connection.execute(text("DROP TRIGGER refuse_boom ON events"))
                connection.execute(text("DROP FUNCTION refuse_boom()"))


def test_unusable_files_are_refused_before_any_row(
    db: Engine, catalog: FactCatalog, now: datetime, tmp_path: Path
) -> None:
    def refusal(run: Any, name: str, content: str | None) -> str:
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(ImportFileError) as caught:
            run(db, path, catalog, now)
        return str(caught.value)

    assert refusal(import_customers, "customers.xlsx", "id\n") == (
        f"{tmp_path}/customers.xlsx: unknown format '.xlsx': use .csv or .jsonl"
    )
    assert refusal(import_customers, "missing.csv", None) == f"{tmp_path}/missing.csv: no such file"
    assert refusal(import_customers, "empty.csv", "") == (
        f"{tmp_path}/empty.csv: the file is empty: it needs a header line"
    )
    assert refusal(
        import_customers, "typo.csv", "emial,attr.plan,attr.plna\nx@example.com,,\n"
    ) == (
        f"{tmp_path}/typo.csv: header (line 1): unknown column 'emial' (did you mean 'email'?); "
        "customers files have the columns id, email, phone, first_name, timezone, locale, "
        "email_opt_in, sms_opt_in, signed_up_at and attr.<name>; missing column id"
    )
    assert refusal(import_events, "events.csv", "id,customer_id,type,prop.score,id\n") == (
        f"{tmp_path}/events.csv: header (line 1): column 'id' appears more than once; "
        "missing column occurred_at"
    )
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("id,first_name\nc-1,Ana\nc-2,Jos\u00e9\n".encode("latin-1"))
    assert refusal(import_customers, "latin1.csv", None) == (
        f"{latin1}: line 3 is not UTF-8 text (invalid continuation byte at byte 8); "
        "save the file as UTF-8"
    )
    assert dump(db) == {"customers": [], "events": []}


# ---------------------------------------------------------------- idempotency and merging


def test_importing_the_same_files_again_changes_nothing(
    db: Engine, catalog: FactCatalog, now: datetime
) -> None:
    files = [
        (import_customers, "customers.csv"),
        (import_customers, "customers.jsonl"),
        (import_customers, "customers_bad.csv"),
        (import_events, "events.csv"),
        (import_events, "events.jsonl"),
        (import_events, "events_bad.csv"),
    ]
    first = [run(db, FIXTURES / name, catalog, now) for run, name in files]
    before = dump(db)

    again = [run(db, FIXTURES / name, catalog, now + timedelta(days=3)) for run, name in files]

    assert dump(db) == before
    assert [(r.created, r.updated, r.unchanged, r.duplicates) for r in again] == [
        (0, 0, 4, 0),
        (0, 0, 3, 0),
        (0, 0, 2, 0),
        (0, 0, 0, 5),
        (0, 0, 0, 3),
        (0, 0, 0, 3),  # x-001 twice and x-008
    ]
    assert [errors(r) for r in again] == [errors(r) for r in first]


def test_an_update_merges_and_keeps_what_the_file_does_not_say(
    db: Engine, catalog: FactCatalog, now: datetime, tmp_path: Path
) -> None:
    import_customers(db, FIXTURES / "customers.csv", catalog, now)
    later, latest = now + timedelta(days=1), now + timedelta(days=2)
    plans = tmp_path / "plans.csv"
    plans.write_text("id,attr.plan,email_opt_in\nc-001,pro,\nc-002,free,yes\n")

    report = import_customers(db, plans, catalog, later)

    assert (report.created, report.updated, report.unchanged) == (0, 1, 1)
    ada = customer(db, "c-001")
    assert ada.attributes == {
        "plan": "pro",
        "marketing_segment": "loyal",
        "vip": True,
        "birthday": "1990-05-17",
    }
    assert (ada.email_opt_in, ada.email_opt_in_at, ada.sms_opt_in) == (True, now, True)
    assert (ada.email, ada.timezone, ada.signed_up_at) == (
        "ada@example.com",
        "Europe/London",
        utc(2025, 11, 2, 9, 30),
    )
    assert (ada.changed_at, ada.updated_at, ada.created_at) == (later, later, now)
    bob = customer(db, "c-002")  # plan was already free, consent already given
    assert (bob.changed_at, bob.updated_at, bob.email_opt_in_at) == (now, now, now)

    opt_out = tmp_path / "opt_out.jsonl"
    opt_out.write_text('{"id": "c-001", "email_opt_in": false, "phone": null}\n')
    report = import_customers(db, opt_out, catalog, latest)

    assert report.updated == 1
    ada = customer(db, "c-001")
    assert (ada.email_opt_in, ada.email_opt_out_at, ada.phone) == (False, latest, None)
    assert (ada.sms_opt_in, ada.attributes["plan"], ada.changed_at) == (True, "pro", latest)


def test_a_new_customer_named_twice_in_one_file_is_created_once(
    db: Engine, catalog: FactCatalog, now: datetime, tmp_path: Path
) -> None:
    path = tmp_path / "twice.csv"
    path.write_text("id,first_name,attr.plan\nn-1,Nia,free\nn-1,,plus\nn-2,Noor,\n")

    report = import_customers(db, path, catalog, now)

    assert (report.created, report.updated, report.unchanged) == (2, 1, 0)
    nia = customer(db, "n-1")
    assert (nia.first_name, nia.attributes) == ("Nia", {"plan": "plus"})


# ---------------------------------------------------------------- progress and batches


def test_progress_reports_rows_done_out_of_the_total_batch_by_batch(
    db: Engine, catalog: FactCatalog, now: datetime, tmp_path: Path
) -> None:
    import_customers(db, FIXTURES / "customers.csv", catalog, now)
    path = tmp_path / "visits.jsonl"
    lines = [  # rows 21 to 25 send v-0 to v-4 again, identical: duplicates
        f'{{"id": "v-{n % 20}", "customer_id": "c-00{1 + n % 20 % 4}", "type": "site_visit", '
        f'"occurred_at": "2026-02-{1 + n % 20:02d}T10:00:00Z"}}'
        for n in range(25)
    ]
    path.write_text("\n".join(lines[:12]) + '\n{"id": \n' + "\n".join(lines[12:]) + "\n")
    calls: list[tuple[int, int]] = []

    report = import_events(
        db, path, catalog, now, progress=lambda *a: calls.append(a), batch_size=10
    )

    assert calls == [(0, 26), (10, 26), (20, 26), (26, 26)]
    assert (report.rows, report.created, report.duplicates, len(report.errors)) == (26, 20, 5, 1)
    assert errors(report) == [f"{path}: row 13: malformed JSON: Expecting value at column 8"]
    with Session(db) as session:
        visits = select(col(Event.customer_id)).where(col(Event.type) == "site_visit")
        assert sorted(set(session.scalars(visits))) == ["c-001", "c-002", "c-003", "c-004"]


def test_an_event_id_imported_again_with_a_different_payload_is_a_row_error(
    db: Engine, catalog: FactCatalog, now: datetime, tmp_path: Path
) -> None:
    """Against the database and within one file (in one batch and across batches), the
    same id with another payload is a bad row naming the row and the id; nothing changes."""
    import_customers(db, FIXTURES / "customers.csv", catalog, now)
    first = tmp_path / "first.jsonl"
    first.write_text(
        '{"id": "o-1", "customer_id": "c-001", "type": "order_placed", '
        '"occurred_at": "2026-02-01T10:00:00Z", "properties": {"amount_cents": 1000}}\n'
    )
    assert import_events(db, first, catalog, now).created == 1
    before = dump(db)
    again = tmp_path / "again.csv"
    again.write_text(
        "id,customer_id,type,occurred_at,prop.amount_cents\n"
        "o-1,c-001,order_placed,2026-02-01T11:00:00+01:00,1000\n"  # the same, spelt otherwise
        "o-1,c-001,order_placed,2026-02-01T10:00:00Z,1500\n"  # another amount
        "o-1,c-002,order_placed,2026-02-01T10:00:00Z,1000\n"  # another customer
        "o-2,c-002,order_placed,2026-02-03T10:00:00Z,2000\n"
        "o-2,c-002,order_placed,2026-02-04T10:00:00Z,2000\n"  # o-2 again, a day later
        "o-3,c-003,order_placed,2026-02-05T10:00:00Z,3000\n"
        "o-3,c-003,order_placed,2026-02-05T10:00:00Z,3000\n"  # o-3 again, identical
    )
    for batch_size in (1000, 2):
        with unit_of_work(db) as session:  # back to the state after the first file
            session.execute(delete(Event).where(col(Event.id).in_(["o-2", "o-3"])))
        report = import_events(db, again, catalog, now, batch_size=batch_size)
        assert errors(report) == [
            f"{again}: row 2: line 3: id: event 'o-1' was recorded before with a different "
            "payload (properties.amount_cents differs); nothing was changed: send a new event "
            "with a new id",
            f"{again}: row 3: line 4: id: event 'o-1' was recorded before with a different "
            "payload (customer_id differs); nothing was changed: send a new event with a new id",
            f"{again}: row 5: line 6: id: event 'o-2' was recorded before with a different "
            "payload (occurred_at differs); nothing was changed: send a new event with a new id",
        ], batch_size
        assert (report.rows, report.created, report.duplicates) == (7, 2, 2)
    events = dump(db)["events"]
    assert events[0] == before["events"][0]  # o-1 as first stored
    assert [row[0] for row in events] == ["o-1", "o-2", "o-3"]
    assert events[1][4] == utc(2026, 2, 3, 10)  # o-2 as first sent, not as re-sent
    ada = customer(db, "c-001")
    assert (ada.orders_count, ada.total_spend_cents) == (1, 1000)  # o-1 folded once

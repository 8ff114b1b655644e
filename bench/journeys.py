"""The journey core's benchmark: seed, sweeps and an incremental tick, each next to its floor.

One chain per database, every step in a fresh process (``python -m bench.journeys STEP
URL ...``, one JSON object printed), on one database seeded once:

    seed         ``lifecycle seed --customers N`` as a user runs it
    dry          the floor of reading and evaluating: the same facts read and evaluated
                 by the same shards and workers, nothing written (the evaluate path)
    first        the first full sweep: every playbook enrolling, decisions and outbox
                 rows written
    bare         the floor of writing: as many rows as the first sweep wrote, to the
                 same tables, by bare executemany (COPY on PostgreSQL) of copies of rows
                 it wrote, into an empty schema
    steady       a full sweep an hour later, nothing new to do (floor: dry again, on the
                 swept database)
    incremental  an incremental tick after N customers each placed an order (floor: the
                 same customers read and evaluated, and its rows inserted bare)

Every figure is printed next to its floor and as a ratio to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import NOW, ROOT, RULES, TEMPLATES, peak_mb, start_sampling

TABLES = ("enrollments", "messages", "decisions", "escalations", "escalation_history")
STEADY_AT = NOW + timedelta(hours=1)
CHANGED_AT = STEADY_AT + timedelta(minutes=30)
INCREMENTAL_AT = CHANGED_AT + timedelta(minutes=1)


def _environment(url: str) -> dict[str, str]:
    return {
        **os.environ,
        "LIFECYCLE_DATABASE_URL": url,
        "LIFECYCLE_RULES_DIR": str(RULES),
        "LIFECYCLE_TEMPLATES_DIR": str(TEMPLATES),
    }


def _app(url: str) -> Any:
    from engine.bootstrap import bootstrap
    from engine.settings import Settings

    return bootstrap(
        Settings(database_url=url, rules_dir=RULES, templates_dir=TEMPLATES),
        channels={},
        migrate=False,
    )


def _counts(url: str) -> dict[str, int]:
    from sqlalchemy import text

    from engine.data.db import make_engine

    db = make_engine(url)
    with db.connect() as connection:
        counts = {
            t: int(connection.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
            for t in TABLES
        }
    db.dispose()
    return counts


def _workers() -> int:
    from engine.evaluation.workers import default_workers

    return default_workers()


# ---------------------------------------------------------------- steps


def step_seed(url: str, customers: int) -> dict[str, Any]:
    """The command a user runs, as a process of its own (its peak memory is the tree's)."""
    command = [sys.executable, "-c", "from engine.cli import app; app()"]
    subprocess.run(
        [*command, "init"], env=_environment(url), cwd=ROOT, check=True, capture_output=True
    )
    started = time.perf_counter()
    subprocess.run(
        [*command, "seed", "--customers", str(customers), "--now", NOW.isoformat()],
        env=_environment(url),
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - started
    return {"customers": customers, "seconds": round(seconds, 2), **peak_mb()}


def step_dry(url: str, ids: list[str] | None = None) -> dict[str, Any]:
    """Read and evaluate everyone (or ``ids``) as a sweep does, writing nothing."""
    from engine.runners.shards import run_shards, shards_of, shards_of_everyone

    app = _app(url)
    rules = app.rules
    size = app.settings.batch_size
    workers = _workers() if ids is None else 0
    started = time.perf_counter()
    shards = shards_of_everyone(app.db, size) if ids is None else shards_of(ids, size)
    result = run_shards(app.db, rules, shards, NOW, write=False, workers=workers)
    seconds = time.perf_counter() - started
    app.db.dispose()
    return {
        "customers": result.customers,
        "subjects": result.summary.subjects,
        "workers": workers,
        "seconds": round(seconds, 2),
        **peak_mb(),
    }


def step_sweep(url: str, at: str, full: str) -> dict[str, Any]:
    """One evaluation tick (``full`` or incremental) with the default workers."""
    from datetime import datetime

    from engine.runners.ticks import evaluation_tick

    app = _app(url)
    before = _counts(url)
    started = time.perf_counter()
    report = evaluation_tick(app, datetime.fromisoformat(at), full=full == "full")
    seconds = time.perf_counter() - started
    after = _counts(url)
    app.db.dispose()
    journeys = report.journeys
    return {
        "customers": report.customers,
        "seconds": round(seconds, 2),
        "enrolled": journeys.total("enrolled"),
        "queued": journeys.total("queued"),
        "lost_races": journeys.lost_races,
        "rows_written": {t: after[t] - before[t] for t in TABLES},
        **peak_mb(),
    }


def step_changes(url: str, changed: int) -> dict[str, Any]:
    """``changed`` customers, spread over the ids, each place an order (not timed)."""
    from engine.data.ingest import EventIn, record_events
    from engine.data.uow import unit_of_work

    app = _app(url)
    with unit_of_work(app.db) as session:
        total = int(
            session.connection().exec_driver_sql("SELECT count(*) FROM customers").scalar_one()
        )
    step = max(1, total // changed)
    ids = [f"seed-{n:08d}" for n in range(1, total + 1, step)][:changed]
    for start in range(0, len(ids), 2000):
        with unit_of_work(app.db) as session:
            record_events(
                session,
                [
                    EventIn(
                        id=f"bench-order-{start + i}",
                        customer_id=cid,
                        type="order_placed",
                        occurred_at=CHANGED_AT,
                        properties={"amount_cents": 2500},
                    )
                    for i, cid in enumerate(ids[start : start + 2000])
                ],
                CHANGED_AT,
            )
    app.db.dispose()
    return {"changed": len(ids), "ids": ids}


def step_bare(source_url: str, empty_url: str, rows: str) -> dict[str, Any]:
    """Insert ``rows`` ({table: count}) into the empty database by the driver's bare
    executemany (COPY on PostgreSQL), copying rows the sweep wrote (new keys)."""
    from sqlalchemy import bindparam, text

    from engine.data.db import make_engine

    wanted: dict[str, int] = json.loads(rows)
    source, target = make_engine(source_url), make_engine(empty_url)
    samples: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = {}
    with source.connect() as connection:
        for table, count in wanted.items():
            if count:
                result = connection.execute(text(f"SELECT * FROM {table} LIMIT 2000"))
                samples[table] = (list(result.keys()), [tuple(r) for r in result])
        referenced = sorted(
            {
                row[columns.index("customer_id")]
                for columns, sample in samples.values()
                if "customer_id" in columns
                for row in sample
            }
            - {None}
        )
        customers = connection.execute(
            text("SELECT * FROM customers WHERE id IN :ids").bindparams(
                bindparam("ids", expanding=True)
            ),
            {"ids": referenced},
        )
        customer_columns, customer_rows = list(customers.keys()), [tuple(r) for r in customers]
    cases = wanted.get("escalations", 0) if "escalations" in samples else 0
    copies = {
        table: _copies(columns, sample, wanted[table], cases)
        for table, (columns, sample) in samples.items()
    }
    with target.begin() as connection:  # not timed: what the copies refer to, on a clean slate
        for table in (*reversed(TABLES), "customers"):
            connection.execute(text(f"DELETE FROM {table}"))
        driver: Any = connection.connection.dbapi_connection
        _bare_insert(driver, target.dialect.name, "customers", customer_columns, customer_rows)
    started = time.perf_counter()
    with target.begin() as connection:
        driver = connection.connection.dbapi_connection
        for table in TABLES:
            if table in samples:
                columns, _ = samples[table]
                _bare_insert(driver, target.dialect.name, table, columns, copies[table])
    seconds = time.perf_counter() - started
    source.dispose()
    target.dispose()
    return {
        "rows": {t: len(c) for t, c in copies.items()},
        "seconds": round(seconds, 2),
        **peak_mb(),
    }


def _copies(
    columns: list[str], sample: list[tuple[Any, ...]], count: int, cases: int
) -> list[tuple[Any, ...]]:
    """``count`` rows like ``sample``, with unique ids and keys; references to rows the
    copies do not have are dropped (messages' enrollment) or pointed at copied ones (a
    case's history at the ``cases`` copied cases, ids 1 to ``cases``)."""
    out: list[tuple[Any, ...]] = []
    unique = {"id", "dedupe_key", "active_key"}
    for n in range(count):
        row = list(sample[n % len(sample)])
        for i, name in enumerate(columns):
            if name == "id":
                # The same width as the originals: an integer, or a uuid's 36 characters.
                row[i] = n + 1 if isinstance(row[i], int) else str(uuid.UUID(int=n + 1))
            elif name in unique and row[i] is not None:
                row[i] = f"{row[i]}-{n}"
            elif name == "entry_number":
                row[i] = n + 1
            elif name == "enrollment_id":
                row[i] = None
            elif name == "escalation_id":
                row[i] = 1 + n % cases if cases and row[i] is not None else None
        out.append(tuple(row))
    return out


def _bare_insert(
    driver: Any, dialect: str, table: str, columns: list[str], rows: list[tuple[Any, ...]]
) -> None:
    names = ", ".join(f'"{c}"' for c in columns)
    if dialect == "sqlite":
        marks = ", ".join("?" for _ in columns)
        driver.cursor().executemany(f'INSERT INTO "{table}" ({names}) VALUES ({marks})', rows)
        return
    from psycopg.types.json import Json

    with driver.cursor() as cursor, cursor.copy(f'COPY "{table}" ({names}) FROM STDIN') as copy:
        for row in rows:
            copy.write_row([Json(v) if isinstance(v, dict | list) else v for v in row])


STEPS = {
    "seed": lambda a: step_seed(a[0], int(a[1])),
    # the changed ids come in a file: 10,000 of them outgrow one argument (128 KiB on Linux)
    "dry": lambda a: step_dry(a[0], json.loads(Path(a[1]).read_text()) if len(a) > 1 else None),
    "sweep": lambda a: step_sweep(a[0], a[1], a[2]),
    "changes": lambda a: step_changes(a[0], int(a[1])),
    "bare": lambda a: step_bare(a[0], a[1], a[2]),
}


def run_step(*args: str) -> dict[str, Any]:
    print(f"  journeys {args[0]} ...", file=sys.stderr, flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "bench.journeys", *args], cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"bench step {args[0]} failed:\n{result.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    if "seconds" in data:  # a figure as it comes, so a failure later does not hide it
        print(f"  journeys {args[0]}: {data['seconds']:.2f} s", file=sys.stderr, flush=True)
    return data


def chain(database: str, customers: int, changed: int) -> list[dict[str, Any]]:
    """Every journey case on one database; returns bench.json entries."""
    import tempfile

    from bench.common import database as make_database
    from bench.common import drop_database
    from engine.data.db import make_engine, upgrade

    workdir = Path(tempfile.mkdtemp(prefix="bench-journeys-"))
    url = make_database(database, workdir)
    empty_dir = Path(tempfile.mkdtemp(prefix="bench-empty-"))
    empty = make_database(database, empty_dir)
    try:
        seeded = run_step("seed", url, str(customers))
        dry = run_step("dry", url)
        first = run_step("sweep", url, NOW.isoformat(), "full")
        engine = make_engine(empty)
        upgrade(engine)
        engine.dispose()
        bare = run_step("bare", url, empty, json.dumps(first["rows_written"]))
        steady_floor = run_step("dry", url)
        steady = run_step("sweep", url, STEADY_AT.isoformat(), "full")
        changes = run_step("changes", url, str(changed))
        changed_ids = workdir / "changed-ids.json"
        changed_ids.write_text(json.dumps(changes["ids"]))
        incremental_floor = run_step("dry", url, str(changed_ids))
        incremental = run_step("sweep", url, INCREMENTAL_AT.isoformat(), "incremental")
        bare_incremental = run_step("bare", url, empty, json.dumps(incremental["rows_written"]))
    finally:
        drop_database(database, url, workdir)
        drop_database(database, empty, empty_dir)
    first_floor = dry["seconds"] + bare["seconds"]
    incremental_floor_s = incremental_floor["seconds"] + bare_incremental["seconds"]
    return [
        _entry("seed", database, customers, seeded, None, {}),
        _entry("dry evaluation", database, customers, dry, None, {"subjects": dry["subjects"]}),
        _entry(
            "first full sweep",
            database,
            customers,
            first,
            first_floor,
            {
                "enrolled": first["enrolled"],
                "queued": first["queued"],
                "rows_written": first["rows_written"],
                "floor": f"dry evaluation {dry['seconds']} s + bare inserts {bare['seconds']} s",
            },
        ),
        _entry(
            "steady full sweep",
            database,
            customers,
            steady,
            steady_floor["seconds"],
            {
                "floor": "dry evaluation of the swept database",
                "rows_written": steady["rows_written"],
            },
        ),
        _entry(
            "incremental tick",
            database,
            customers,
            incremental,
            incremental_floor_s,
            {
                "changed": changes["changed"],
                "looked_at": incremental["customers"],
                "rows_written": incremental["rows_written"],
                "floor": f"those customers read and evaluated {incremental_floor['seconds']} s + "
                f"bare inserts {bare_incremental['seconds']} s",
            },
        ),
    ]


def _entry(
    case: str,
    database: str,
    customers: int,
    measured: dict[str, Any],
    floor: float | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "case": case,
        "database": database,
        "customers": customers,
        "seconds": measured["seconds"],
        "peak_mb": measured["peak_total_mb"],
        **extra,
    }
    if floor is not None:
        entry["floor_seconds"] = round(floor, 2)
        entry["ratio_to_floor"] = round(measured["seconds"] / floor, 2) if floor else None
    return entry


if __name__ == "__main__":
    start_sampling()
    print(json.dumps(STEPS[sys.argv[1]](sys.argv[2:])))

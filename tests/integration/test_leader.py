"""One scheduler at a time (engine.runners.leader): the PostgreSQL advisory lock is held by
the first, waited for by the second, released when the first's session ends, however it
ends; a holder whose session is gone stops planning."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from engine.bootstrap import bootstrap
from engine.data.db import make_engine, normalize_url
from engine.errors import ConfigurationError
from engine.runners.leader import Leadership
from engine.settings import Settings
from scheduler import LifecycleScheduler
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES


@pytest.fixture
def engines(postgres_schema_url: str) -> Iterator[list[Engine]]:
    made = [make_engine(postgres_schema_url) for _ in range(2)]
    yield made
    for engine in made:
        engine.dispose()


@pytest.mark.postgres
def test_the_second_scheduler_waits_and_takes_over(engines: list[Engine]) -> None:
    first, second = Leadership(engines[0], poll=0.05), Leadership(engines[1], poll=0.05)
    never = threading.Event()
    assert first.acquire(never)
    assert not second._try()  # held by the first
    taken = threading.Event()
    waiter = threading.Thread(target=lambda: second.acquire(never) and taken.set())
    waiter.start()
    assert not taken.wait(0.3)
    first.release()  # the first's session ends: as when its process dies
    waiter.join(timeout=10)
    assert taken.is_set() and second.alive()
    second.release()


@pytest.mark.postgres
def test_waiting_stops_when_asked(engines: list[Engine]) -> None:
    first, second = Leadership(engines[0]), Leadership(engines[1], poll=0.05)
    assert first.acquire(threading.Event())
    stopped = threading.Event()
    stopped.set()
    assert second.acquire(stopped) is False
    first.release()


@pytest.mark.postgres
def test_a_scheduler_whose_lock_session_dies_stops(
    engines: list[Engine], postgres_schema_url: str
) -> None:
    leadership = Leadership(engines[0])
    assert leadership.acquire(threading.Event())
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=postgres_schema_url,
        rules_dir=FIXTURE_RULES,
        templates_dir=FIXTURE_TEMPLATES,
    )
    app = bootstrap(settings, db=engines[1], channels={}, migrate=False)
    scheduler = LifecycleScheduler(app, leadership=leadership)
    scheduler.check_leadership()
    assert not scheduler.lost_leadership
    # The server ends the lock's session (a network cut, an admin, a failover).
    admin = create_engine(normalize_url(postgres_schema_url.split("?", 1)[0]))
    with admin.begin() as connection:
        ended = connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks "
                "WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()"
                " AND objid = hashtext(current_database() || '.' || :schema)::oid"
            ),
            {"schema": postgres_schema_url.rsplit("%3D", 1)[1]},
        ).all()
    admin.dispose()
    assert ended == [(True,)]
    scheduler.check_leadership()
    assert scheduler.lost_leadership and scheduler.stopped.is_set()
    leadership.release()


def test_the_dramatiq_runner_refuses_sqlite(tmp_path: Path) -> None:
    db = make_engine(f"sqlite:///{tmp_path / 'lifecycle.db'}")
    with pytest.raises(ConfigurationError) as refused:
        Leadership(db)
    db.dispose()
    assert str(refused.value).startswith(
        "setting LIFECYCLE_DATABASE_URL: the dramatiq runner needs PostgreSQL"
    )

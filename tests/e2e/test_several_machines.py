"""The README's "Running on several machines" example, run as written: its `lifecycle`
lines against the local PostgreSQL and RabbitMQ (their URLs in place of the example's
hosts): one scheduler and a standby, two workers; a sign-up imported, its welcome email
queued by a worker within seconds (the real-time path), and `status` seeing both workers."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text

from engine.data.db import make_engine
from tests.conftest import TABLES
from tests.support.cluster import LIFECYCLE, RABBITMQ_URL, Cluster, broker_problem, wait_until
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES, ROOT


def readme_example() -> tuple[dict[str, str], list[list[str]]]:
    """The example's exported settings and its `lifecycle` command lines."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running on several machines", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    settings: dict[str, str] = {}
    commands: list[list[str]] = []
    for line in block.group(1).splitlines():
        code = line.split("#", 1)[0].strip()
        if code.startswith("export "):
            name, value = code[len("export ") :].split("=", 1)
            settings[name] = value
        elif code.startswith("lifecycle "):
            commands.append(shlex.split(code)[1:])
    return settings, commands


@pytest.mark.postgres
@pytest.mark.slow
def test_the_readme_cluster_runs_as_written(postgres_schema_url: str, tmp_path: Path) -> None:
    problem = broker_problem(RABBITMQ_URL, "RabbitMQ")
    if problem is not None:
        pytest.fail(problem)
    db = make_engine(postgres_schema_url)
    with db.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    settings, commands = readme_example()
    assert settings == {
        "LIFECYCLE_DATABASE_URL": "postgresql://lifecycle@db.internal/lifecycle",
        "LIFECYCLE_RUNNER": "dramatiq",
        "LIFECYCLE_BROKER_URL": "amqp://guest:guest@rabbitmq.internal:5672/",
    }
    assert [c[0] for c in commands] == ["init", "run", "run", "worker", "status"]
    here = {
        **settings,
        "LIFECYCLE_DATABASE_URL": postgres_schema_url,
        "LIFECYCLE_BROKER_URL": RABBITMQ_URL,
        "LIFECYCLE_QUEUE_PREFIX": f"t{uuid.uuid4().hex[:10]}",  # this test's own queues
        "LIFECYCLE_RULES_DIR": str(FIXTURE_RULES),
        "LIFECYCLE_TEMPLATES_DIR": str(FIXTURE_TEMPLATES),
        "LIFECYCLE_OUTBOX_DIR": str(tmp_path / "outbox"),
        "PATH": "/usr/bin:/bin",
        "COLUMNS": "200",
    }
    cluster = Cluster(here, tmp_path / "logs")

    def once(args: list[str]) -> str:
        done = subprocess.run(
            [*LIFECYCLE, *args], cwd=ROOT, env=here, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    try:
        once(commands[0])  # init
        cluster.start("scheduler", *commands[1])
        cluster.wait_for_log("scheduler", "scheduler lock acquired", 60)
        cluster.start("standby", *commands[2])
        cluster.wait_for_log("standby", "waiting to take over", 60)
        for name in ("worker-1", "worker-2"):  # "machines 3 and 4"
            cluster.start(name, *commands[3])
        for name in ("worker-1", "worker-2"):
            cluster.wait_for_log(name, "lifecycle worker", 60)
        now = datetime.now(UTC).isoformat()
        customers = tmp_path / "customers.csv"
        customers.write_text(
            "id,email,first_name,timezone,email_opt_in,signed_up_at\n"
            f"ada,ada@example.com,Ada,Europe/London,yes,{now}\n"
        )
        events = tmp_path / "events.csv"
        events.write_text(f"id,customer_id,type,occurred_at\nev-ada-1,ada,signed_up,{now}\n")
        once(["import", "customers", str(customers)])
        once(["import", "events", str(events)])

        def welcomed() -> bool:
            with db.connect() as connection:
                return bool(
                    connection.execute(
                        text(
                            "SELECT COUNT(*) FROM messages WHERE customer_id = 'ada' "
                            "AND playbook = 'welcome_series'"
                        )
                    ).scalar_one()
                )

        wait_until(welcomed, 30, "the welcome email to be queued")
        report = json.loads(once([*commands[4], "--json"]))
        assert report["runner"] == "dramatiq"
        assert len(report["workers"]) == 2
        assert report["pending_events"] == 0
        assert report["last_ticks"]["realtime"]["ran_at"] is not None
        assert set(report["queues"]) == {
            f"{here['LIFECYCLE_QUEUE_PREFIX']}-{kind}"
            for kind in ("realtime", "dispatch", "sla", "evaluate")
        }
    finally:
        cluster.stop()
        db.dispose()
        from tests.support.cluster import delete_queues

        prefix = here["LIFECYCLE_QUEUE_PREFIX"]
        delete_queues(
            RABBITMQ_URL, [f"{prefix}-{k}" for k in ("realtime", "dispatch", "sla", "evaluate")]
        )

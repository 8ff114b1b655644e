"""``make bench-lifecycle``: what stages cost the sweep, and the lifecycle report at scale.

On SQLite, N seeded customers (BENCH_LIFECYCLE_CUSTOMERS, default 100,000):

    sweep overhead  the first full sweep and a steady one an hour later, on two copies of
                    one seeded database: the benchmark's fixture playbooks without a
                    stage model, and the same playbooks with rules/stages.yaml (every
                    customer's stage decided, and recorded when it changes). Each sweep
                    runs in a fresh process; BENCH_LIFECYCLE_ROUNDS pairs, alternating.
    simulation      ``lifecycle simulate --days 30 --activity synthetic`` with the shipped
                    rules, on the swept copy with stages (kept with --work-db)
    report          ``lifecycle report lifecycle --json`` on the simulated database, as a
                    process (wall time, start-up included), then checked: the stage
                    counts sum to the customers, and every figure agrees with the plain
                    SQL of tests/support/kpi_oracle.py (the latest 6 cohorts' cells)

BENCH_LIFECYCLE_REPORT=0 measures the sweeps alone. Prints one JSON object; the figures
go in the README ("Lifecycle KPIs").
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from bench.common import NOW, ROOT, RULES, TEMPLATES

SHIPPED_RULES = ROOT / "rules"
SHIPPED_TEMPLATES = ROOT / "templates" / "messages"
DAYS = 30
SIM_START = NOW + timedelta(days=1)
COHORTS_CHECKED = 6


def _env(url: str, rules: Path, templates: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LIFECYCLE_DATABASE_URL": url,
        "LIFECYCLE_RULES_DIR": str(rules),
        "LIFECYCLE_TEMPLATES_DIR": str(templates),
    }


def _cli(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    command = [sys.executable, "-c", "from engine.cli import app; app()", *args]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"lifecycle {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def _copy(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database (its WAL folded in)."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


def step_sweep(url: str, rules: str, at: str) -> dict[str, Any]:
    """One full evaluation tick with the default workers, in this (fresh) process."""
    from engine.bootstrap import bootstrap
    from engine.runners.ticks import evaluation_tick
    from engine.settings import Settings

    app = bootstrap(
        Settings(database_url=url, rules_dir=Path(rules), templates_dir=TEMPLATES),
        channels={},
        migrate=False,
    )
    # BENCH_LIFECYCLE_WORKERS=0: the sweep in this process alone, so that its CPU time
    # (which a busy machine does not inflate the way it does wall time) is all of it.
    workers = os.environ.get("BENCH_LIFECYCLE_WORKERS")
    cpu = time.process_time()
    started = time.perf_counter()
    report = evaluation_tick(
        app,
        datetime.fromisoformat(at),
        full=True,
        workers=int(workers) if workers is not None else None,
    )
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    app.db.dispose()
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "customers": report.customers,
        "stage_changes": report.journeys.total("stage"),
        "enrolled": report.journeys.total("enrolled"),
    }


def _sweep(url: str, rules: Path, at: datetime) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.lifecycle_report", "sweep", url, str(rules), at.isoformat()],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"sweep failed:\n{done.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return data


def _check(url: str, document: dict[str, Any]) -> dict[str, Any]:
    from sqlmodel import Session

    from engine.data.db import make_engine
    from tests.support.kpi_oracle import oracle, reported

    since = datetime.fromisoformat(document["since"])
    until = datetime.fromisoformat(document["until"])
    db = make_engine(url)
    started = time.perf_counter()
    with Session(db) as session:
        expected = oracle(session, since, until, cohorts=COHORTS_CHECKED)
    seconds = time.perf_counter() - started
    db.dispose()
    got = reported(document, cohorts=COHORTS_CHECKED)
    differences = sorted(k for k in expected if expected[k] != got[k])
    return {
        "stage_counts_sum": sum(s["customers"] for s in document["stages"]),
        "customers": document["customers"],
        "agrees_with_plain_sql": not differences,
        "differences": {k: {"report": got[k], "sql": expected[k]} for k in differences},
        "oracle_seconds": round(seconds, 1),
    }


def main() -> None:
    customers = int(os.environ.get("BENCH_LIFECYCLE_CUSTOMERS", "100000"))
    rounds = int(os.environ.get("BENCH_LIFECYCLE_ROUNDS", "1"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-lifecycle-"))
    load = [round(x, 2) for x in os.getloadavg()]
    try:
        with_stages = workdir / "rules-with-stages"
        shutil.copytree(RULES, with_stages)
        shutil.copy(SHIPPED_RULES / "stages.yaml", with_stages / "stages.yaml")
        base = workdir / "base.db"
        env = _env(f"sqlite:///{base}", RULES, TEMPLATES)
        _cli(["init"], env)
        seed_seconds, _ = _cli(
            ["seed", "--customers", str(customers), "--now", NOW.isoformat()], env
        )
        sweeps: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
        for n in range(rounds):
            order = [("without", RULES), ("with", with_stages)]
            for name, rules in order if n % 2 == 0 else reversed(order):
                copy = workdir / f"{name}-{n}.db"
                _copy(base, copy)
                url = f"sqlite:///{copy}"
                first = _sweep(url, rules, NOW)
                steady = _sweep(url, rules, NOW + timedelta(hours=1))
                sweeps[name].append({"first": first, "steady": steady, "db": str(copy)})

        # Wall time, or with BENCH_LIFECYCLE_WORKERS=0 the CPU time of the one process.
        measure = "cpu_seconds" if os.environ.get("BENCH_LIFECYCLE_WORKERS") == "0" else "seconds"

        def best(name: str, kind: str) -> float:
            return float(min(s[kind][measure] for s in sweeps[name]))

        overhead = {
            kind: {
                "measure": measure,
                "without_stages_s": best("without", kind),
                "with_stages_s": best("with", kind),
                "overhead": round(best("with", kind) / best("without", kind) - 1, 3),
                "stage_changes": sweeps["with"][0][kind]["stage_changes"],
            }
            for kind in ("first", "steady")
        }
        if os.environ.get("BENCH_LIFECYCLE_REPORT", "1") == "0":
            print(
                json.dumps(
                    {
                        "case": "lifecycle sweeps",
                        "customers": customers,
                        "sweep": overhead,
                        "rounds": rounds,
                        "runs": {
                            k: [(r["first"][measure], r["steady"][measure]) for r in v]
                            for k, v in sweeps.items()
                        },
                        "load_before": load,
                        "load_after": [round(x, 2) for x in os.getloadavg()],
                    }
                )
            )
            return
        swept = Path(sweeps["with"][0]["db"])
        simulated = workdir / "simulated.db"
        sim_env = _env(f"sqlite:///{swept}", SHIPPED_RULES, SHIPPED_TEMPLATES)
        sim_seconds, _ = _cli(
            [
                "simulate",
                "--days",
                str(DAYS),
                "--start",
                SIM_START.isoformat(),
                "--activity",
                "synthetic",
                "--work-db",
                str(simulated),
            ],
            sim_env,
        )
        until = SIM_START + timedelta(days=DAYS)
        report_env = _env(f"sqlite:///{simulated}", SHIPPED_RULES, SHIPPED_TEMPLATES)
        report_seconds, stdout = _cli(
            ["report", "lifecycle", "--json", "--until", until.isoformat()], report_env
        )
        document = json.loads(stdout)
        check = _check(f"sqlite:///{simulated}", document)
        print(
            json.dumps(
                {
                    "case": "lifecycle",
                    "customers": customers,
                    "seed_seconds": round(seed_seconds, 1),
                    "sweep": overhead,
                    "rounds": rounds,
                    "runs": {
                        k: [(r["first"][measure], r["steady"][measure]) for r in v]
                        for k, v in sweeps.items()
                    },
                    "simulate_30_days_seconds": round(sim_seconds, 1),
                    "report_json_seconds": round(report_seconds, 2),
                    "report_target": "≤ 10 s",
                    "orders_in_period": document["orders"]["orders"],
                    **check,
                    "load_before": load,
                    "load_after": [round(x, 2) for x in os.getloadavg()],
                }
            )
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "sweep":
        print(json.dumps(step_sweep(sys.argv[2], sys.argv[3], sys.argv[4])))
    else:
        main()

"""``make bench``: every benchmark case in its own process; a table printed, JSON written.

Sizes come from the environment (the Makefile passes its variables through), so a quick
run and the full one are the same code:

    BENCH_CUSTOMERS=1000000           the journey core: seed, sweeps, incremental tick
    BENCH_DATABASES=sqlite,postgres   ... on each of these
    BENCH_CHANGED=10000               customers changed before the incremental tick
    BENCH_EVAL_SIZES=100000           evaluation alone (durable_rules and reference)
    BENCH_DISPATCH=2000               messages per channel through the fake provider
    BENCH_RENDER=5000                 template renders
    BENCH_INGEST=2000                 ingest API requests under load, per database (0: skip)
    BENCH_SOAK=0                      evaluations in the soak (make soak sets 10,000,000)
    BENCH_DISTRIBUTED=100000          a full sweep inline vs two Dramatiq workers (0: skip)
    BENCH_LATENCY_S=60                event-to-queued-message at BENCH_LATENCY_RATE=100
                                      events/s: inline on SQLite, dramatiq on PostgreSQL

``--readme`` also rewrites the performance block of README.md with the table;
``--readme-from bench-results/bench.json`` rewrites it from an earlier run's figures
without running anything (a full run takes twenty minutes). The machine's load average is recorded before and after: figures from a busy machine say
little, and the table says how busy it was.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.journeys import chain

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    ("first full sweep", "sqlite"): "1M in ≤ 60 s, ≤ 500 MB; within 2× of its floor",
    ("steady full sweep", "sqlite"): "1M in ≤ 20 s",
    ("incremental tick", "sqlite"): "10k of 1M in ≤ 2 s",
    ("seed", "sqlite"): "1M in ≤ 90 s",
    ("first full sweep", "postgres"): "≤ 1.5× SQLite",
    ("steady full sweep", "postgres"): "≤ 1.5× SQLite",
    ("incremental tick", "postgres"): "≤ 1.5× SQLite",
}


def _sizes(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",") if x.strip() and int(x)]


def run_case(module: str, *args: str) -> dict[str, Any]:
    print(f"  running {module} {' '.join(args)} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"bench case {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    data["case_wall_seconds"] = round(time.perf_counter() - started, 1)
    return data


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    if "--readme-from" in sys.argv:
        saved = Path(sys.argv[sys.argv.index("--readme-from") + 1])
        update_readme(render(json.loads(saved.read_text())))
        print(f"README.md's performance table rewritten from {saved}")
        return
    started_load = _load()
    results: list[dict[str, Any]] = []
    changed = _sizes("BENCH_CHANGED", "10000")[0]
    databases = [d.strip() for d in os.environ.get("BENCH_DATABASES", "sqlite,postgres").split(",")]
    for customers in _sizes("BENCH_CUSTOMERS", "1000000"):
        for database in databases:
            results.extend(chain(database, customers, min(changed, customers)))
    workers = str(os.cpu_count() or 1)
    for size in _sizes("BENCH_EVAL_SIZES", "100000"):
        results.append(run_case("bench.cases", "evaluate", str(size), "durable", "0"))
        results.append(run_case("bench.cases", "evaluate", str(size), "reference", "0"))
        results.append(run_case("bench.cases", "evaluate", str(size), "durable", workers))
    for count in _sizes("BENCH_DISPATCH", "2000"):
        results.append(run_case("bench.cases", "dispatch", str(count)))
    for count in _sizes("BENCH_RENDER", "5000"):
        results.append(run_case("bench.cases", "render", str(count)))
    for count in _sizes("BENCH_INGEST", "2000"):
        for database in databases:
            results.append(_ingest_load(database, count))
    for count in _sizes("BENCH_SOAK", "0"):
        results.append(run_case("bench.cases", "soak", str(count), workers))
    for count in _sizes("BENCH_DISTRIBUTED", "100000"):
        results.append(run_case("bench.distributed", "sweep", "--customers", str(count)))
    rate = os.environ.get("BENCH_LATENCY_RATE", "100")
    for seconds in _sizes("BENCH_LATENCY_S", "60"):
        for runner in ("inline", "dramatiq"):
            results.append(
                run_case(
                    "bench.distributed",
                    "latency",
                    "--runner",
                    runner,
                    "--rate",
                    rate,
                    "--seconds",
                    str(seconds),
                )
            )
    report = {
        "machine": f"{platform.node()} · {os.cpu_count()} cores · Python {platform.python_version()}",
        "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before": started_load,
        "load_average_after": _load(),
        "results": results,
    }
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    table = render(report)
    print(table)
    print(f"\n(written to {out / 'bench.json'})")
    if "--readme" in sys.argv:
        update_readme(table)


def _ingest_load(database: str, requests: int) -> dict[str, Any]:
    print(f"  running bench.ingest_load --database {database} ...", file=sys.stderr, flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.ingest_load",
            "--database",
            database,
            "--requests",
            str(requests),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    saved = json.loads((ROOT / "bench-results" / "ingest_load.json").read_text())
    return {"case": "ingest under load", **saved[database]}


def render(report: dict[str, Any]) -> str:
    load = report["load_average_before"]
    lines = [
        f"Measured {report['at']} on {report['machine']}; load average "
        f"{load[0]} at the start, {report['load_average_after'][0]} at the end.",
        "",
        "| what | figure | floor (same run) | target |",
        "|---|---|---|---|",
    ]
    sqlite = {r["case"]: r for r in report["results"] if r.get("database") == "sqlite"}
    for r in report["results"]:
        lines.append(_row(r, sqlite))
    return "\n".join(line for line in lines if line)


def _row(r: dict[str, Any], sqlite: dict[str, dict[str, Any]]) -> str:
    case = r["case"]
    if case in (
        "seed",
        "dry evaluation",
        "first full sweep",
        "steady full sweep",
        "incremental tick",
    ):
        db, n = r["database"], r["customers"]
        what = f"{case}, {db}, {n:,} customers"
        if case == "first full sweep":
            rows = sum(r["rows_written"].values())
            what += f" ({r['enrolled']:,} enrolled, {r['queued']:,} queued, {rows:,} rows written)"
        if case == "incremental tick":
            what = f"incremental tick, {db}, {r['changed']:,} changed of {n:,} ({r['looked_at']:,} looked at)"
        figure = f"{r['seconds']} s; peak {r['peak_mb']} MB (all processes)"
        if db == "postgres" and case in sqlite and sqlite[case]["seconds"]:
            figure += f"; {r['seconds'] / sqlite[case]['seconds']:.2f}× SQLite"
        floor = ""
        if "floor_seconds" in r:
            floor = f"{r['floor_seconds']} s ({r['floor']}); ratio {r['ratio_to_floor']}"
        return f"| {what} | {figure} | {floor} | {TARGETS.get((case, db), '')} |"
    if case == "evaluate":
        how = "in-process" if r["workers"] == 0 else f"{r['workers']} worker processes"
        return (
            f"| evaluation alone, {r['engine']}, {r['customers']:,} customers ({how}) | "
            f"{r['per_second']:,} customers/s; peak {r['peak_total_mb']} MB | | |"
        )
    if case == "dispatch":
        parts = []
        for channel in ("email", "sms"):
            c = r[channel]
            parts.append(f"{channel} {c['per_second']:,}/s ({c['sent']:,} in {c['seconds']} s)")
        return f"| dispatch, real SDKs to the fake provider | {'; '.join(parts)} | | ≥ 500/s |"
    if case == "render":
        return f"| template render | email {r['email_per_second']:,}/s, SMS {r['sms_per_second']:,}/s | | |"
    if case == "ingest under load":
        return (
            f"| ingest API, {r['database']}, {r['requests']:,} requests from {r['clients']} clients "
            f"while 3 ticks run | {r['requests_per_s']} requests/s; p50 {r['p50_ms']} ms, "
            f"p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms; {r['server_errors']} 5xx, "
            f"{r['lost_events']} lost events | | 0 5xx, 0 lost |"
        )
    if case == "distributed sweep":
        return (
            f"| full sweep, {r['customers']:,} customers on PostgreSQL: inline "
            f"({r['inline_workers']} processes) vs 2 `lifecycle worker` processes (RabbitMQ) | "
            f"inline {r['inline_s']} s ({r['inline_per_s']:,}/s); workers {r['workers_s']} s "
            f"({r['workers_per_s']:,}/s, {r['shards']} shards); ratio {r['ratio']}× | | |"
        )
    if case == "event to queued message":
        where = "inline, SQLite" if r["runner"] == "inline" else "dramatiq + 2 workers, PostgreSQL"
        return (
            f"| event (API) to queued message, {where}, {r['rate']} events/s for "
            f"{r['seconds']} s | p50 {r['p50_s']} s, p95 {r['p95_s']} s, p99 {r['p99_s']} s, "
            f"max {r['max_s']} s; {r['missing_after_30s']} without a message after 30 s; "
            f"from the event stored: p50 {r['stored_p50_s']} s, p99 {r['stored_p99_s']} s | | "
            "p99 ≤ 2 s |"
        )
    if case == "soak":
        samples = ", ".join(
            f"{n // 1_000_000}M: {mb} MB" for n, mb in r["worker_rss_mb_by_million"]
        )
        return (
            f"| soak, {r['evaluations']:,} durable evaluations in {r['workers']} workers | "
            f"{r['per_second']:,}/s, no crash; RSS of all processes {samples} | | flat |"
        )
    return ""


def update_readme(table: str) -> None:
    path = ROOT / "README.md"
    text = path.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{table}\n{end}{tail}")


if __name__ == "__main__":
    main()

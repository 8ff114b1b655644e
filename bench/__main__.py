"""``make bench``: run every benchmark case in its own process, print a table, write JSON.

Sizes come from the environment so a quick run and the full one use the same code:

    BENCH_EVAL_SIZES=100000,1000000     evaluation alone (durable_rules and reference)
    BENCH_SWEEP_CUSTOMERS=100000        full sweep from the database, per database
    BENCH_SWEEP_DATABASES=sqlite,postgres
    BENCH_CHANGED=10000                 customers changed before the incremental tick
    BENCH_DISPATCH=2000                 messages per channel through the fake provider
    BENCH_RENDER=5000                   template renders
    BENCH_SOAK=0                        evaluations in the soak (make soak sets 10,000,000)

``--readme`` also rewrites the performance block of README.md with the figures.
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

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "sweep_1m_sqlite_s": 60,
    "sweep_peak_mb": 500,
    "incremental_10k_s": 2,
    "dispatch_per_s": 500,
}


def _sizes(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",") if x.strip() and int(x)]


def run_case(*args: str) -> dict[str, Any]:
    print(f"  running {' '.join(args)} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "bench.cases", *args], cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"bench case {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    data["case_wall_seconds"] = round(time.perf_counter() - started, 1)
    return data


def main() -> None:
    results: list[dict[str, Any]] = []
    for size in _sizes("BENCH_EVAL_SIZES", "100000,1000000"):
        results.append(run_case("evaluate", str(size), "durable", "0"))
        results.append(run_case("evaluate", str(size), "reference", "0"))
        results.append(run_case("evaluate", str(size), "durable", str(os.cpu_count() or 1)))
    changed = _sizes("BENCH_CHANGED", "10000")[0]
    for count in _sizes("BENCH_SWEEP_CUSTOMERS", "100000"):
        for database in os.environ.get("BENCH_SWEEP_DATABASES", "sqlite,postgres").split(","):
            results.append(
                run_case("sweep", str(count), database.strip(), str(min(changed, count)))
            )
    for count in _sizes("BENCH_DISPATCH", "2000"):
        results.append(run_case("dispatch", str(count)))
    for count in _sizes("BENCH_RENDER", "5000"):
        results.append(run_case("render", str(count)))
    for count in _sizes("BENCH_SOAK", "0"):
        results.append(run_case("soak", str(count), str(os.cpu_count() or 1)))
    report = {
        "machine": f"{platform.node()} · {os.cpu_count()} cores · Python {platform.python_version()}",
        "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "targets": TARGETS,
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


def render(report: dict[str, Any]) -> str:
    lines = [f"Measured {report['at']} on {report['machine']}.", ""]
    lines += ["| what | figure | target |", "|---|---|---|"]
    for r in report["results"]:
        if r["case"] == "evaluate":
            how = (
                "in-process"
                if r["workers"] == 0
                else f"{r['workers']} worker processes, wall time incl. fact generation"
            )
            lines.append(
                f"| evaluation, {r['engine']}, {r['customers']:,} customers ({how}) | "
                f"{r['per_second']:,} customers/s; peak {r['peak_total_mb']} MB (all processes) | |"
            )
        elif r["case"] == "sweep":
            db, n = r["database"], r["customers"]
            lines.append(
                f"| first full sweep, {db}, {n:,} customers (facts, evaluation, {r['first_sweep_enrolled']:,} enrollments, "
                f"{r['first_sweep_queued']:,} messages queued) | {r['first_sweep_seconds']} s, {r['first_sweep_per_second']:,}/s; "
                f"peak {r['peak_total_mb']} MB (all processes) | 1M in ≤ 60 s on SQLite, ≤ 500 MB |"
            )
            lines.append(
                f"| steady full sweep, {db}, {n:,} customers (journeys already running) | "
                f"{r['steady_sweep_seconds']} s, {r['steady_sweep_per_second']:,}/s | |"
            )
            lines.append(
                f"| incremental tick, {db}, {r['incremental_changed']:,} changed of {n:,} "
                f"({r['incremental_customers']:,} looked at, due steps included) | {r['incremental_seconds']} s | ≤ 2 s |"
            )
        elif r["case"] == "dispatch":
            for channel in ("email", "sms"):
                c = r[channel]
                lines.append(
                    f"| dispatch, {channel}, real SDK to the fake provider (own process) | "
                    f"{c['per_second']:,} messages/s ({c['sent']:,} in {c['seconds']} s) | ≥ 500/s |"
                )
        elif r["case"] == "render":
            lines.append(
                f"| template render | email {r['email_per_second']:,}/s, SMS {r['sms_per_second']:,}/s | |"
            )
        elif r["case"] == "soak":
            samples = ", ".join(
                f"{n // 1_000_000}M: {mb} MB" for n, mb in r["worker_rss_mb_by_million"]
            )
            lines.append(
                f"| soak, {r['evaluations']:,} durable evaluations in {r['workers']} workers | "
                f"{r['per_second']:,}/s, no crash; RSS of all processes {samples} | flat |"
            )
    return "\n".join(lines)


def update_readme(table: str) -> None:
    path = ROOT / "README.md"
    text = path.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{table}\n{end}{tail}")


if __name__ == "__main__":
    main()

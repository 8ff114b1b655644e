"""``make chaos``: the distributed runner's chaos run at scale, with its figures.

    python -m bench.chaos [--customers 100000] [--batch-size 2000]

PostgreSQL (a schema of its own) and the local RabbitMQ; two `lifecycle worker` processes;
SIGKILL of one in the middle of a full sweep and of another in the middle of dispatch (the
real SendGrid and Twilio SDKs against the local fake provider); then two schedulers, the
first killed (tests/support/chaos.py says every step). Prints what it counted as one JSON
line, writes it to ``bench-results/chaos.json``, and exits 1 when a count is off: the
enrollments and messages differ from the inline control run's, the provider received a
message twice or lost one, or the standby did not take over.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

from bench.common import drop_database, fresh_postgres
from tests.support.chaos import ChaosConfig, run_chaos
from tests.support.cluster import RABBITMQ_URL, broker_problem

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results" / "chaos.json"
NOW_ISO = "2026-06-10T12:00:00+00:00"  # 13:00 in London: inside every sending window


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    problem = broker_problem(RABBITMQ_URL, "RabbitMQ")
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    from datetime import datetime

    work = Path(tempfile.mkdtemp(prefix="lifecycle-chaos-"))
    url = fresh_postgres("postgresql://postgres@127.0.0.1:5432/test")
    try:
        config = ChaosConfig(
            database_url=url,
            customers=args.customers,
            now=datetime.fromisoformat(NOW_ISO),
            work=work,
            prefix=f"chaos{uuid.uuid4().hex[:8]}",
            batch_size=args.batch_size,
            threads=args.threads,
            dispatch_kill_after=max(200, args.customers // 100),
            timeout_s=3600,
        )
        result = run_chaos(config)
    finally:
        logs = work / "logs"
        if logs.exists():  # the workers' and schedulers' logs outlive the run
            import shutil

            kept = ROOT / "bench-results" / "chaos-logs"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(logs, kept)
        drop_database("postgres", url, work)
    result["load_average"] = os.getloadavg()
    checks = {
        "sweep equals the inline control": result["sweep_counts"] == result["control_counts"],
        "no duplicate at the provider": result["provider_duplicates"] == 0,
        "no message lost": result["provider_lost"] == 0,
        "nothing the provider has left ambiguous": result["provider_ambiguous_received"] == 0,
        "the standby took over": result["standby_took_over_s"] < 10,
    }
    result["checks"] = checks
    shown = {k: v for k, v in result.items() if not k.endswith("counts")}
    shown["messages_by_playbook"] = result["sweep_counts"]["messages"]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(shown, indent=2) + "\n")
    print(json.dumps(shown))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""``make bench-rules-diff``: `lifecycle rules diff` on a seeded database, timed.

Seeds BENCH_CUSTOMERS customers (100,000 by default) with `lifecycle seed`, runs one full
tick so that journeys are under way (active enrollments, queued messages), then previews
a lower loyalty threshold (orders_count >= 5 or $500 becomes >= 4 or $400) and a removed
step (referral_ask's reminder) with `lifecycle rules diff --json`, each command a process
of its own as a person runs it. It prints the wall time of the diff and its counts, and
checks them against two `lifecycle evaluate --json` runs (one per rules directory).
On BENCH_DATABASES (sqlite by default; postgres too when listed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import NOW, ROOT, RULES, TEMPLATES, database, drop_database


def lifecycle(env: dict[str, str], *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", "from engine.cli import app; app()", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"lifecycle {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, result.stdout


def propose(target: Path) -> Path:
    shutil.copytree(RULES, target)
    loyalty = target / "loyalty_reward.yaml"
    loyalty.write_text(
        loyalty.read_text().replace(
            "orders_count >= 5 or total_spend_cents >= $500",
            "orders_count >= 4 or total_spend_cents >= $400",
        )
    )
    referral = target / "referral_ask.yaml"
    source = referral.read_text()
    referral.write_text(source[: source.index("  - id: reminder")])
    return target


def run(kind: str, customers: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-rules-diff-"))
    url = database(kind, workdir)
    env = {
        **os.environ,
        "LIFECYCLE_DATABASE_URL": url,
        "LIFECYCLE_RULES_DIR": str(RULES),
        "LIFECYCLE_TEMPLATES_DIR": str(TEMPLATES),
        "LIFECYCLE_OUTBOX_DIR": str(workdir / "outbox"),
        "COLUMNS": "200",
    }
    try:
        seed_s, _ = lifecycle(env, "seed", "--customers", str(customers), "--now", NOW.isoformat())
        tick_s, _ = lifecycle(env, "tick", "--full", "--now", NOW.isoformat())
        proposed = propose(workdir / "proposed")
        diff_s, output = lifecycle(
            env,
            "rules",
            "diff",
            str(proposed),
            "--against",
            str(RULES),
            "--json",
            "--now",
            NOW.isoformat(),
        )
        report = json.loads(output)
        _, before = lifecycle(env, "evaluate", "--json", "--now", report["at"])
        _, after = lifecycle(
            {**env, "LIFECYCLE_RULES_DIR": str(proposed)},
            "evaluate",
            "--json",
            "--now",
            report["at"],
        )
        was, will = json.loads(before), json.loads(after)
        agrees = all(
            (p["entry"]["current"], p["entry"]["proposed"])
            == (was["playbooks"][pid]["matched"], will["playbooks"][pid]["matched"])
            for pid, p in report["playbooks"].items()
        )
        loyalty = report["playbooks"]["loyalty_reward"]
        stranded = sum(s["enrollments"] for s in report["stranded"])
        return {
            "case": "rules diff",
            "database": kind,
            "customers": report["customers"],
            "pending_events": report["pending_events"],
            "active_enrollments": report["active_enrollments"],
            "queued_messages": report["queued_messages"],
            "seed_s": round(seed_s, 1),
            "tick_s": round(tick_s, 1),
            "diff_wall_s": round(diff_s, 1),
            "diff_s": report["seconds"],
            "loyalty_current": loyalty["entry"]["current"],
            "loyalty_proposed": loyalty["entry"]["proposed"],
            "loyalty_newly": loyalty["entry"]["newly"],
            "loyalty_no_longer": loyalty["entry"]["no_longer"],
            "loyalty_reward_sms_newly": loyalty["steps"]["reward_sms"]["newly"],
            "stranded": stranded,
            "queued_changed": sum(q["count"] for q in report["queued"]),
            "agrees_with_evaluate": agrees,
        }
    finally:
        drop_database(kind, url, workdir)


def main() -> None:
    customers = int(os.environ.get("BENCH_CUSTOMERS", "100000"))
    kinds = [k.strip() for k in os.environ.get("BENCH_DATABASES", "sqlite").split(",") if k]
    for kind in kinds:
        result = run(kind, customers)
        width = max(len(key) for key in result)
        for key, value in result.items():
            shown = f"{value:,}" if type(value) is int else str(value)
            print(f"{key:<{width}}  {shown}")
        print(json.dumps(result))


if __name__ == "__main__":
    main()

"""How often the playbook report's 95% uplift interval holds the truth: `make experiment`.

Each run seeds its own SQLite database (customers drawn with the run's seed, so the
split arms differ from run to run too), then simulates DAYS days on the shipped rules with
synthetic activity and a known truth (``simulate --experiment``): in re_engagement, arm a
converts at the base rate, arm b at the base rate plus LIFT, the 10% holdout at the base
rate. The simulation reports, per arm, the report's estimate and interval next to the
true uplift, and whether the interval holds it. This harness runs the seeds, two at a
time, and counts.

A 95% interval should hold the truth in about 95% of runs: over 40 runs, anything from
35 to 40 is consistent with that (a binomial 95% range); far fewer means the interval is
too narrow (or the report biased).

Environment: EXPERIMENT_SEEDS (default 20), EXPERIMENT_CUSTOMERS (3000), EXPERIMENT_DAYS
(9), EXPERIMENT_BASE (0.10), EXPERIMENT_LIFT (0.05). Writes bench-results/experiment.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import ROOT

PLAYBOOK = "re_engagement"
START = "2026-03-01T00:00:00+00:00"


def _lifecycle(database: Path, *args: str) -> str:
    env = {
        **os.environ,
        "LIFECYCLE_DATABASE_URL": f"sqlite:///{database}",
        "LIFECYCLE_RULES_DIR": str(ROOT / "rules"),
        "LIFECYCLE_TEMPLATES_DIR": str(ROOT / "templates" / "messages"),
    }
    command = [str(Path(sys.executable).with_name("lifecycle")), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"lifecycle {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def one_run(seed: int, customers: int, days: int, base: float, lift: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lifecycle-experiment-") as folder:
        database = Path(folder) / "experiment.db"
        _lifecycle(database, "init")
        _lifecycle(
            database,
            "seed",
            "--customers",
            str(customers),
            "--seed",
            str(seed),
            "--now",
            START,
            "--workers",
            "1",
        )
        started = time.perf_counter()
        output = _lifecycle(
            database,
            "simulate",
            "--days",
            str(days),
            "--start",
            START,
            "--activity",
            "synthetic",
            "--seed",
            str(seed),
            "--json",
            "--experiment",
            f"{PLAYBOOK}:{base},b=+{lift}",
        )
    outcome = json.loads(output)["experiment"]
    outcome["seed"] = seed
    outcome["seconds"] = round(time.perf_counter() - started, 1)
    return outcome


def main() -> None:
    seeds = int(os.environ.get("EXPERIMENT_SEEDS", "20"))
    customers = int(os.environ.get("EXPERIMENT_CUSTOMERS", "3000"))
    days = int(os.environ.get("EXPERIMENT_DAYS", "9"))
    base = float(os.environ.get("EXPERIMENT_BASE", "0.10"))
    lift = float(os.environ.get("EXPERIMENT_LIFT", "0.05"))
    print(
        f"{seeds} runs of {customers:,} customers over {days} days: {PLAYBOOK} arm a at "
        f"{base:.0%}, arm b at {base + lift:.0%}, holdout at {base:.0%}",
        flush=True,
    )
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(one_run, seed, customers, days, base, lift) for seed in range(1, seeds + 1)
        ]
        runs = []
        for future in futures:
            run = future.result()
            runs.append(run)
            arms = {arm["arm"]: arm for arm in run["arms"]}
            line = [f"seed {run['seed']:>3} ({run['seconds']:.0f}s):"]
            for name in ("a", "b"):
                arm = arms[name]
                ci = arm["ci95"]
                shown = (
                    "not enough data"
                    if ci is None
                    else f"{arm['uplift']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
                )
                line.append(
                    f"{name} n={arm['enrolled']} {shown} truth {arm['true_uplift']:+.3f} "
                    f"{'covered' if arm['covered'] else 'MISSED'}"
                )
            line.append(f"holdout n={arms['holdout']['enrolled']}")
            print("  ".join(line), flush=True)
    summary: dict[str, Any] = {
        "seeds": seeds,
        "customers": customers,
        "days": days,
        "base": base,
        "lift": lift,
        "load_average": os.getloadavg(),
        "runs": runs,
    }
    for name in ("a", "b"):
        arms = [arm for run in runs for arm in run["arms"] if arm["arm"] == name]
        judged = [arm for arm in arms if arm["covered"] is not None]
        covered = sum(1 for arm in judged if arm["covered"])
        estimates = [arm["uplift"] for arm in judged]
        summary[name] = {
            "covered": covered,
            "judged": len(judged),
            "mean_estimate": sum(estimates) / len(estimates) if estimates else None,
            "mean_truth": sum(arm["true_uplift"] for arm in judged) / len(judged)
            if judged
            else None,
        }
        print(
            f"arm {name}: the interval held the true uplift in {covered} of {len(judged)} runs; "
            f"mean estimate {summary[name]['mean_estimate']:+.4f}, "
            f"mean truth {summary[name]['mean_truth']:+.4f}"
        )
    target = ROOT / "bench-results" / "experiment.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(summary, indent=2))
    print(f"written to {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

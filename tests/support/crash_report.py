"""Print the crash test's counts as a table: ``python -m tests.support.crash_report FILE``.

``FILE`` holds one JSON object per kill point, written by
``tests/integration/test_dispatch_crash.py`` when ``LIFECYCLE_CRASH_REPORT`` names it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = (
    ("database", "database"),
    ("kill_point", "kill"),
    ("killed_after_requests", "killed after"),
    ("in_flight_at_kill", "in flight"),
    ("in_flight_provider_had", "of which received"),
    ("sms_resent_after_lookup", "SMS resent"),
    ("received", "received"),
    ("duplicates", "duplicates"),
    ("lost", "lost"),
    ("left_ambiguous", "left ambiguous"),
    ("left_ambiguous_provider_had", "ambiguous but received"),
)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.support.crash_report FILE", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in Path(argv[0]).read_text().splitlines() if line.strip()]
    print("| " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |")
    total = sum(row["messages"] for row in rows)
    print(
        f"\n{len(rows)} kill points, {total} messages: "
        f"{sum(r['duplicates'] for r in rows)} received twice, {sum(r['lost'] for r in rows)} "
        f"lost, {sum(r['left_ambiguous'] for r in rows)} left ambiguous "
        f"({sum(r['left_ambiguous_provider_had'] for r in rows)} of them received)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

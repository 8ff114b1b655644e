"""The lifecycle KPIs computed another way, as an oracle for engine.usecases.lifecycle_report.

Written independently of it: month boundaries are worked out here and passed as
parameters (no month arithmetic in SQL), each retention cell is its own
``count(*) ... EXISTS`` query, and the JSON properties of orders and answers are decoded
here in Python (no JSON functions of either database). Used by the agreement test on a
few hundred customers and by ``bench/lifecycle_report.py`` on 100,000.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlmodel import Session

from engine.data.moments import read_moment, session_moment


def _months(since: datetime, until: datetime) -> list[datetime]:
    """The first instant of every calendar month that [since, until) touches."""
    start = datetime(since.year, since.month, 1, tzinfo=UTC)
    months = []
    while start < until:
        months.append(start)
        start = datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)
    return months


def _next(month: datetime) -> datetime:
    return datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _props(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) else dict(value)


def oracle(
    session: Session,
    since: datetime,
    until: datetime,
    *,
    within_days: int = 30,
    cohorts: int | None = None,
) -> dict[str, Any]:
    """The KPIs of [since, until) (``cohorts``: only the latest so many cohorts' cells)."""

    def m(moment: datetime) -> Any:
        return session_moment(session, moment)

    def scalar(sql: str, **params: Any) -> Any:
        return session.execute(text(sql), params).scalar_one()

    result: dict[str, Any] = {}
    result["customers"] = int(scalar("SELECT count(*) FROM customers"))
    result["stages"] = {
        (row[0] or "(none yet)"): int(row[1])
        for row in session.execute(text("SELECT stage, count(*) FROM customers GROUP BY stage"))
    }
    result["transitions"] = int(
        scalar(
            "SELECT count(*) FROM stage_transitions WHERE at >= :a AND at < :b",
            a=m(since),
            b=m(until),
        )
    )
    months = _months(since, until)
    table: dict[str, list[int]] = {}
    for month in months:
        start = max(month, since)
        size = int(
            scalar(
                "SELECT count(*) FROM customers WHERE signed_up_at >= :a AND signed_up_at < :b",
                a=m(start),
                b=m(min(_next(month), until)),
            )
        )
        if size:
            table[f"{month:%Y-%m}"] = [size]
    shown = list(table)[-cohorts:] if cohorts else list(table)
    for label in shown:
        month = datetime.strptime(label, "%Y-%m").replace(tzinfo=UTC)
        start = max(month, since)
        later = _next(month)
        while later < until:
            retained = scalar(
                "SELECT count(*) FROM customers c WHERE c.signed_up_at >= :a "
                "AND c.signed_up_at < :b AND EXISTS (SELECT 1 FROM events e "
                "WHERE e.customer_id = c.id AND e.occurred_at >= :c AND e.occurred_at < :d "
                "AND e.occurred_at >= c.signed_up_at)",
                a=m(start),
                b=m(_next(month)),
                c=m(later),
                d=m(min(_next(later), until)),
            )
            table[label].append(int(retained))
            later = _next(later)
    result["cohorts"] = {label: table[label] for label in shown}
    result["cohort_sizes"] = {label: cells[0] for label, cells in table.items()}

    orders = session.execute(
        text(
            "SELECT customer_id, properties FROM events WHERE type = 'order_placed' "
            "AND occurred_at >= :a AND occurred_at < :b"
        ),
        {"a": m(since), "b": m(until)},
    ).all()
    per_buyer: dict[str, int] = {}
    revenue = 0
    for customer_id, properties in orders:
        per_buyer[customer_id] = per_buyer.get(customer_id, 0) + 1
        revenue += _whole(_props(properties).get("amount_cents")) or 0
    result["orders"] = {
        "orders": len(orders),
        "buyers": len(per_buyer),
        "repeat_buyers": sum(1 for n in per_buyer.values() if n >= 2),
        "revenue_cents": revenue,
    }
    answers = session.execute(
        text(
            "SELECT properties FROM events WHERE type = 'nps_submitted' "
            "AND occurred_at >= :a AND occurred_at < :b"
        ),
        {"a": m(since), "b": m(until)},
    ).scalars()
    scores = [s for s in (_whole(_props(p).get("score")) for p in answers) if s is not None]
    scores = [s for s in scores if 0 <= s <= 10]
    result["nps"] = {
        "answers": len(scores),
        "promoters": sum(1 for s in scores if s >= 9),
        "detractors": sum(1 for s in scores if s <= 6),
    }
    # Sign-up → first order within N days, of those signed up N days before until.
    cutoff = until - timedelta(days=within_days)
    rows = session.execute(
        text(
            "SELECT c.signed_up_at, (SELECT min(e.occurred_at) FROM events e "
            "WHERE e.customer_id = c.id AND e.type = 'order_placed' AND e.occurred_at < :u) "
            "FROM customers c WHERE c.signed_up_at >= :a AND c.signed_up_at < :b"
        ),
        {"a": m(since), "b": m(cutoff), "u": m(until)},
    ).all()
    converted = 0
    for signed_up, first in rows:
        start, first_at = read_moment(signed_up), read_moment(first)
        if start is not None and first_at is not None:
            converted += first_at - start <= timedelta(days=within_days)
    result["first_order"] = {"eligible": len(rows), "converted": converted}
    return result


def reported(document: dict[str, Any], cohorts: int | None = None) -> dict[str, Any]:
    """The same figures, read from ``lifecycle report lifecycle --json``."""
    shown = document["cohorts"][-cohorts:] if cohorts else document["cohorts"]
    return {
        "customers": document["customers"],
        "stages": {s["stage"]: s["customers"] for s in document["stages"] if s["customers"]},
        "transitions": document["transitions"]["total"],
        "cohorts": {c["month"]: c["retained"] for c in shown},
        "cohort_sizes": {c["month"]: c["customers"] for c in document["cohorts"]},
        "orders": {
            k: document["orders"][k] for k in ("orders", "buyers", "repeat_buyers", "revenue_cents")
        },
        "nps": {k: document["nps"][k] for k in ("answers", "promoters", "detractors")},
        "first_order": {k: document["onboarding"][0][k] for k in ("eligible", "converted")},
    }

"""Lifecycle KPIs: stages, transitions, cohort retention and churn, orders, CLV and NPS.

Shared by ``lifecycle report lifecycle`` and the console's Lifecycle page. Every number
is a SQL aggregation pushed to the database (a handful of grouped queries); no customer
or event rows are loaded. The definitions, with their formulas, are in the README
("Lifecycle KPIs"); in short, for the period [since, until):

    stages          customers per stage now (the stage the last evaluation recorded)
    transitions     stage changes recorded in the period, from × to
    cohorts         customers by month of sign-up (signed up in the period); a customer
                    is retained in month k after sign-up when they have at least one
                    event (any activity) in that calendar month; retention = retained /
                    cohort size, churn = 1 - retention; month 0 is the sign-up itself
    orders          orders (order_placed events) in the period: average order value =
                    revenue / orders; orders per customer = orders / buyers; repeat-
                    purchase rate = buyers with 2+ orders / buyers
    historic CLV    revenue to date (orders before ``until``) per customer of a cohort
    predictive CLV  AOV × f × 1/r over the complete months of the period: f = orders per
                    active customer-month, r = the monthly churn rate (of the customers
                    active in a month, the share not active in the next)
    NPS             % promoters (9-10) - % detractors (0-6) of the answers in the period
                    (nps_submitted events), overall, per stage (the customer's stage now)
                    and per week or month
    onboarding      sign-up → first order within N days, first order → second order
                    within N days, of those whose N days are over by ``until``

The event types and properties are the ones the roll-ups read (engine.data.ingest:
``order_placed`` with an integer ``amount_cents``, ``nps_submitted`` with a ``score``
of 0 to 10), so the report and the facts count the same orders and answers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlmodel import Session

from engine.data.moments import read_moment, session_moment
from engine.stages.model import StageModel

ORDER = "order_placed"
NPS = "nps_submitted"
DAYS_PER_MONTH = 30.4375  # the mean Gregorian month, for "per month" figures
DEFAULT_WITHIN_DAYS = 30
NEW = "(new)"  # the "from" of a customer's first recorded stage
UNASSIGNED = "(none yet)"  # customers no evaluation has given a stage yet


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class StageCount:
    stage: str
    label: str
    customers: int


@dataclass(frozen=True)
class Cohort:
    """One month of sign-ups: ``retained[k]`` customers active in month k after it."""

    month: str  # "2026-03"
    size: int
    retained: tuple[int, ...]  # k = 0 (the sign-up month: everyone), 1, 2, ...
    revenue_cents: int  # orders before ``until`` of its customers: historic CLV

    @property
    def retention(self) -> tuple[float | None, ...]:
        return tuple(_ratio(n, self.size) for n in self.retained)

    @property
    def churn(self) -> tuple[float | None, ...]:
        return tuple(None if r is None else 1 - r for r in self.retention)

    @property
    def clv_cents(self) -> float | None:
        return _ratio(self.revenue_cents, self.size)


@dataclass(frozen=True)
class Orders:
    orders: int
    buyers: int
    repeat_buyers: int
    revenue_cents: int

    @property
    def average_order_value_cents(self) -> float | None:
        return _ratio(self.revenue_cents, self.orders)

    @property
    def orders_per_customer(self) -> float | None:
        return _ratio(self.orders, self.buyers)

    @property
    def repeat_purchase_rate(self) -> float | None:
        return _ratio(self.repeat_buyers, self.buyers)


@dataclass(frozen=True)
class PredictiveClv:
    """AOV × f × 1/r over the complete calendar months ``first`` to ``last``."""

    first: str | None  # "2026-01"; None: the period holds fewer than two complete months
    last: str | None
    orders: int
    revenue_cents: int
    active_months: int  # (customer, month) pairs with activity
    pairs: int  # (customer, month) pairs whose next month is in the window too
    lost: int  # of those, not active in the next month

    @property
    def average_order_value_cents(self) -> float | None:
        return _ratio(self.revenue_cents, self.orders)

    @property
    def frequency(self) -> float | None:
        """Orders per active customer per month."""
        return _ratio(self.orders, self.active_months)

    @property
    def monthly_churn(self) -> float | None:
        return _ratio(self.lost, self.pairs)

    @property
    def lifetime_months(self) -> float | None:
        churn = self.monthly_churn
        return 1 / churn if churn else None

    @property
    def clv_cents(self) -> float | None:
        aov, f, life = self.average_order_value_cents, self.frequency, self.lifetime_months
        if aov is None or f is None or life is None:
            return None
        return aov * f * life

    @property
    def note(self) -> str | None:
        if self.first is None:
            return "needs two complete calendar months in the period"
        if not self.pairs:
            return "no customer was active in a month followed by another in the period"
        if not self.lost:
            return "no customer was lost from one month to the next: the lifetime is unbounded"
        if not self.orders:
            return "no orders in the complete months of the period"
        return None


@dataclass(frozen=True)
class NpsCount:
    promoters: int = 0
    passives: int = 0
    detractors: int = 0

    @property
    def answers(self) -> int:
        return self.promoters + self.passives + self.detractors

    @property
    def score(self) -> float | None:
        """% promoters - % detractors, from -100 to 100."""
        n = self.answers
        return 100 * (self.promoters - self.detractors) / n if n else None

    def plus(self, other: NpsCount) -> NpsCount:
        return NpsCount(
            self.promoters + other.promoters,
            self.passives + other.passives,
            self.detractors + other.detractors,
        )


@dataclass(frozen=True)
class StepConversion:
    step: str
    eligible: int
    converted: int
    within_days: int

    @property
    def rate(self) -> float | None:
        return _ratio(self.converted, self.eligible)


@dataclass
class LifecycleReport:
    since: datetime
    until: datetime
    stages: list[StageCount]
    transitions: dict[tuple[str, str], int]
    cohorts: list[Cohort]
    orders: Orders
    predictive: PredictiveClv
    nps: NpsCount
    nps_by_stage: dict[str, NpsCount]
    nps_trend: list[tuple[date, NpsCount]]  # (first day of the week or month, answers)
    nps_bucket: str  # "week" or "month"
    onboarding: list[StepConversion]
    labels: dict[str, str] = field(default_factory=dict)  # stage name -> label

    @property
    def customers(self) -> int:
        return sum(s.customers for s in self.stages)

    def transition_stages(self) -> tuple[list[str], list[str]]:
        """The matrix's rows (from) and columns (to), in funnel order."""
        order = [s.stage for s in self.stages]
        rank = {name: i for i, name in enumerate([NEW, *order])}
        froms = sorted({f for f, _ in self.transitions}, key=lambda s: (rank.get(s, 99), s))
        tos = sorted({t for _, t in self.transitions}, key=lambda s: (rank.get(s, 99), s))
        return froms, tos


def sum_nps(counts: Iterable[NpsCount]) -> NpsCount:
    total = NpsCount()
    for count in counts:
        total = total.plus(count)
    return total


def sum_revenue(cohorts: Iterable[Cohort]) -> tuple[int, int, float | None]:
    """(customers, revenue to date, revenue per customer) of the cohorts: historic CLV."""
    listed = list(cohorts)
    size = sum(c.size for c in listed)
    revenue = sum(c.revenue_cents for c in listed)
    return size, revenue, _ratio(revenue, size)


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


# ---------------------------------------------------------------- SQL by dialect


def _month(dialect: str, column: str) -> str:
    """A timestamp's UTC calendar month as one integer (year * 12 + month - 1)."""
    if dialect == "postgresql":
        utc = f"({column} AT TIME ZONE 'UTC')"
        return (
            f"(CAST(EXTRACT(YEAR FROM {utc}) AS INTEGER) * 12 "
            f"+ CAST(EXTRACT(MONTH FROM {utc}) AS INTEGER) - 1)"
        )
    return (
        f"(CAST(strftime('%Y', {column}) AS INTEGER) * 12 "
        f"+ CAST(strftime('%m', {column}) AS INTEGER) - 1)"
    )


def _day(dialect: str, column: str) -> str:
    if dialect == "postgresql":
        return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    return f"strftime('%Y-%m-%d', {column})"


def _integer_property(dialect: str, name: str) -> str:
    """``properties.<name>`` when it is a whole number (as the roll-ups count it), else NULL."""
    if dialect == "postgresql":
        return (
            f"(CASE WHEN json_typeof(properties -> '{name}') = 'number' "
            f"AND (properties ->> '{name}') ~ '^-?[0-9]{{1,18}}$' "
            f"THEN CAST(properties ->> '{name}' AS BIGINT) END)"
        )
    return (
        f"(CASE WHEN json_type(properties, '$.{name}') = 'integer' "
        f"THEN json_extract(properties, '$.{name}') END)"
    )


def _seconds_between(dialect: str, earlier: str, later: str) -> str:
    if dialect == "postgresql":
        return f"EXTRACT(EPOCH FROM ({later} - {earlier}))"
    return f"((julianday({later}) - julianday({earlier})) * 86400.0)"


def _month_index(moment: datetime) -> int:
    return moment.year * 12 + moment.month - 1


def _month_text(index: int) -> str:
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def _month_start(index: int) -> datetime:
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


# ---------------------------------------------------------------- the report


def lifecycle_report(
    session: Session,
    stages: StageModel | None,
    since: datetime,
    until: datetime,
    *,
    within_days: int = DEFAULT_WITHIN_DAYS,
) -> LifecycleReport:
    """Every KPI for the period [since, until) (see the module docstring)."""
    dialect = session.get_bind().dialect.name
    params = {"since": session_moment(session, since), "until": session_moment(session, until)}
    nps_trend, bucket = _nps_trend(session, dialect, params, since, until)
    by_stage = _nps_by_stage(session, dialect, params)
    return LifecycleReport(
        since=since,
        until=until,
        stages=_stage_counts(session, stages),
        transitions=_transitions(session, params),
        cohorts=_cohorts(session, dialect, params, until),
        orders=_orders(session, dialect, params),
        predictive=_predictive(session, dialect, since, until),
        nps=sum_nps(by_stage.values()),
        nps_by_stage=by_stage,
        nps_trend=nps_trend,
        nps_bucket=bucket,
        onboarding=_onboarding(session, dialect, params, until, within_days),
        labels={s.name: s.label for s in stages.stages} if stages else {},
    )


def _stage_counts(session: Session, stages: StageModel | None) -> list[StageCount]:
    found = {
        stage: int(n)
        for stage, n in session.execute(
            text("SELECT stage, count(*) FROM customers GROUP BY stage")
        )
    }
    order = list(stages.funnel) if stages else []
    counts = [
        StageCount(name, stages.label(name) if stages else name, found.pop(name, 0))
        for name in order
    ]
    unassigned = found.pop(None, 0)  # type: ignore[call-overload]
    # Stages no longer in the model (renamed or removed) keep their customers until the
    # next sweep gives them a stage of the new model.
    counts.extend(StageCount(name, name, n) for name, n in sorted(found.items()))
    if unassigned:
        counts.append(StageCount(UNASSIGNED, "No stage yet", unassigned))
    return counts


def _transitions(session: Session, params: dict[str, Any]) -> dict[tuple[str, str], int]:
    statement = text(
        "SELECT from_stage, to_stage, count(*) FROM stage_transitions "
        "WHERE at >= :since AND at < :until GROUP BY from_stage, to_stage"
    )
    return {(f or NEW, t): int(n) for f, t, n in session.execute(statement, params)}


def _month_key(dialect: str, column: str) -> str:
    """A timestamp's UTC calendar month as text, 'YYYY-MM' (SQLite stores UTC text that
    starts so: a prefix is cheaper than parsing the date, at a million events)."""
    if dialect == "postgresql":
        return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM')"
    return f"substr({column}, 1, 7)"


def _key_index(key: str) -> int:
    year, month = key.split("-")
    return int(year) * 12 + int(month) - 1


def _cohorts(
    session: Session, dialect: str, params: dict[str, Any], until: datetime
) -> list[Cohort]:
    signup = _month_key(dialect, "signed_up_at")
    sizes = {
        _key_index(m): int(n)
        for m, n in session.execute(
            text(
                f"SELECT {signup} AS m, count(*) FROM customers "
                "WHERE signed_up_at >= :since AND signed_up_at < :until GROUP BY m"
            ),
            params,
        )
    }
    active: dict[int, dict[int, int]] = defaultdict(dict)
    # Each customer's active months once (DISTINCT), then counted per cohort and month.
    statement = text(
        f"SELECT cm, am, count(*) FROM (SELECT DISTINCT c.id, "
        f"{_month_key(dialect, 'c.signed_up_at')} AS cm, "
        f"{_month_key(dialect, 'e.occurred_at')} AS am "
        "FROM customers c JOIN events e ON e.customer_id = c.id "
        "WHERE c.signed_up_at >= :since AND c.signed_up_at < :until "
        "AND e.occurred_at >= c.signed_up_at AND e.occurred_at < :until) AS a GROUP BY cm, am"
    )
    for cm, am, n in session.execute(statement, params):
        active[_key_index(cm)][_key_index(am)] = int(n)
    revenue = {
        _key_index(m): int(r or 0)
        for m, r in session.execute(
            text(
                f"SELECT {_month_key(dialect, 'c.signed_up_at')} AS m, "
                f"sum({_integer_property(dialect, 'amount_cents')}) FROM events e "
                "JOIN customers c ON c.id = e.customer_id WHERE e.type = :order "
                "AND c.signed_up_at >= :since AND c.signed_up_at < :until "
                "AND e.occurred_at < :until GROUP BY m"
            ),
            {**params, "order": ORDER},
        )
    }
    last = _month_index(until - timedelta(microseconds=1))
    cohorts = []
    for month in sorted(sizes):
        size = sizes[month]
        retained = [size] + [active[month].get(m, 0) for m in range(month + 1, last + 1)]
        cohorts.append(Cohort(_month_text(month), size, tuple(retained), revenue.get(month, 0)))
    return cohorts


def _orders(session: Session, dialect: str, params: dict[str, Any]) -> Orders:
    amount = _integer_property(dialect, "amount_cents")
    row = session.execute(
        text(
            "SELECT count(*), count(DISTINCT customer_id), "
            f"coalesce(sum({amount}), 0) FROM events "
            "WHERE type = :order AND occurred_at >= :since AND occurred_at < :until"
        ),
        {**params, "order": ORDER},
    ).one()
    repeat = session.execute(
        text(
            "SELECT count(*) FROM (SELECT customer_id FROM events WHERE type = :order "
            "AND occurred_at >= :since AND occurred_at < :until "
            "GROUP BY customer_id HAVING count(*) >= 2) AS repeaters"
        ),
        {**params, "order": ORDER},
    ).scalar_one()
    return Orders(int(row[0]), int(row[1]), int(repeat), int(row[2]))


def _complete_months(since: datetime, until: datetime) -> tuple[int, int] | None:
    """The first and last calendar month wholly inside [since, until), when there are
    at least two (a month and the one after it)."""
    first = _month_index(since)
    if _month_start(first) < since:
        first += 1
    last = _month_index(until) - 1  # the month before until's is whole when first <= it
    return (first, last) if last - first >= 1 else None


def _predictive(session: Session, dialect: str, since: datetime, until: datetime) -> PredictiveClv:
    window = _complete_months(since, until)
    if window is None:
        return PredictiveClv(None, None, 0, 0, 0, 0, 0)
    first, last = window
    params = {
        "start": session_moment(session, _month_start(first)),
        "end": session_moment(session, _month_start(last + 1)),
        "last": last,
    }
    month = _month(dialect, "occurred_at")
    # Each customer's active months in the window, and for each the next one (LEAD): a
    # month not followed by the month after it is a customer lost.
    row = session.execute(
        text(
            f"WITH am AS (SELECT DISTINCT customer_id, {month} AS m FROM events "
            "WHERE occurred_at >= :start AND occurred_at < :end), "
            "nx AS (SELECT m, LEAD(m) OVER (PARTITION BY customer_id ORDER BY m) AS next_m "
            "FROM am) "
            "SELECT count(*), "
            "coalesce(sum(CASE WHEN m < :last THEN 1 ELSE 0 END), 0), "
            "coalesce(sum(CASE WHEN m < :last AND (next_m IS NULL OR next_m <> m + 1) "
            "THEN 1 ELSE 0 END), 0) FROM nx"
        ),
        params,
    ).one()
    orders = session.execute(
        text(
            "SELECT count(*), "
            f"coalesce(sum({_integer_property(dialect, 'amount_cents')}), 0) FROM events "
            "WHERE type = :order AND occurred_at >= :start AND occurred_at < :end"
        ),
        {**params, "order": ORDER},
    ).one()
    return PredictiveClv(
        _month_text(first),
        _month_text(last),
        int(orders[0]),
        int(orders[1]),
        int(row[0]),
        int(row[1]),
        int(row[2]),
    )


def _nps_rows(session: Session, dialect: str, params: dict[str, Any], group: str) -> Any:
    score = _integer_property(dialect, "score")
    statement = text(
        f"SELECT {group} AS g, "
        f"sum(CASE WHEN s >= 9 THEN 1 ELSE 0 END), "
        f"sum(CASE WHEN s BETWEEN 7 AND 8 THEN 1 ELSE 0 END), "
        f"sum(CASE WHEN s <= 6 THEN 1 ELSE 0 END) "
        f"FROM (SELECT e.customer_id, e.occurred_at, {score} AS s FROM events e "
        "WHERE e.type = :nps AND e.occurred_at >= :since AND e.occurred_at < :until) AS a "
        "JOIN customers c ON c.id = a.customer_id "
        "WHERE a.s BETWEEN 0 AND 10 GROUP BY g"
    )
    return session.execute(statement, {**params, "nps": NPS})


def _nps_by_stage(session: Session, dialect: str, params: dict[str, Any]) -> dict[str, NpsCount]:
    return {
        (stage or UNASSIGNED): NpsCount(int(p or 0), int(q or 0), int(d or 0))
        for stage, p, q, d in _nps_rows(session, dialect, params, "c.stage")
    }


def _nps_trend(
    session: Session, dialect: str, params: dict[str, Any], since: datetime, until: datetime
) -> tuple[list[tuple[date, NpsCount]], str]:
    """Answers per week (Monday) for periods up to 26 weeks, else per calendar month,
    from per-day counts (one grouped query)."""
    bucket = "week" if until - since <= timedelta(weeks=26) else "month"
    per: dict[date, NpsCount] = {}
    for day, p, q, d in _nps_rows(session, dialect, params, _day(dialect, "a.occurred_at")):
        moment = date.fromisoformat(str(day))
        start = (
            moment - timedelta(days=moment.weekday()) if bucket == "week" else moment.replace(day=1)
        )
        per[start] = per.get(start, NpsCount()).plus(NpsCount(int(p), int(q), int(d)))
    return sorted(per.items()), bucket


def _onboarding(
    session: Session, dialect: str, params: dict[str, Any], until: datetime, within_days: int
) -> list[StepConversion]:
    cutoff = session_moment(session, until - timedelta(days=within_days))
    window = within_days * 86400
    first_gap = _seconds_between(dialect, "c.signed_up_at", "f.first_at")
    second_gap = _seconds_between(dialect, "f.first_at", "f.second_at")
    # Each customer's first and second order, numbered by a window function and folded
    # into one row per customer, materialized once (joined by customer id).
    statement = text(
        "WITH f AS MATERIALIZED (SELECT customer_id, "
        "min(CASE WHEN n = 1 THEN occurred_at END) AS first_at, "
        "min(CASE WHEN n = 2 THEN occurred_at END) AS second_at FROM ("
        "SELECT customer_id, occurred_at, ROW_NUMBER() OVER "
        "(PARTITION BY customer_id ORDER BY occurred_at, id) AS n FROM events "
        "WHERE type = :order AND occurred_at < :until) AS o WHERE n <= 2 GROUP BY customer_id) "
        "SELECT "
        "coalesce(sum(CASE WHEN c.signed_up_at < :cutoff THEN 1 ELSE 0 END), 0), "
        "coalesce(sum(CASE WHEN c.signed_up_at < :cutoff AND f.first_at IS NOT NULL "
        f"AND {first_gap} <= :window THEN 1 ELSE 0 END), 0), "
        "coalesce(sum(CASE WHEN f.first_at < :cutoff THEN 1 ELSE 0 END), 0), "
        "coalesce(sum(CASE WHEN f.first_at < :cutoff AND f.second_at IS NOT NULL "
        f"AND {second_gap} <= :window THEN 1 ELSE 0 END), 0) "
        "FROM customers c LEFT JOIN f ON f.customer_id = c.id "
        "WHERE c.signed_up_at >= :since AND c.signed_up_at < :until"
    )
    row = session.execute(
        statement, {**params, "order": ORDER, "cutoff": cutoff, "window": window}
    ).one()
    return [
        StepConversion("signed up → first order", int(row[0]), int(row[1]), within_days),
        StepConversion("first order → second order", int(row[2]), int(row[3]), within_days),
    ]


def default_since(session: Session) -> datetime | None:
    """The first sign-up on record: the report's default start."""
    return read_moment(session.execute(text("SELECT min(signed_up_at) FROM customers")).scalar())


# ---------------------------------------------------------------- output


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def as_json(report: LifecycleReport) -> dict[str, Any]:
    froms, tos = report.transition_stages()
    p = report.predictive
    return {
        "since": report.since.isoformat(),
        "until": report.until.isoformat(),
        "customers": report.customers,
        "stages": [
            {"stage": s.stage, "label": s.label, "customers": s.customers} for s in report.stages
        ],
        "transitions": {
            "from": froms,
            "to": tos,
            "counts": [
                {"from": f, "to": t, "customers": n}
                for (f, t), n in sorted(report.transitions.items())
            ],
            "total": sum(report.transitions.values()),
        },
        "cohorts": [
            {
                "month": c.month,
                "customers": c.size,
                "retained": list(c.retained),
                "retention": [_r(r) for r in c.retention],
                "churn": [_r(r) for r in c.churn],
                "revenue_cents": c.revenue_cents,
                "historic_clv_cents": _r(c.clv_cents, 2),
            }
            for c in report.cohorts
        ],
        "orders": {
            "orders": report.orders.orders,
            "buyers": report.orders.buyers,
            "repeat_buyers": report.orders.repeat_buyers,
            "revenue_cents": report.orders.revenue_cents,
            "average_order_value_cents": _r(report.orders.average_order_value_cents, 2),
            "orders_per_customer": _r(report.orders.orders_per_customer),
            "repeat_purchase_rate": _r(report.orders.repeat_purchase_rate),
        },
        "clv": {
            "historic": {
                "customers": sum(c.size for c in report.cohorts),
                "revenue_cents": sum(c.revenue_cents for c in report.cohorts),
                "per_customer_cents": _r(
                    _ratio(
                        sum(c.revenue_cents for c in report.cohorts),
                        sum(c.size for c in report.cohorts),
                    ),
                    2,
                ),
            },
            "predictive": {
                "months": [p.first, p.last],
                "orders": p.orders,
                "revenue_cents": p.revenue_cents,
                "active_customer_months": p.active_months,
                "average_order_value_cents": _r(p.average_order_value_cents, 2),
                "orders_per_active_customer_month": _r(p.frequency),
                "monthly_churn_rate": _r(p.monthly_churn),
                "expected_lifetime_months": _r(p.lifetime_months, 2),
                "clv_cents": _r(p.clv_cents, 2),
                "note": p.note,
            },
        },
        "nps": {
            **_nps_json(report.nps),
            "by_stage": {stage: _nps_json(n) for stage, n in sorted(report.nps_by_stage.items())},
            "trend": {
                "bucket": report.nps_bucket,
                "points": [
                    {"from": start.isoformat(), **_nps_json(n)} for start, n in report.nps_trend
                ],
            },
        },
        "onboarding": [
            {
                "step": s.step,
                "within_days": s.within_days,
                "eligible": s.eligible,
                "converted": s.converted,
                "rate": _r(s.rate),
            }
            for s in report.onboarding
        ],
    }


def _nps_json(n: NpsCount) -> dict[str, Any]:
    return {
        "answers": n.answers,
        "promoters": n.promoters,
        "passives": n.passives,
        "detractors": n.detractors,
        "nps": _r(n.score, 2),
    }


def csv_tables(report: LifecycleReport) -> dict[str, list[list[Any]]]:
    """The report as tables, by file name (``--csv DIR``): a header row, then rows."""
    data = as_json(report)
    months = max((len(c.retained) for c in report.cohorts), default=0)
    froms, tos = report.transition_stages()
    p = data["clv"]["predictive"]
    o = data["orders"]
    summary = [
        ["kpi", "value"],
        ["customers", data["customers"]],
        ["orders", o["orders"]],
        ["buyers", o["buyers"]],
        ["average_order_value_cents", o["average_order_value_cents"]],
        ["orders_per_customer", o["orders_per_customer"]],
        ["repeat_purchase_rate", o["repeat_purchase_rate"]],
        ["historic_clv_cents", data["clv"]["historic"]["per_customer_cents"]],
        ["predictive_clv_cents", p["clv_cents"]],
        ["monthly_churn_rate", p["monthly_churn_rate"]],
        ["expected_lifetime_months", p["expected_lifetime_months"]],
        ["nps", data["nps"]["nps"]],
        ["nps_answers", data["nps"]["answers"]],
    ]
    return {
        "summary.csv": summary,
        "stages.csv": [["stage", "label", "customers"]]
        + [[s.stage, s.label, s.customers] for s in report.stages],
        "transitions.csv": [["from \\ to", *tos]]
        + [[f, *(report.transitions.get((f, t), 0) for t in tos)] for f in froms],
        "retention.csv": [["cohort", "customers", *(f"month_{k}" for k in range(months))]]
        + [[c.month, c.size, *(_r(r) for r in c.retention)] for c in report.cohorts],
        "churn.csv": [["cohort", "customers", *(f"month_{k}" for k in range(months))]]
        + [[c.month, c.size, *(_r(r) for r in c.churn)] for c in report.cohorts],
        "clv_by_cohort.csv": [["cohort", "customers", "revenue_cents", "clv_cents"]]
        + [[c.month, c.size, c.revenue_cents, _r(c.clv_cents, 2)] for c in report.cohorts],
        "nps.csv": [["group", "answers", "promoters", "passives", "detractors", "nps"]]
        + [["all", *_nps_json(report.nps).values()]]
        + [
            [f"stage:{stage}", *_nps_json(n).values()]
            for stage, n in sorted(report.nps_by_stage.items())
        ]
        + [
            [f"{report.nps_bucket}:{start.isoformat()}", *_nps_json(n).values()]
            for start, n in report.nps_trend
        ],
        "onboarding.csv": [["step", "within_days", "eligible", "converted", "rate"]]
        + [[s.step, s.within_days, s.eligible, s.converted, _r(s.rate)] for s in report.onboarding],
    }

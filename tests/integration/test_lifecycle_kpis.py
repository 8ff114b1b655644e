"""Each lifecycle KPI on a small data set built by hand, whose answer is worked out here,
on SQLite and PostgreSQL (engine.usecases.lifecycle_report)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from engine.data.models import Customer, Event, StageTransition
from engine.playbooks.loader import load_rules
from engine.stages.model import StageModel
from engine.usecases.lifecycle_report import (
    NEW,
    UNASSIGNED,
    LifecycleReport,
    as_json,
    csv_tables,
    lifecycle_report,
)
from tests.support.paths import ROOT

STAGES = ROOT / "tests" / "fixtures" / "stages"
SINCE = datetime(2026, 1, 1, tzinfo=UTC)
UNTIL = datetime(2026, 4, 1, tzinfo=UTC)  # January, February and March, complete


def day(month: int, d: int, hour: int = 12) -> datetime:
    return datetime(2026, month, d, hour, tzinfo=UTC)


def stage_model() -> StageModel:
    model = load_rules(STAGES / "rules", STAGES / "templates").stages
    assert model is not None
    return model


def customer(cid: str, signed_up: datetime, stage: str | None = None) -> Customer:
    return Customer(
        id=cid,
        signed_up_at=signed_up,
        changed_at=signed_up,
        created_at=signed_up,
        updated_at=signed_up,
        stage=stage,
        stage_since=signed_up if stage else None,
    )


_events = 0


def event(cid: str, kind: str, at: datetime, **properties: Any) -> Event:
    global _events
    _events += 1
    return Event(
        id=f"e{_events}",
        customer_id=cid,
        type=kind,
        properties=properties,
        occurred_at=at,
        received_at=at,
        evaluated_at=at,
    )


def visit(cid: str, at: datetime) -> Event:
    return event(cid, "site_visit", at)


def order(cid: str, at: datetime, cents: Any) -> Event:
    return event(cid, "order_placed", at, amount_cents=cents)


def answer(cid: str, at: datetime, score: Any) -> Event:
    return event(cid, "nps_submitted", at, score=score)


def store(db: Engine, customers: Iterable[Customer], rows: Iterable[Any] = ()) -> None:
    with Session(db) as session:
        session.add_all(list(customers))
        session.flush()
        session.add_all(list(rows))
        session.commit()


def report(db: Engine, since: datetime = SINCE, until: datetime = UNTIL) -> LifecycleReport:
    with Session(db) as session:
        return lifecycle_report(session, stage_model(), since, until)


def test_retention_and_churn_of_three_monthly_cohorts(db: Engine) -> None:
    store(
        db,
        [
            *(customer(f"j{n}", day(1, 5)) for n in range(1, 5)),  # January: 4
            customer("f1", day(2, 10)),  # February: 2
            customer("f2", day(2, 11)),
            customer("m1", day(3, 3)),  # March: 1
            customer("old", datetime(2025, 12, 20, tzinfo=UTC)),  # before the period
        ],
        [
            visit("j1", day(2, 1)),
            visit("j1", day(2, 20)),  # twice in February: counted once
            visit("j1", day(3, 5)),
            order("j2", day(2, 14), 1000),
            visit("j3", day(3, 30)),
            visit("j4", datetime(2026, 4, 2, tzinfo=UTC)),  # after the period: not counted
            visit("f1", day(3, 1)),
            visit("f2", day(2, 28)),  # its sign-up month: month 0
            visit("old", day(2, 2)),  # not of a cohort of the period
        ],
    )
    cohorts = report(db).cohorts
    # January: month 1 (February) j1 and j2 of 4; month 2 (March) j1 and j3 of 4.
    # February: month 1 (March) f1 of 2. March: only its sign-up month so far.
    assert [(c.month, c.size, c.retained) for c in cohorts] == [
        ("2026-01", 4, (4, 2, 2)),
        ("2026-02", 2, (2, 1)),
        ("2026-03", 1, (1,)),
    ]
    assert cohorts[0].retention == (1.0, 0.5, 0.5)
    assert cohorts[0].churn == (0.0, 0.5, 0.5)
    assert cohorts[1].retention == (1.0, 0.5)
    assert cohorts[2].churn == (0.0,)


def test_clv_of_four_customers_historic_and_predictive(db: Engine) -> None:
    store(
        db,
        [customer(c, day(1, 2)) for c in "abcd"],
        [
            order("a", day(1, 10), 10_000),
            order("a", day(2, 10), 5_000),
            order("b", day(1, 15), 3_000),
            order("c", day(3, 1), 2_000),
            order("d", day(3, 2), 49.99),  # not whole cents: an order without revenue,
            # as the roll-ups count it (engine.data.ingest.apply_rollups)
        ],
    )
    result = report(db)
    # Orders: 5 by 4 buyers, revenue 200.00; a is the one repeat buyer.
    assert (result.orders.orders, result.orders.buyers) == (5, 4)
    assert result.orders.revenue_cents == 20_000
    assert result.orders.average_order_value_cents == 4_000
    assert result.orders.orders_per_customer == 5 / 4
    assert result.orders.repeat_purchase_rate == 1 / 4
    # Historic: the January cohort's revenue to date per customer, 20,000 / 4.
    (cohort,) = result.cohorts
    assert (cohort.size, cohort.revenue_cents, cohort.clv_cents) == (4, 20_000, 5_000)
    # Predictive over January to March: active customer-months a: Jan, Feb; b: Jan;
    # c: Mar; d: Mar = 5. Months with a next month in the window (Jan, Feb): a-Jan (kept),
    # a-Feb (lost), b-Jan (lost) = 3, of which 2 lost: r = 2/3, lifetime 1.5 months.
    # f = 5 orders / 5 customer-months = 1; AOV = 4,000; CLV = 4,000 × 1 × 1.5 = 6,000.
    p = result.predictive
    assert (p.first, p.last) == ("2026-01", "2026-03")
    assert (p.active_months, p.pairs, p.lost) == (5, 3, 2)
    assert p.monthly_churn == pytest.approx(2 / 3)
    assert p.lifetime_months == pytest.approx(1.5)
    assert p.frequency == 1.0
    assert p.clv_cents == pytest.approx(6_000)
    assert p.note is None


def test_predictive_clv_needs_two_complete_months(db: Engine) -> None:
    store(db, [customer("a", day(1, 2))], [order("a", day(1, 10), 1_000)])
    p = report(db, since=day(1, 1, 0), until=day(2, 15)).predictive
    assert p.clv_cents is None
    assert p.note == "needs two complete calendar months in the period"


def test_nps_of_ten_answers_overall_per_stage_and_per_week(db: Engine) -> None:
    loyal = [("l1", 10), ("l2", 9), ("l3", 9), ("l4", 9), ("l5", 8)]
    at_risk = [("r1", 7), ("r2", 6), ("r3", 3), ("r4", 10), ("r5", 0)]
    customers = [customer(c, day(1, 2), "loyal") for c, _ in loyal]
    customers += [customer(c, day(1, 2), "at_risk") for c, _ in at_risk]
    answers = [answer(c, day(2, 2 + i), s) for i, (c, s) in enumerate(loyal + at_risk)]
    answers += [
        answer("l1", datetime(2025, 12, 30, tzinfo=UTC), 0),  # before the period
        answer("r1", day(2, 20), 11),  # not a score of 0 to 10: left out
        answer("r2", day(2, 21), "9"),  # text, not a score: left out
    ]
    store(db, customers, answers)
    result = report(db)
    # Promoters 10, 9, 9, 9, 10 = 5; passives 8, 7 = 2; detractors 6, 3, 0 = 3.
    # NPS = 50% - 30% = 20.
    assert (result.nps.promoters, result.nps.passives, result.nps.detractors) == (5, 2, 3)
    assert result.nps.answers == 10
    assert result.nps.score == pytest.approx(20.0)
    # Loyal: 4 promoters, 1 passive of 5: 80. At risk: 1 promoter, 1 passive, 3 detractors: -40.
    assert result.nps_by_stage["loyal"].score == pytest.approx(80.0)
    assert result.nps_by_stage["at_risk"].score == pytest.approx(-40.0)
    # Per week (Mondays): 2 Feb (Mon) to 8 Feb holds answers 1-7, 9 Feb to 15 Feb 8-10.
    weeks = {start.isoformat(): n for start, n in result.nps_trend}
    assert result.nps_bucket == "week"
    assert sorted(weeks) == ["2026-02-02", "2026-02-09"]
    first = weeks["2026-02-02"]  # 10, 9, 9, 9, 8, 7, 6
    assert (first.promoters, first.passives, first.detractors) == (4, 2, 1)
    second = weeks["2026-02-09"]  # 3, 10, 0
    assert (second.promoters, second.passives, second.detractors) == (1, 0, 2)


def test_the_transition_matrix_and_the_stage_counts(db: Engine) -> None:
    people = {"p1": "active", "p2": "active", "p3": "at_risk", "p4": None}
    store(
        db,
        [customer(c, day(1, 2), stage) for c, stage in people.items()],
        [
            StageTransition(customer_id=c, from_stage=f, to_stage=t, at=at, rules_version="v")
            for c, f, t, at in [
                ("p1", None, "prospect", day(1, 2)),
                ("p2", None, "prospect", day(1, 2)),
                ("p3", None, "prospect", day(1, 2)),
                ("p1", "prospect", "active", day(1, 20)),
                ("p2", "prospect", "active", day(2, 3)),
                ("p3", "prospect", "active", day(2, 3)),
                ("p3", "active", "at_risk", day(3, 30)),
                ("p3", "at_risk", "churned", datetime(2026, 4, 1, tzinfo=UTC)),  # after
            ]
        ],
    )
    result = report(db)
    assert result.transitions == {
        (NEW, "prospect"): 3,
        ("prospect", "active"): 3,
        ("active", "at_risk"): 1,
    }
    froms, tos = result.transition_stages()
    assert froms == [NEW, "prospect", "active"]  # in the funnel's order
    assert tos == ["prospect", "active", "at_risk"]
    # Now: every stage of the funnel, and the customer no evaluation has seen yet.
    assert [(s.stage, s.customers) for s in result.stages] == [
        ("prospect", 0),
        ("active", 2),
        ("loyal", 0),
        ("at_risk", 1),
        ("churned", 0),
        (UNASSIGNED, 1),
    ]
    assert result.customers == 4
    assert csv_tables(result)["transitions.csv"] == [
        ["from \\ to", "prospect", "active", "at_risk"],
        [NEW, 3, 0, 0],
        ["prospect", 0, 3, 0],
        ["active", 0, 0, 1],
    ]


def test_onboarding_conversion_within_n_days(db: Engine) -> None:
    store(
        db,
        [
            customer("s1", day(1, 1)),
            customer("s2", day(1, 5)),
            customer("s3", day(3, 10)),  # its 30 days are not over by 1 April
            customer("s4", day(2, 1)),
        ],
        [
            order("s1", day(1, 20), 100),  # 19 days after signing up
            order("s1", day(2, 10), 100),  # 21 days after the first
            order("s2", day(2, 20), 100),  # 46 days: too late
            order("s3", day(3, 12), 100),
        ],
    )
    first, second = report(db).onboarding
    # Sign-up → first order in 30 days: s1, s2 and s4 are due (s3 is not); s1 converted.
    assert (first.eligible, first.converted, first.within_days) == (3, 1, 30)
    # First → second order: first orders before 2 March: s1 and s2; s1's came in 21 days.
    assert (second.eligible, second.converted) == (2, 1)


def test_the_json_of_an_empty_period_has_every_section(db: Engine) -> None:
    document = as_json(report(db))
    assert document["customers"] == 0
    assert document["cohorts"] == []
    assert document["nps"]["nps"] is None and document["nps"]["answers"] == 0
    assert document["clv"]["predictive"]["clv_cents"] is None
    assert document["orders"]["repeat_purchase_rate"] is None
    assert [s["rate"] for s in document["onboarding"]] == [None, None]

"""The playbook report counts what the journeys did, per arm, on SQLite and PostgreSQL;
a simulated experiment's report holds the truth it was drawn from."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlmodel import col

from engine.bootstrap import App
from engine.data.ingest import CustomerIn, EventIn, record_event, upsert_customer
from engine.data.models import Decision, Enrollment, Message
from engine.data.uow import reading, unit_of_work
from engine.errors import InvalidChoice
from engine.journeys.plan import arm_of, share_of
from engine.runners.ticks import dispatch_tick, evaluation_tick
from engine.usecases.playbook_report import MIN_SAMPLE, PlaybookResult, playbook_results
from engine.usecases.simulate import Experiment, simulate
from tests.support.apps import fixture_app
from tests.support.paths import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "journeys"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
CUSTOMERS = 200


@pytest.fixture
def app(db: Engine, db_url: str, tmp_path: Path) -> Iterator[App]:
    yield fixture_app(db, db_url, tmp_path / "outbox", FIXTURES / "rules", FIXTURES / "templates")


def ab_customers(app: App, count: int = CUSTOMERS) -> list[str]:
    ids = [f"ab{n:04d}" for n in range(count)]
    with unit_of_work(app.db) as session:
        for customer_id in ids:
            data = CustomerIn(
                id=customer_id,
                email=f"{customer_id}@example.com",
                email_opt_in=True,
                signed_up_at=START - timedelta(days=3),
                attributes={"plan": "ab"},
            )
            upsert_customer(session, data, START)
    return ids


def order(app: App, customer_id: str, at: datetime) -> None:
    with unit_of_work(app.db) as session:
        event = EventIn(
            id=f"{customer_id}-order-{at:%d%H}",
            customer_id=customer_id,
            type="order_placed",
            occurred_at=at,
            properties={"amount_cents": 2500},
        )
        record_event(session, event, at)


def expected_arm(app: App, customer_id: str) -> str:
    if share_of(f"holdout:abtest:{customer_id}") < 0.10:
        return "holdout"
    split = app.rules.playbooks["abtest"].steps[0].split
    assert split is not None
    return arm_of(split, "abtest", "pick", customer_id).name


def results(app: App, since: datetime, until: datetime) -> PlaybookResult:
    with reading(app.db) as session:
        found = playbook_results(session, app.rules, since, until)
    return next(result for result in found if result.playbook == "abtest")


def test_the_report_counts_each_arm_as_the_journeys_went(app: App) -> None:
    ids = ab_customers(app)
    evaluation_tick(app, START, full=True, workers=0)
    dispatch_tick(app, START)
    arms = {customer_id: expected_arm(app, customer_id) for customer_id in ids}
    # Every fifth customer orders two days later, inside the 7-day window; every
    # seventh (not a fifth) orders ten days later, outside it.
    converts = [c for n, c in enumerate(ids) if n % 5 == 0]
    too_late = [c for n, c in enumerate(ids) if n % 7 == 0 and n % 5 != 0]
    for customer_id in converts:
        order(app, customer_id, START + timedelta(days=2))
    evaluation_tick(app, START + timedelta(days=2, hours=1), workers=0)
    for customer_id in too_late:
        order(app, customer_id, START + timedelta(days=10))
    evaluation_tick(app, START + timedelta(days=10, hours=1), workers=0)
    # Opens and clicks as the webhooks record them: twice opened counts once.
    with unit_of_work(app.db) as session:
        sent = list(session.scalars(select(Message).where(col(Message.playbook) == "abtest")))
        for message in sent[:10]:
            for outcome in ("opened", "opened", "clicked"):
                session.add(
                    Decision(
                        at=START + timedelta(hours=2),
                        customer_id=message.customer_id,
                        playbook="abtest",
                        outcome=outcome,
                        reason="provider webhook",
                        message_id=message.id,
                        rules_version=app.rules.version,
                    )
                )
    engaged = Counter(arms[m.customer_id] for m in sent[:10])

    result = results(app, START - timedelta(days=1), START + timedelta(days=11))
    assert result.goal == "order_placed within 7d"
    enrolled = Counter(arms.values())
    converted = Counter(arms[c] for c in converts)
    assert set(result.arms) == set(enrolled)
    for name, arm in result.arms.items():
        assert arm.enrolled == enrolled[name], name
        assert arm.converted == converted[name], name
        # Held-out customers are sent nothing; the others got one email each.
        assert arm.sent == (0 if name == "holdout" else enrolled[name]), name
        assert (arm.opened, arm.clicked) == (engaged[name], engaged[name]), name
    with reading(app.db) as session:
        recorded = Counter(
            session.scalars(select(col(Enrollment.arm)).where(col(Enrollment.playbook) == "abtest"))
        )
    assert recorded == enrolled  # the store wrote the arm the planner chose

    # Fewer than MIN_SAMPLE held out: no uplift number, "not enough data".
    assert enrolled["holdout"] < MIN_SAMPLE
    for name in ("a", "b"):
        uplift = result.arms[name].uplift
        assert uplift is not None and not uplift.enough_data
        assert (uplift.sample, uplift.comparison_sample) == (enrolled[name], enrolled["holdout"])

    # The period is of entries: a period that ends before them counts none.
    assert results(app, START - timedelta(days=5), START).arms == {}


def test_a_simulated_experiment_reports_next_to_its_truth(app: App) -> None:
    ab_customers(app, 400)
    truth = Experiment("abtest", 0.2, {"b": 0.3})
    report = simulate(app, START, 6, seed=5, experiment=truth)
    outcome = report.experiment
    assert outcome is not None
    arms = {arm.result.arm: arm for arm in outcome.arms}
    assert set(arms) == {"a", "b", "holdout"}
    # Without synthetic activity every conversion is one of the experiment's answers.
    converted = sum(arm.result.converted for arm in outcome.arms)
    assert converted == report.events["order_placed (experiment)"] > 0
    assert arms["a"].answer_rate == pytest.approx(0.2)
    assert arms["b"].answer_rate == pytest.approx(0.5)
    # Everyone entered at the start and was touched at once: the truth is the rates.
    assert arms["b"].true_uplift == pytest.approx(0.3)
    assert arms["a"].true_uplift == pytest.approx(0.0)
    assert arms["holdout"].true_uplift is None and arms["holdout"].covered is None
    for name in ("a", "b"):
        uplift = arms[name].result.uplift
        assert uplift is not None and uplift.interval is not None
        assert arms[name].covered == (
            uplift.interval.low <= arms[name].true_uplift <= uplift.interval.high
        )


def test_an_experiment_on_an_arm_the_playbook_lacks_is_refused(app: App) -> None:
    with pytest.raises(InvalidChoice, match=r"unknown arm of abtest 'c'; use one of: a, b"):
        simulate(app, START, 1, experiment=Experiment("abtest", 0.1, {"c": 0.1}))
    with pytest.raises(InvalidChoice, match="experiment"):
        Experiment.parse("abtest-0.1")
    with pytest.raises(InvalidChoice, match="conversion rate of b"):
        Experiment.parse("abtest:0.9,b=+0.2")

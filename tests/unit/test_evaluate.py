"""Evaluation through durable_rules and in plain Python, and in worker processes that may
die: every test runs against both engines unless it is about durable_rules itself."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import EvaluationWorkerCrashed, FactValueError, RuleEngineError
from engine.evaluation.evaluators import (
    DURABLE_AVAILABLE,
    DurableEvaluator,
    ReferenceEvaluator,
    create_ruleset,
    durable_rules_engine,
    durable_unavailable,
    make_evaluator,
)
from engine.evaluation.workers import CrashTest, evaluate_in_workers
from engine.language import conditions as c
from engine.language.catalog import FactCatalog, FactSource, FactSpec, FactType

CATALOG = FactCatalog.build(
    [
        FactSpec("plan", FactType.STRING, "Plan.", FactSource.ATTRIBUTE, "plus"),
        FactSpec("vip", FactType.BOOL, "VIP.", FactSource.ATTRIBUTE),
        FactSpec("birthday", FactType.DATE, "Birthday.", FactSource.ATTRIBUTE),
        FactSpec(
            "id",
            FactType.STRING,
            "An attribute named like durable's own key.",
            FactSource.ATTRIBUTE,
        ),
        FactSpec("event.reason", FactType.STRING, "Why.", FactSource.EVENT),
        FactSpec("event.severity", FactType.INT, "1 to 3.", FactSource.EVENT),
    ],
    event_types=["signed_up", "complaint", "order_placed", "nps_submitted"],
)

RULES = {
    "welcome_series.enter": 'event == "signed_up" and (email_opt_in)',
    "welcome_series.exit": "orders_count >= 1",
    "welcome_series.step.first_order_offer": "sms_opt_in and orders_count == 0",
    "loyalty_reward.enter": "(orders_count >= 5 or total_spend_cents >= $500) and email_opt_in "
    "and open_complaints == 0",
    "loyalty_reward.step.sms": "sms_opt_in",
    "re_engagement.enter": "days_since_last_activity >= 30 and orders_count >= 1 and email_opt_in "
    "and open_complaints == 0",
    "re_engagement.exit": "days_since_last_activity < 30",
    "referral_ask.enter": "nps_score >= 9 and orders_count >= 1 and open_complaints == 0 "
    "and email_opt_in",
    "referral_ask.exit": "open_complaints > 0",
    "complaint.enter": 'event == "complaint" and event.severity >= 2 and event.reason != "test"',
    "locale.enter": 'locale in ["en-GB", "en-US"] and not vip and plan != "free"',
    "birthday.enter": "birthday >= 1990-01-01 and birthday < 2000-01-01",
    "odd_id.enter": 'id not in ["x", "y"]',
    "always.enter": "true",
    "never.enter": "false and email_opt_in",
}
CONDITIONS = {rule: c.compile_condition(text, CATALOG) for rule, text in RULES.items()}
# durable_rules is not installed on Python 3.13+ (pyproject's marker): its own tests skip
# there, saying why, and "durable" then means the reference evaluator (tested below).
needs_durable = pytest.mark.skipif(not DURABLE_AVAILABLE, reason=str(durable_unavailable()))
ENGINES = [pytest.param("durable", marks=needs_durable), "reference"]
FLOATS = "decimal numbers are not accepted: use whole numbers (money in cents)"


def random_facts(rng: random.Random) -> dict[str, object]:
    maybe = lambda *values: rng.choice((None, *values))  # noqa: E731
    return {
        "event": maybe("signed_up", "complaint", "order_placed"),
        "email_opt_in": maybe(True, False),
        "sms_opt_in": maybe(True, False),
        "orders_count": maybe(0, 1, 4, 5, 12),
        "total_spend_cents": maybe(0, 49_999, 50_000, 2**53),
        "open_complaints": maybe(0, 1),
        "days_since_last_activity": maybe(0, 29, 30, 400),
        "nps_score": maybe(0, 8, 9, 10),
        "event.severity": maybe(1, 2, 3),
        "event.reason": maybe("test", "late delivery", 'he said "no"', "é"),
        "locale": maybe("en-GB", "en-US", "fr-FR", ""),
        "vip": maybe(True, False),
        "plan": maybe("free", "plus"),
        "birthday": maybe(7_000, 7_305, 10_956, 10_957, -3),
        "id": maybe("x", "z", "0"),
        "unrelated": 1.5,  # not used by any rule: never looked at
    }


def rows(count: int, seed: int = 7) -> list[tuple[str, dict[str, object]]]:
    rng = random.Random(seed)
    return [(f"c{i:05d}", random_facts(rng)) for i in range(count)]


def reference_results(
    batch: list[tuple[str, dict[str, object]]],
) -> list[tuple[str, frozenset[str]]]:
    return [
        (key, frozenset(r for r, cond in CONDITIONS.items() if c.evaluate(cond, facts)))
        for key, facts in batch
    ]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --------------------------------------------------------------------------- in process


def test_a_realistic_customer(engine: str) -> None:
    facts = {
        "event": "signed_up",
        "email_opt_in": True,
        "sms_opt_in": True,
        "orders_count": 0,
        "total_spend_cents": 0,
        "open_complaints": 0,
        "days_since_last_activity": 0,
        "locale": "en-GB",
        "vip": False,
        "plan": "plus",
        "id": "z",
        "birthday": 7_305,
    }
    with make_evaluator(CONDITIONS, engine) as evaluator:
        assert evaluator.evaluate(facts, "c1") == {
            "welcome_series.enter",
            "welcome_series.step.first_order_offer",
            "loyalty_reward.step.sms",
            "re_engagement.exit",
            "locale.enter",
            "birthday.enter",
            "odd_id.enter",
            "always.enter",
        }


def test_constants_need_no_facts_and_unknown_facts_match_nothing_else(engine: str) -> None:
    with make_evaluator(CONDITIONS, engine) as evaluator:
        assert evaluator.evaluate({}, "empty") == {"always.enter"}
        assert evaluator.evaluate({"orders_count": None, "vip": None}, "nones") == {"always.enter"}


@needs_durable
def test_only_constant_conditions_never_reach_durable_rules() -> None:
    constants = {
        "a": c.compile_condition("true", CATALOG),
        "b": c.compile_condition("not true", CATALOG),
    }
    with DurableEvaluator(constants) as evaluator:
        assert evaluator.bundle.rules == {}
        assert evaluator.partitions == []
        assert evaluator.evaluate({"orders_count": 3}, "k") == {"a"}


@needs_durable
def test_identical_conditions_share_one_durable_rule() -> None:
    same = {
        "a.enter": c.compile_condition("email_opt_in and orders_count > 1", CATALOG),
        "b.enter": c.compile_condition(
            "orders_count > 1 and email_opt_in and email_opt_in", CATALOG
        ),
        "c.enter": c.compile_condition("not (not email_opt_in or orders_count <= 1)", CATALOG),
        "d.enter": c.compile_condition("orders_count > 1", CATALOG),
    }
    with DurableEvaluator(same) as evaluator:
        assert evaluator.bundle.ruleset() == {
            "r0": {"all": [{"m": {"$and": [{"email_opt_in": 1}, {"$gt": {"orders_count": 1}}]}}]},
            "r1": {"all": [{"m": {"$gt": {"orders_count": 1}}}]},
        }
        assert evaluator.bundle.rules == {
            "r0": ("a.enter", "b.enter", "c.enter"),
            "r1": ("d.enter",),
        }
        assert evaluator.evaluate({"email_opt_in": True, "orders_count": 2}, "k") == {
            "a.enter",
            "b.enter",
            "c.enter",
            "d.enter",
        }


@needs_durable
def test_durable_rules_agrees_with_the_reference_on_many_customers() -> None:
    """One evaluator, one session, thousands of asserted and retracted facts: nothing
    leaks from one customer into the next."""
    batch = rows(5_000)
    with DurableEvaluator(CONDITIONS) as durable:
        assert durable.evaluate_many(batch) == ReferenceEvaluator(CONDITIONS).evaluate_many(batch)
        assert durable.evaluate_many(batch) == reference_results(batch)


@pytest.mark.parametrize(
    ("fact", "value", "message"),
    [
        (
            "orders_count",
            1.0,
            "fact 'orders_count' = 1.0 (float): " + FLOATS,
        ),
        (
            "total_spend_cents",
            1e-05,
            "fact 'total_spend_cents' = 1e-05 (float): " + FLOATS,
        ),
        (
            "orders_count",
            True,
            "fact 'orders_count' = True (bool): expected a number, not true/false",
        ),
        ("email_opt_in", 1, "fact 'email_opt_in' = 1 (int): expected true or false, not a number"),
        ("locale", 5, "fact 'locale' = 5 (int): expected text, not a number"),
        ("nps_score", "9", "fact 'nps_score' = '9' (str): expected a number, not text"),
        (
            "total_spend_cents",
            2**60,
            "fact 'total_spend_cents' = 1152921504606846976 (int): numbers must be within +-2**53",
        ),
    ],
)
def test_unsafe_values_are_refused_alike(
    engine: str, fact: str, value: object, message: str
) -> None:
    facts = {"email_opt_in": True, "orders_count": 5, fact: value}
    with make_evaluator(CONDITIONS, engine) as evaluator, pytest.raises(FactValueError) as caught:
        evaluator.evaluate(facts, "c9")
    assert str(caught.value) == message
    with make_evaluator(CONDITIONS, engine) as evaluator:  # and the evaluator stays usable
        assert evaluator.evaluate({"orders_count": 1}, "c10") == {
            "welcome_series.exit",
            "always.enter",
        }


def test_dates_may_be_given_as_dates(engine: str) -> None:
    from datetime import date

    with make_evaluator(CONDITIONS, engine) as evaluator:
        assert "birthday.enter" in evaluator.evaluate({"birthday": date(1995, 6, 1)}, "k")
        assert "birthday.enter" not in evaluator.evaluate({"birthday": date(2000, 1, 1)}, "k")


@needs_durable
def test_an_action_left_by_another_fact_never_leaks_into_a_customer() -> None:
    """A fact someone else asserted into the session leaves an action pending; the next
    customer would drain it as their own. The evaluator notices, says so, and carries on
    from a fresh ruleset."""
    with DurableEvaluator(CONDITIONS) as evaluator:
        stray = '{"sid":"0","id":"stray","orders_count":1,"email_opt_in":1}'
        durable_rules_engine.assert_fact(evaluator._handles[0], stray)
        with pytest.raises(RuleEngineError) as caught:
            evaluator.evaluate({"orders_count": 0, "sms_opt_in": True}, "c1")
        assert str(caught.value) == (
            "durable_rules failed to evaluate customer 'c1': it handed back an action that is "
            """not for this customer ({"r11":{"m":{"sid":"0","id":"stray","orders_count":1,"""
            """"email_opt_in":1}}}); the ruleset was rebuilt"""
        )
        assert evaluator.evaluate({"orders_count": 0, "sms_opt_in": True}, "c1") == {
            "welcome_series.step.first_order_offer",
            "loyalty_reward.step.sms",
            "always.enter",
        }


@needs_durable
def test_a_closed_evaluator_refuses_to_evaluate() -> None:
    evaluator = DurableEvaluator(CONDITIONS)
    evaluator.close()
    with pytest.raises(ValueError, match="^this DurableEvaluator is closed$"):
        evaluator.evaluate({"orders_count": 0}, "c1")


@pytest.mark.skipif(DURABLE_AVAILABLE, reason="durable_rules is installed on this Python")
def test_without_durable_rules_the_engine_durable_is_the_reference_evaluator() -> None:
    """Python 3.13+: the fallback is plain (the evaluator says which it is, and why)."""
    with make_evaluator(CONDITIONS, "durable") as evaluator:
        assert isinstance(evaluator, ReferenceEvaluator) and evaluator.engine == "reference"
        assert evaluator.evaluate_many(rows(200)) == reference_results(rows(200))
    with pytest.raises(RuleEngineError) as caught:
        DurableEvaluator(CONDITIONS)
    assert str(durable_unavailable()) in str(caught.value)
    assert str(durable_unavailable()).startswith("durable_rules is not available on Python 3.")


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(
        ValueError, match="^unknown engine 'drools': expected one of durable, reference$"
    ):
        make_evaluator(CONDITIONS, "drools")


# --------------------------------------------------------------------------- durable errors


@needs_durable
def test_a_malformed_ruleset_error_is_translated() -> None:
    with pytest.raises(RuleEngineError) as caught:
        create_ruleset("bad_operator", {"r0": {"all": [{"m": {"$foo": {"a": 1}}}]}})
    assert caught.value.code == 202
    assert caught.value.operation == "create the ruleset 'bad_operator'"
    assert str(caught.value).startswith(
        "durable_rules failed to create the ruleset 'bad_operator': "
    )
    assert str(caught.value).endswith(" (error code 202)")
    with pytest.raises(
        RuleEngineError,
        match=r"^durable_rules failed to create the ruleset 'no_all': .* \(error code 105\)$",
    ):
        create_ruleset("no_all", {"r0": {"when": []}})
    with pytest.raises(
        RuleEngineError,
        match=r"^durable_rules failed to create the ruleset 'exponent': .* \(error code 204\)$",
    ):
        create_ruleset("exponent", '{"r0": {"all": [{"m": {"a": 1e-05}}]}}')


@needs_durable
def test_error_codes_are_named_as_in_durable_rules_header() -> None:
    with pytest.raises(RuleEngineError, match="ERR_UNEXPECTED_NAME"):
        create_ruleset("no_all_again", {"r0": {"when": []}})


def big_lists(count: int) -> dict[str, c.Condition]:
    return {
        f"big{n}.enter": c.compile_condition(
            "orders_count in [" + ", ".join(str(n * 1000 + i) for i in range(200)) + "]", CATALOG
        )
        for n in range(count)
    }


@pytest.mark.timeout(120)  # unsplit, durable_rules would loop forever here
@needs_durable
def test_rules_too_many_for_one_network_are_split_over_rulesets() -> None:
    """Three 200-value lists on one fact would put 600 tests under durable's root node,
    whose 512-slot table then loops forever; 65 tests that can all match one customer
    overflow its 64-deep evaluation stack (error 303). Both are split up in advance."""
    lists = big_lists(3)
    with DurableEvaluator(lists) as durable, ReferenceEvaluator(lists) as reference:
        assert durable.partitions == [("r0", "r1"), ("r2",)]
        batch = [(str(n), {"orders_count": n}) for n in range(0, 2300, 7)]
        assert durable.evaluate_many(batch) == reference.evaluate_many(batch)
        assert durable.evaluate({"orders_count": 2199}, "k") == {"big2.enter"}
    thresholds = {
        f"t{n}.enter": c.compile_condition(f"orders_count >= {n}", CATALOG) for n in range(65)
    }
    with DurableEvaluator(thresholds) as durable:
        assert [len(p) for p in durable.partitions] == [64, 1]
        assert durable.evaluate({"orders_count": 1000}, "k") == set(thresholds)
        assert durable.evaluate({"orders_count": 1}, "k") == {"t0.enter", "t1.enter"}


def one_huge_rule() -> dict[str, c.Condition]:
    lists = [
        f"{fact} in [" + ", ".join(str(i) for i in range(200)) + "]"
        for fact in ("orders_count", "nps_score", "open_complaints")
    ]
    return {"huge.enter": c.compile_condition(" or ".join(lists), CATALOG)}


@needs_durable
def test_a_rule_no_network_can_take_is_refused_by_name_first() -> None:
    with pytest.raises(RuleEngineError) as caught:
        DurableEvaluator(one_huge_rule())
    assert str(caught.value) == (
        "durable_rules failed to take the ruleset: 'huge.enter': 600 different tests hang from "
        "one node of its network (at most 480; durable_rules loops forever at 512): shorten the "
        "longest 'in' lists"
    )
    with ReferenceEvaluator(one_huge_rule()) as reference:  # the oracle has no such limit
        assert reference.evaluate({"nps_score": 199}, "k") == {"huge.enter"}


# --------------------------------------------------------------------------- workers


def batches_of(
    batch_rows: list[tuple[str, dict[str, object]]], sizes: list[int]
) -> list[list[tuple[str, dict[str, object]]]]:
    out, start = [], 0
    for size in sizes:
        out.append(batch_rows[start : start + size])
        start += size
    return out


def test_workers_return_every_batch_in_order(engine: str) -> None:
    sizes = [50, 1, 0, 120, 7, 33, 200, 5, 64, 90]
    batches = batches_of(rows(sum(sizes)), sizes)
    results = list(evaluate_in_workers(CONDITIONS, iter(batches), workers=2, engine=engine))
    assert results == [reference_results(b) for b in batches]


def test_workers_read_at_most_two_batches_per_worker_ahead() -> None:
    consumed = 0

    def source() -> Iterator[list[tuple[str, dict[str, object]]]]:
        nonlocal consumed
        for batch in batches_of(rows(400), [20] * 20):
            consumed += 1
            yield batch

    handed_back = 0
    for _ in evaluate_in_workers(CONDITIONS, source(), workers=2):
        handed_back += 1
        assert consumed - handed_back < 2 * 2
    assert handed_back == consumed == 20


def test_a_batch_whose_worker_crashes_once_is_retried(tmp_path: Path) -> None:
    sizes = [30] * 8
    batches = batches_of(rows(240), sizes)
    batches[5] = [
        *batches[5][:10],
        ("crash-once", {"__crash__": "once", "orders_count": 7}),
        *batches[5][10:],
    ]
    results = list(
        evaluate_in_workers(CONDITIONS, batches, workers=2, crash_test=CrashTest(str(tmp_path)))
    )
    assert results == [reference_results(b) for b in batches]
    assert results[5][10] == ("crash-once", frozenset({"welcome_series.exit", "always.enter"}))
    assert len(os.listdir(tmp_path)) == 1  # the worker did die once


def test_a_batch_that_keeps_crashing_its_worker_is_given_up(tmp_path: Path) -> None:
    batches = batches_of(rows(120), [20] * 6)
    batches[3] = [*batches[3], ("c-crash", {"__crash__": "always"})]
    handed_back = []
    with pytest.raises(EvaluationWorkerCrashed) as caught:
        for result in evaluate_in_workers(
            CONDITIONS, batches, workers=2, crash_test=CrashTest(str(tmp_path))
        ):
            handed_back.append(result)
    # The forkserver cannot always read a dead child's status; then the cause is unknown.
    assert str(caught.value) in {
        "evaluation worker died 3 time(s) on the batch of 21 customers starting at 'c00060': "
        f"{cause}"
        for cause in ("the worker was killed by SIGABRT", "a worker process died abruptly")
    }
    assert (caught.value.batch_start, caught.value.batch_size, caught.value.attempts) == (
        "c00060",
        21,
        3,
    )
    assert handed_back == [reference_results(b) for b in batches[:3]]  # the batches before it
    # The caller lives on, and so does evaluation.
    assert list(evaluate_in_workers(CONDITIONS, batches[:2], workers=2)) == [
        reference_results(b) for b in batches[:2]
    ]


def test_only_the_crashing_batch_is_blamed(tmp_path: Path) -> None:
    """A death fails every batch in flight; the innocent ones pass when re-run alone."""
    batches = batches_of(rows(100), [10] * 10)
    batches[6] = [("c-crash", {"__crash__": "always"}), *batches[6]]
    with pytest.raises(
        EvaluationWorkerCrashed,
        match=r"^evaluation worker died 2 time\(s\) on the batch of 11 customers "
        r"starting at 'c-crash'",
    ):
        list(
            evaluate_in_workers(
                CONDITIONS, batches, workers=2, max_attempts=2, crash_test=CrashTest(str(tmp_path))
            )
        )


def test_the_crash_hook_does_nothing_unless_asked_for() -> None:
    batch = [("c-crash", {"__crash__": "always", "orders_count": 1})]
    assert list(evaluate_in_workers(CONDITIONS, [batch], workers=1)) == [
        [("c-crash", frozenset({"welcome_series.exit", "always.enter"}))]
    ]


def test_an_error_in_a_worker_reaches_the_caller_as_it_was_raised() -> None:
    batches = batches_of(rows(60), [20] * 3)
    batches[1] = [*batches[1], ("c-bad", {"orders_count": 2.5})]
    with pytest.raises(FactValueError) as caught:
        list(evaluate_in_workers(CONDITIONS, batches, workers=2))
    assert str(caught.value) == ("fact 'orders_count' = 2.5 (float): " + FLOATS)
    assert caught.value.fact == "orders_count"


@needs_durable
def test_a_ruleset_durable_rules_refuses_fails_in_the_caller_before_any_worker() -> None:
    with pytest.raises(
        RuleEngineError, match="'huge.enter': 600 different tests hang from one node"
    ):
        evaluate_in_workers(one_huge_rule(), [], workers=2)


def test_stopping_early_is_clean() -> None:
    batches = batches_of(rows(200), [10] * 20)
    results = evaluate_in_workers(CONDITIONS, iter(batches), workers=2)
    assert next(results) == reference_results(batches[0])
    results.close()  # type: ignore[attr-defined]
    assert list(evaluate_in_workers(CONDITIONS, batches[:1], workers=1)) == [
        reference_results(batches[0])
    ]

"""The statistics of the playbook report, against published values."""

from __future__ import annotations

import pytest

from engine.usecases.playbook_report import (
    MIN_SAMPLE,
    ArmResult,
    newcombe,
    uplift,
    wilson,
)


def test_the_wilson_interval_of_ten_in_a_hundred() -> None:
    interval = wilson(10, 100)
    assert (round(interval.low, 4), round(interval.high, 4)) == (0.0552, 0.1744)


def test_newcombes_hybrid_interval_matches_his_paper() -> None:
    # Newcombe (1998), "Interval estimation for the difference between independent
    # proportions", Statistics in Medicine 17, table II, example (a): 56/70 - 48/80,
    # method 10 gives 0.0524 to 0.3339.
    difference, interval = newcombe(56, 70, 48, 80)
    assert round(difference, 4) == 0.2
    assert (round(interval.low, 4), round(interval.high, 4)) == (0.0524, 0.3339)


def test_an_uplift_needs_enough_of_both_groups() -> None:
    small = ArmResult("b", enrolled=MIN_SAMPLE - 1, converted=10)
    holdout = ArmResult("holdout", enrolled=500, converted=50)
    thin = uplift(small, holdout, "holdout")
    assert (thin.difference, thin.interval, thin.enough_data) == (None, None, False)
    enough = uplift(ArmResult("b", enrolled=400, converted=60), holdout, "holdout")
    assert enough.difference == pytest.approx(0.05)
    assert enough.interval is not None and enough.interval.low < 0.05 < enough.interval.high

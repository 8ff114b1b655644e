"""Geometry for the console's server-rendered SVG charts, worked out here so that the
templates only draw: the daily sends of a playbook (vertical bars over days) and its
conversion rate by arm (horizontal bars with their 95% intervals). No JavaScript."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from engine.usecases.playbook_report import ArmResult, wilson


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    day: date
    count: int
    labelled: bool  # the day is written under the axis


@dataclass(frozen=True)
class BarChart:
    """One bar per day, as tall as its share of the busiest day."""

    width: int
    height: int
    top: int
    baseline: float
    left: int
    bars: list[Bar]
    peak: int
    total: int

    @classmethod
    def of(
        cls, series: Sequence[tuple[date, int]], width: int = 640, height: int = 180
    ) -> BarChart:
        left, right, top, bottom = 36, 8, 12, 28
        plot_w, plot_h = width - left - right, height - top - bottom
        peak = max((n for _, n in series), default=0)
        slot = plot_w / max(len(series), 1)
        # About eight day labels whatever the range, and always the last day's.
        every = max(1, round(len(series) / 8))
        bars = []
        for i, (day, count) in enumerate(series):
            bar_h = (count / peak) * plot_h if peak else 0.0
            last = i == len(series) - 1
            bars.append(
                Bar(
                    x=round(left + i * slot + slot * 0.1, 1),
                    y=round(top + plot_h - bar_h, 1),
                    width=round(slot * 0.8, 1),
                    height=round(bar_h, 1),
                    day=day,
                    count=count,
                    labelled=last or (i % every == 0 and len(series) - i > every / 2),
                )
            )
        return cls(width, height, top, top + plot_h, left, bars, peak, sum(n for _, n in series))


@dataclass(frozen=True)
class RateBar:
    arm: str
    y: float
    width: float  # the rate's bar
    low: float  # the 95% interval's ends, as x
    high: float
    label: str  # "12.3% (45 of 366)"


@dataclass(frozen=True)
class RateChart:
    """Conversion rate per arm: a bar for the rate, a whisker for its 95% Wilson
    interval, and a dashed line at the comparison group's rate."""

    width: int
    height: int
    left: int
    row: int
    bar: int
    scale: float  # the rate at the right edge of the plot
    right_edge: float
    bars: tuple[RateBar, ...]
    reference: float | None  # x of the comparison group's rate
    reference_arm: str | None

    @classmethod
    def of(cls, arms: Sequence[ArmResult], comparison: str | None, width: int = 560) -> RateChart:
        left, right, top, row, bar = 84, 150, 10, 30, 16
        plot = width - left - right
        shown = [arm for arm in arms if arm.enrolled]
        intervals = {arm.arm: wilson(arm.converted, arm.enrolled) for arm in shown}
        highest = max((i.high for i in intervals.values()), default=0.0)
        scale = _nice_ceiling(highest)

        def x(rate: float) -> float:
            return round(left + plot * rate / scale, 1)

        bars = tuple(
            RateBar(
                arm=arm.arm,
                y=top + i * row,
                width=round(plot * (arm.rate or 0.0) / scale, 1),
                low=x(intervals[arm.arm].low),
                high=x(intervals[arm.arm].high),
                label=f"{arm.rate or 0.0:.1%} ({arm.converted:,} of {arm.enrolled:,})",
            )
            for i, arm in enumerate(shown)
        )
        reference = next((arm for arm in shown if arm.arm == comparison), None)
        return cls(
            width=width,
            height=top * 2 + row * max(len(bars), 1) + 14,
            left=left,
            row=row,
            bar=bar,
            scale=scale,
            right_edge=left + plot,
            bars=bars,
            reference=x(reference.rate or 0.0) if reference is not None else None,
            reference_arm=comparison if reference is not None else None,
        )


def _nice_ceiling(rate: float) -> float:
    """The axis' end: the first of 1%, 2%, 5%, 10%, 20%, 50%, 100% at or above ``rate``."""
    for step in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5):
        if rate <= step:
            return step
    return 1.0

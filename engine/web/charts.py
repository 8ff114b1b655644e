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


# ---------------------------------------------------------------- the Lifecycle page


@dataclass(frozen=True)
class FunnelBar:
    stage: str
    label: str
    y: float
    width: float
    count: int
    text: str  # "502 (25.1%)"


@dataclass(frozen=True)
class FunnelChart:
    """Customers per stage now, one horizontal bar per stage in the funnel's order."""

    width: int
    height: int
    left: int
    bar: int
    bars: tuple[FunnelBar, ...]
    total: int

    @classmethod
    def of(cls, counts: Sequence[tuple[str, str, int]], width: int = 560) -> FunnelChart:
        left, right, top, row, bar = 96, 110, 8, 26, 16
        plot = width - left - right
        total = sum(n for _, _, n in counts)
        peak = max((n for _, _, n in counts), default=0)
        bars = tuple(
            FunnelBar(
                stage=stage,
                label=label,
                y=top + i * row,
                width=round(plot * n / peak, 1) if peak else 0.0,
                count=n,
                text=f"{n:,} ({n / total:.1%})" if total else "0",
            )
            for i, (stage, label, n) in enumerate(counts)
        )
        return cls(width, top * 2 + row * max(len(bars), 1), left, bar, bars, total)


@dataclass(frozen=True)
class HeatCell:
    x: float
    y: float
    month: int  # months since sign-up
    rate: float | None  # retention; None: not observed yet
    opacity: float
    text: str


@dataclass(frozen=True)
class HeatRow:
    cohort: str
    size: int
    y: float
    cells: tuple[HeatCell, ...]


@dataclass(frozen=True)
class HeatMap:
    """Retention by sign-up cohort (rows) and month since sign-up (columns); the darker
    the cell, the larger the share of the cohort active that month. Month 0 (the sign-up
    itself, 100% by definition) is left out; the latest cohorts and months are shown."""

    width: int
    height: int
    left: int
    top: int
    cell_w: float
    cell_h: int
    months: tuple[int, ...]
    rows: tuple[HeatRow, ...]
    peak: float

    @classmethod
    def of(
        cls,
        cohorts: Sequence[tuple[str, int, Sequence[float | None]]],
        width: int = 560,
        max_rows: int = 12,
        max_months: int = 12,
    ) -> HeatMap:
        left, top, cell_h = 92, 22, 22
        shown = list(cohorts)[-max_rows:]
        longest = max((len(rates) for _, _, rates in shown), default=1)
        months = tuple(range(1, min(longest, max_months + 1)))
        cell_w = (width - left - 4) / max(len(months), 1)
        peak = max(
            (r for _, _, rates in shown for r in rates[1 : max_months + 1] if r is not None),
            default=0.0,
        )
        rows = []
        for i, (cohort, size, rates) in enumerate(shown):
            cells = []
            for j, month in enumerate(months):
                rate = rates[month] if month < len(rates) else None
                if month >= len(rates):
                    continue  # not reached yet: no cell
                cells.append(
                    HeatCell(
                        x=round(left + j * cell_w, 1),
                        y=top + i * cell_h,
                        month=month,
                        rate=rate,
                        opacity=round(0.08 + 0.92 * (rate or 0.0) / peak, 3) if peak else 0.08,
                        text=f"{rate:.0%}" if rate is not None else "",
                    )
                )
            rows.append(HeatRow(cohort, size, top + i * cell_h, tuple(cells)))
        height = top + cell_h * max(len(rows), 1) + 6
        return cls(width, height, left, top, round(cell_w, 1), cell_h, months, tuple(rows), peak)


@dataclass(frozen=True)
class TrendPoint:
    x: float
    y: float
    start: date
    score: float
    answers: int


@dataclass(frozen=True)
class TrendChart:
    """NPS per week or month on a fixed scale of -100 to 100, with the zero line."""

    width: int
    height: int
    left: int
    right_edge: int
    top: int
    zero: float
    bottom: float
    points: tuple[TrendPoint, ...]
    path: str  # the SVG polyline's points

    @classmethod
    def of(
        cls, series: Sequence[tuple[date, float | None, int]], width: int = 560, height: int = 200
    ) -> TrendChart:
        left, right, top, bottom = 40, 12, 12, 28
        plot_w, plot_h = width - left - right, height - top - bottom
        shown = [(start, score, n) for start, score, n in series if score is not None]
        slot = plot_w / max(len(shown), 1)

        def y(score: float) -> float:
            return round(top + plot_h * (100 - score) / 200, 1)

        points = tuple(
            TrendPoint(round(left + slot * (i + 0.5), 1), y(score), start, round(score, 1), n)
            for i, (start, score, n) in enumerate(shown)
        )
        path = " ".join(f"{p.x},{p.y}" for p in points)
        return cls(width, height, left, width - right, top, y(0), top + plot_h, points, path)

"""The overview's chart: failed runs per hour, as SVG geometry computed here.

The template draws the bars in a fixed ``viewBox`` that scales to the page
width; no script and no chart library.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["Bar", "BarChart", "bar_chart"]

WIDTH = 960  # viewBox units
HEIGHT = 200
PLOT_TOP = 18  # room for the count above the tallest bar
PLOT_BOTTOM = 170  # the baseline; hour labels below it
GAP = 6


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    count: int
    title: str  # the tooltip
    label: str  # the hour under the bar ('' for most, to keep them legible)


@dataclass(frozen=True)
class BarChart:
    width: int
    height: int
    baseline: int
    bars: list[Bar]
    peak: int
    total: int


def bar_chart(points: list[tuple[datetime, int]]) -> BarChart:
    """One bar an hour; bar heights are proportional to the busiest hour."""
    peak = max((n for _, n in points), default=0)
    slot = WIDTH / max(len(points), 1)
    bars = []
    for i, (hour, n) in enumerate(points):
        height = 0.0 if peak == 0 else (PLOT_BOTTOM - PLOT_TOP) * n / peak
        if n and height < 2:
            height = 2.0
        bars.append(Bar(x=i * slot + GAP / 2, y=PLOT_BOTTOM - height, width=slot - GAP,
                        height=height, count=n,
                        title=f"{hour:%Y-%m-%d %H}:00 to {hour:%H}:59 UTC: {n} failed run(s)",
                        label=f"{hour:%H}h" if i % 3 == 0 else ""))
    return BarChart(WIDTH, HEIGHT, PLOT_BOTTOM, bars, peak, sum(n for _, n in points))

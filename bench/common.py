"""What every benchmark module shares: the result row and small measuring helpers.

A benchmark module in ``bench/`` defines ``NAME`` and ``async def run(stack) -> list[Row]``, where
``stack`` is a started :class:`deploy.launcher.Stack` (services, holders and edge up). Register it
in ``bench/__main__.py``'s ``MODULES``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    benchmark: str
    metric: str
    value: float
    unit: str
    reference: str = ""
    reference_value: float | None = None
    goal: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference_value in (None, 0):
            return None
        return self.value / self.reference_value  # type: ignore[operator]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else float("nan"),
        "mean": statistics.fmean(ms) if ms else float("nan"),
    }


def table(rows: list[Row]) -> str:
    head = ("benchmark", "metric", "value", "unit", "reference (same run)", "ref value", "ratio", "goal")
    body = []
    for r in rows:
        body.append((
            r.benchmark, r.metric, f"{r.value:,.2f}", r.unit, r.reference,
            "" if r.reference_value is None else f"{r.reference_value:,.2f}",
            "" if r.ratio is None else f"{r.ratio:.2f}", r.goal,
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *(line(b) for b in body)])

"""Mean and 95% confidence interval over seeds (Student t): pure maths for reports."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Estimate:
    """The mean of n values and the half-width of its 95% confidence interval (None for
    n < 2: one run says nothing about the spread)."""

    mean: float
    half_width: float | None
    n: int


def estimate(values: Iterable[float | None], level: float = 0.95) -> Estimate | None:
    """Mean +- t_{(1+level)/2, n-1} * s / sqrt(n) of the finite values; None if none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Estimate(mean, None, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Estimate(mean, float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n), n)

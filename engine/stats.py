"""Statistics over seeds: per-condition mean, sample std and 95% CI, and Welch intervals for differences.

Few seeds (3-5) per condition, so intervals use Student's t (scipy.stats.t) rather than a normal
approximation; the difference of two conditions uses Welch's t (unequal variances, Welch-Satterthwaite
degrees of freedom), since e.g. from-scratch runs spread more than pretrained ones.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """n values: mean, sample std (ddof=1) and the t confidence interval of the mean; std / CI are None for n < 2."""

    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """A - B: difference of means, its Welch CI (None with fewer than 2 values on a side) and whether the
    expected ordering held, i.e. the CI lies entirely on the expected side of 0 (False when there is no CI)."""

    diff: float
    ci_low: float | None
    ci_high: float | None
    held: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _clean(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def summarize(values: Sequence[float | None], confidence: float = CONFIDENCE) -> Summary:
    """Summary of the finite, non-null `values` (at least one)."""
    xs = _clean(values)
    if not xs:
        raise ValueError("summarize needs at least one finite value")
    n, mean = len(xs), sum(xs) / len(xs)
    if n < 2:
        return Summary(n, mean, None, None, None)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def compare(a: Sequence[float | None], b: Sequence[float | None], *, higher_is_better: bool = True,
            confidence: float = CONFIDENCE) -> Comparison:
    """A - B with a Welch CI; `held` means A is better than B (greater when `higher_is_better`, else smaller)
    with the CI excluding 0."""
    sa, sb = summarize(a, confidence), summarize(b, confidence)
    diff = sa.mean - sb.mean
    if sa.std is None or sb.std is None:
        return Comparison(diff, None, None, False)
    va, vb = sa.std**2 / sa.n, sb.std**2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0:  # identical values on both sides: the interval is the point
        low = high = diff
    else:
        df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
        half = stats.t.ppf(0.5 + confidence / 2, df) * se
        low, high = diff - half, diff + half
    held = bool(low > 0 if higher_is_better else high < 0)
    return Comparison(diff, float(low), float(high), held)

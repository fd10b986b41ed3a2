"""Statistics over seeds: per-condition mean, sample std and 95% CI, Welch intervals for differences, and the
Markdown tables of both, over experiments in docs/reproduction.json's schema
({name: {"metric", "higher_is_better", "runs": [{"condition", "seed", "value"}]}}).

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


def experiment_record(metric: str, higher_is_better: bool, runs: list[tuple[str, int, float | None]]) -> dict:
    """An experiment in docs/reproduction.json's schema from (condition, seed, value) runs; None values (a run
    that did not report the metric) are left out."""
    return {"metric": metric, "higher_is_better": higher_is_better,
            "runs": [{"condition": c, "seed": s, "value": v} for c, s, v in runs if v is not None]}


def condition_values(experiment: dict, condition: str) -> list[float]:
    """The values of one condition's runs, in run order."""
    return [run["value"] for run in experiment["runs"] if run["condition"] == condition]


def condition_statistics(experiments: dict[str, dict]) -> list[dict]:
    """Mean, sample std and 95 % t interval per experiment x condition (conditions in first-seen order)."""
    rows = []
    for name, experiment in experiments.items():
        for condition in dict.fromkeys(run["condition"] for run in experiment["runs"]):
            rows.append({"experiment": name, "condition": condition,
                         **summarize(condition_values(experiment, condition)).to_dict()})
    return rows


def compare_pairs(experiments: dict[str, dict], pairs: list[tuple]) -> list[dict]:
    """For each (experiment, A, B[, paper]) with runs on both sides: A - B with its Welch 95 % interval, `held`
    (A better than B in the experiment's direction, the interval excluding 0), and with a `paper` ordering
    ('A > B', the default, or 'A <= B') whether the result `agrees` with it."""
    rows = []
    for name, a, b, *paper in pairs:
        experiment = experiments[name]
        values_a, values_b = condition_values(experiment, a), condition_values(experiment, b)
        if values_a and values_b:
            comparison = compare(values_a, values_b, higher_is_better=experiment["higher_is_better"])
            expected = paper[0] if paper else "A > B"
            agrees = comparison.held if expected == "A > B" else not comparison.held
            rows.append({"experiment": name, "a": a, "b": b, **comparison.to_dict(), "paper": expected,
                         "agrees": agrees})
    return rows


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_interval(low: float | None, high: float | None) -> str:
    """`[low, high]` to two decimals, n/a without an interval."""
    return "n/a" if low is None else f"[{low:.2f}, {high:.2f}]"


def statistics_markdown(summary_rows: list[dict], comparison_rows: list[dict]) -> list[str]:
    """Two Markdown tables: per-condition statistics, then the comparisons and whether each ordering held."""
    lines = ["| experiment | condition | n | mean | std | 95% CI |", "|---|---|---:|---:|---:|---|"]
    for row in summary_rows:
        lines.append(f"| {row['experiment']} | {row['condition']} | {row['n']} | {row['mean']:.2f} | "
                     f"{_number(row['std'])} | {format_interval(row['ci_low'], row['ci_high'])} |")
    lines += ["", "Orderings: A − B, difference of means with its 95 % Welch interval; *held* = the interval "
              "excludes 0 on the side where A is better (higher, or lower for errors); *paper* = the ordering the "
              "paper predicts (A ≤ B for a deeper plain net: its degradation) and whether this result agrees.", "",
              "| experiment | A − B | difference | 95% CI | held | paper | agrees |", "|---|---|---:|---|---|---|---|"]
    for row in comparison_rows:
        lines.append(f"| {row['experiment']} | {row['a']} − {row['b']} | {row['diff']:+.2f} | "
                     f"{format_interval(row['ci_low'], row['ci_high'])} | {'yes' if row['held'] else 'no'} | "
                     f"{row.get('paper', 'A > B').replace('<=', '≤')} | "
                     f"{'yes' if row.get('agrees', row['held']) else 'no'} |")
    return lines

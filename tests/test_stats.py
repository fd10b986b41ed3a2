"""experiments.statistics against values computed by hand (t quantiles from a printed t table)."""
import math

import pytest
from scipy import stats

from experiments.statistics import compare, summarize

T_975 = {2: 4.302652729911275, 4: 2.7764451051977987}  # two-sided 95 %: t_{0.975, df}


def test_summary_of_three_values():
    s = summarize([1.0, 2.0, 3.0])
    half = T_975[2] * 1.0 / math.sqrt(3)  # std = 1
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    assert s.ci_low == pytest.approx(2 - half) and s.ci_high == pytest.approx(2 + half)
    assert s.ci_low == pytest.approx(-0.4841377, abs=1e-6)


def test_summary_skips_missing_values_and_has_no_spread_for_one_value():
    assert summarize([None, 5.0, float("nan")]).to_dict() == {"n": 1, "mean": 5.0, "std": None, "ci_low": None,
                                                                 "ci_high": None}
    with pytest.raises(ValueError, match="at least one"):
        summarize([None])


def test_welch_with_equal_sizes_and_variances_has_2n_minus_2_dof():
    c = compare([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])  # se = sqrt(1/3 + 1/3), df = 4
    half = T_975[4] * math.sqrt(2 / 3)
    assert c.diff == -1.0
    assert c.ci_low == pytest.approx(-1 - half) and c.ci_high == pytest.approx(-1 + half)
    assert c.ci_low == pytest.approx(-3.2669579, abs=1e-6)
    assert c.held is False and compare([1.0, 2.0, 3.0], [2.0, 3.0, 4.0], higher_is_better=False).held is False
    assert type(c.ci_low) is float  # plain floats and bools: results go to JSON


def test_welch_unequal_variances_matches_satterthwaite_by_hand():
    a, b = [1.0, 2.0, 3.0], [4.0, 6.0, 8.0, 10.0]  # means 2 and 7, variances 1 and 20/3
    c = compare(a, b, higher_is_better=False)
    df = 216 / 53  # (1/3 + 5/3)^2 / ((1/3)^2 / 2 + (5/3)^2 / 3)
    half = stats.t.ppf(0.975, df) * math.sqrt(2)
    assert c.diff == -5.0 and c.ci_high == pytest.approx(-5 + half) and c.ci_low == pytest.approx(-5 - half)
    assert 2.7764 > stats.t.ppf(0.975, df) > 2.7  # between the table's df=4 and df=5 values (2.776, 2.571)
    assert c.held  # A lower than B, as expected when lower is better; the CI excludes 0
    reference = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (c.ci_low, c.ci_high) == pytest.approx((reference.low, reference.high))
    assert not compare(a, b, higher_is_better=True).held  # the wrong direction never holds


def test_comparison_without_spread():
    one_seed = compare([0.8], [0.5])
    assert one_seed.diff == pytest.approx(0.3) and one_seed.ci_low is None and not one_seed.held
    constant = compare([0.8, 0.8], [0.5, 0.5])
    assert constant.ci_low == constant.ci_high == pytest.approx(0.3) and constant.held

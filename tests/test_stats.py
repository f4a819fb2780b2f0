"""Statistics over seeds, against values worked out by hand (Student t with 2 and 3 degrees
of freedom has closed forms: F(t; 2) = 1/2 + t / (2 sqrt(2 + t^2)))."""

from __future__ import annotations

import math

import pytest

from fedens.stats import curve_band, paired, summary, t_quantile, t_two_sided_p


def test_t_distribution_against_closed_forms():
    # 2 dof: F(t) = 1/2 + t / (2 sqrt(2 + t^2)); the 0.975 quantile solves it: 4.302653
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    t = 3.4641016  # = 2 sqrt(3)
    assert t_two_sided_p(t, 2) == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))), abs=1e-7)
    assert t_quantile(0.975, 3) == pytest.approx(3.182446, abs=1e-6)  # the textbook table value


def test_summary_by_hand():
    s = summary([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, sd sqrt(5/3) = 1.290994, half-width 3.182446 * 1.290994 / 2 = 2.054266
    assert s.n == 4 and s.mean == 2.5 and s.std == pytest.approx(math.sqrt(5 / 3))
    assert s.ci_low == pytest.approx(2.5 - 2.054266, abs=1e-5) and s.ci_high == pytest.approx(2.5 + 2.054266, abs=1e-5)


def test_summary_skips_missing_and_has_no_interval_for_one_value():
    assert summary([None, float("nan"), 0.7]).as_dict() == {"n": 1, "mean": 0.7, "std": None, "ci_low": None, "ci_high": None}
    assert summary([]).n == 0 and summary([]).mean is None


def test_paired_difference_by_hand():
    x = {0: 1.0, 1: 2.0, 2: 4.0}
    y = {0: 0.5, 1: 1.0, 2: 2.5, 3: 9.0}  # seed 3 has no partner: left out
    d = paired(x, y)
    # d = 0.5, 1.0, 1.5: mean 1, sd 0.5, t = 1 / (0.5 / sqrt 3) = 2 sqrt 3 with 2 dof
    assert d.n == 3 and d.seeds == (0, 1, 2) and d.mean == pytest.approx(1.0) and d.std == pytest.approx(0.5)
    half = 4.302653 * 0.5 / math.sqrt(3)
    assert d.ci_low == pytest.approx(1 - half, abs=1e-5) and d.ci_high == pytest.approx(1 + half, abs=1e-5)
    t = 2 * math.sqrt(3)
    assert d.p_value == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))), abs=1e-7)  # 0.0742


def test_paired_with_no_spread():
    assert paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}).p_value == 1.0
    assert paired({0: 1.5, 1: 2.5}, {0: 1.0, 1: 2.0}).p_value == 0.0
    assert paired({0: 1.0}, {0: 0.0}).p_value is None  # one pair: no test


def test_curve_band_per_round():
    band = curve_band([[(0, 1.0), (1, 2.0)], [(0, 3.0), (1, 4.0)], [(1, 6.0)]])
    r0, r1 = band
    assert r0[0] == 0 and r0[1] == 2.0 and r0[2] < 2.0 < r0[3]
    # round 1: values 2, 4, 6: mean 4, sd 2, half = 4.302653 * 2 / sqrt 3
    assert r1[1] == 4.0 and r1[3] - r1[1] == pytest.approx(4.302653 * 2 / math.sqrt(3), abs=1e-5)

"""The pure conformal module behind ATTS."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.judges.conformal import (
    ConditionalCalibrator,
    MarginalCalibrator,
    conformal_p_value,
    conformal_p_values,
    reject,
    rejection_rate,
)

floats = st.floats(-1e6, 1e6, allow_nan=False)


@pytest.mark.parametrize("alpha", [0.1, 0.4, 0.6])
def test_rejection_rate_on_exchangeable_scores_is_alpha(alpha):
    rng = np.random.default_rng(1234)
    n_cal, draws = 50, 2000
    rejected = 0
    for _ in range(draws):
        x = rng.lognormal(mean=1.0, sigma=0.5, size=n_cal + 1)  # perplexity-like, exchangeable
        rejected += reject(float(x[-1]), x[:-1], alpha)
    assert abs(rejected / draws - alpha) <= 0.05


def test_online_marginal_calibrator_rejects_at_alpha_and_catches_a_shift():
    rng = np.random.default_rng(7)
    cal = MarginalCalibrator()
    for s in rng.gamma(4.0, 1.0, size=2000):  # large pool: the rate given this pool is close to alpha
        cal.add(s)
    same = rng.gamma(4.0, 1.0, size=2000)
    rate = np.mean([cal.reject(s, 0.4) for s in same])
    assert abs(rate - 0.4) <= 0.05
    shifted = rng.gamma(4.0, 1.0, size=2000) + 6.0  # the target dislikes these steps
    assert np.mean([cal.reject(s, 0.4) for s in shifted]) > 0.9


def test_conditional_pools_are_separate():
    cal = ConditionalCalibrator()
    for s in (1.0, 2.0, 3.0):
        cal.add(s, "q1")
    cal.add(100.0, "q2")
    assert cal.count("q1") == 3 and cal.count("q2") == 1 and cal.count("q3") == 0
    assert cal.p_value(2.5, "q1") == pytest.approx(2 / 4)
    assert cal.p_value(2.5, "q2") == pytest.approx(2 / 2)
    assert not cal.reject(1e9, 0.5, "q3")  # empty pool: never reject


@settings(max_examples=200, deadline=None)
@given(st.lists(floats, min_size=0, max_size=40), floats)
def test_p_value_is_in_range_and_matches_all_forms(cal, s):
    p = conformal_p_value(s, cal)
    assert 1 / (len(cal) + 1) <= p <= 1.0
    assert conformal_p_values([s], cal)[0] == pytest.approx(p)
    m = MarginalCalibrator(cal)
    assert m.p_value(s) == pytest.approx(p)


@settings(max_examples=200, deadline=None)
@given(st.lists(floats, min_size=1, max_size=40), floats, floats)
def test_p_value_decreases_as_the_score_grows(cal, a, b):
    lo, hi = min(a, b), max(a, b)
    assert conformal_p_value(hi, cal) <= conformal_p_value(lo, cal)


@settings(max_examples=100, deadline=None)
@given(st.lists(floats, min_size=1, max_size=30), st.floats(0, 1))
def test_reject_agrees_with_rejection_rate(cal, alpha):
    scores = cal[::-1]
    rate = rejection_rate(scores, cal, alpha)
    assert rate == pytest.approx(np.mean([reject(s, cal, alpha) for s in scores]))


@settings(max_examples=100, deadline=None)
@given(st.lists(floats, min_size=2, max_size=30), st.integers(1, 10))
def test_bounded_calibrator_keeps_the_latest_scores(scores, size):
    m = MarginalCalibrator(max_size=size)
    for s in scores:
        m.add(s)
    assert sorted(m.scores()) == sorted(scores[-size:])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="alpha"):
        reject(1.0, [1.0], 1.5)
    with pytest.raises(ValueError, match="NaN"):
        MarginalCalibrator().add(float("nan"))

"""Property tests of the pure eval metrics."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.evals.metrics import (
    accuracy,
    bootstrap_ci,
    maj_at_k,
    pareto_front,
    pass_at_k,
    savings,
    summarize,
)


@given(st.integers(1, 30).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_exact_enumeration_and_bounds(nck):
    n, c, k = nck
    p = pass_at_k(n, c, k)
    assert 0.0 <= p <= 1.0
    if n <= 10:
        draws = list(combinations(range(n), k))
        exact = sum(any(i < c for i in d) for d in draws) / len(draws)
        assert math.isclose(p, exact, abs_tol=1e-9)
    assert math.isclose(pass_at_k(n, c, 1), c / n, abs_tol=1e-12)
    if k < n:
        assert pass_at_k(n, c, k + 1) >= p - 1e-12
    if c < n:
        assert pass_at_k(n, c + 1, k) >= p - 1e-12


def test_pass_at_k_rejects_bad_arguments():
    for args in [(3, 4, 1), (3, 1, 0), (3, 1, 4)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)


@given(st.lists(st.booleans(), min_size=1, max_size=60), st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_bootstrap_ci_brackets_the_mean(values, seed):
    lo, hi = bootstrap_ci([float(v) for v in values], seed=seed, resamples=400)
    m = sum(values) / len(values)
    assert 0.0 <= lo <= m <= hi <= 1.0
    if all(values) or not any(values):
        assert lo == hi == m


def test_bootstrap_ci_shrinks_with_more_data():
    small = [1.0, 0.0] * 5
    big = [1.0, 0.0] * 500
    w_small = bootstrap_ci(small)[1] - bootstrap_ci(small)[0]
    w_big = bootstrap_ci(big)[1] - bootstrap_ci(big)[0]
    assert w_big < w_small / 3


@given(st.lists(st.sampled_from(["1", "2", "3", None]), min_size=1, max_size=12), st.integers(1, 12))
def test_maj_at_k_agrees_with_counting(answers, k):
    k = min(k, len(answers))
    correct = [a == "2" for a in answers]
    got = maj_at_k(answers, correct, k)
    head = [a for a in answers[:k] if a is not None]
    if not head:
        assert got is False
        return
    counts = {a: head.count(a) for a in head}
    top = max(counts.values())
    winner = next(a for a in head if counts[a] == top)
    assert got == (winner == "2")
    assert maj_at_k(answers, correct, 1) == (answers[0] == "2")


@given(st.lists(st.tuples(st.floats(0, 1e4), st.floats(0, 1)), min_size=1, max_size=15))
def test_pareto_front_is_exactly_the_undominated_points(points):
    front = set(pareto_front(points))
    for i, (c, a) in enumerate(points):
        dominated = any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in points)
        assert (i in front) == (not dominated)
    costs = [points[i][0] for i in pareto_front(points)]
    assert costs == sorted(costs)


@given(st.lists(st.sampled_from([True, False, None]), min_size=1, max_size=40))
def test_accuracy_ignores_ungraded(flags):
    graded = [f for f in flags if f is not None]
    assert accuracy(flags) == (sum(graded) / len(graded) if graded else 0.0)


def test_summary_and_savings():
    base = summarize("sc", [True, False, True, True], [400, 400, 400, 400], [100] * 4, [2.0] * 4)
    ffs = summarize("ffs", [True, True, False, True], [100, 120, 80, 100], [25] * 4, [0.5] * 4)
    assert base.accuracy == ffs.accuracy == 0.75
    s = savings(ffs, base)
    assert s.tokens_ratio == pytest.approx(0.25) and s.tokens_saved == pytest.approx(0.75)
    assert s.sequential_ratio == pytest.approx(0.25) and s.accuracy_delta == 0
    with pytest.raises(ValueError):
        summarize("x", [True], [1, 2], [1], [1.0])

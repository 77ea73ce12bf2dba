"""Property tests of the pure eval metrics."""

from __future__ import annotations

import math
from collections import Counter
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


def vote_right(answers: list[str | None], correct: list[bool]) -> float:
    """One majority vote, by hand: the most common answer's grade; a tie, the mean grade of the tied answers
    (a uniformly drawn winner); no answer at all, wrong."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    tied = [a for a, c in counts.items() if c == top]
    return sum(correct[answers.index(a)] for a in tied) / len(tied)


ANSWERS = st.lists(st.sampled_from(["1", "2", "3", None]), min_size=1, max_size=9)


@given(ANSWERS, st.integers(1, 9))
def test_maj_at_k_is_the_mean_vote_over_every_k_subset(answers, k):
    k = min(k, len(answers))
    correct = [a == "2" for a in answers]
    subsets = list(combinations(range(len(answers)), k))
    exact = sum(vote_right([answers[i] for i in s], [correct[i] for i in s]) for s in subsets) / len(subsets)
    got = maj_at_k(answers, correct, k)
    assert math.isclose(got, exact, abs_tol=1e-12) and 0.0 <= got <= 1.0
    assert math.isclose(maj_at_k(answers, correct, len(answers)), vote_right(answers, correct), abs_tol=1e-12)


@given(ANSWERS)
def test_maj_at_1_is_pass_at_1(answers):
    """Both estimate over all n traces: one drawn trace is right as often as a vote of one."""
    correct = [a == "2" for a in answers]
    assert math.isclose(maj_at_k(answers, correct, 1), pass_at_k(len(answers), sum(correct), 1), abs_tol=1e-12)


@given(ANSWERS, st.integers(1, 9), st.randoms(use_true_random=False))
def test_maj_at_k_does_not_depend_on_the_order_of_the_traces(answers, k, rnd):
    k = min(k, len(answers))
    correct = [a == "2" for a in answers]
    order = list(range(len(answers)))
    rnd.shuffle(order)
    shuffled = maj_at_k([answers[i] for i in order], [correct[i] for i in order], k)
    assert math.isclose(shuffled, maj_at_k(answers, correct, k), abs_tol=1e-12)


@given(st.lists(st.sampled_from(["1", "2", "3", None]), min_size=10, max_size=14), st.integers(3, 7))
@settings(max_examples=30, deadline=None)
def test_sampled_maj_at_k_is_reproducible_and_near_the_exact_value(answers, k):
    """Past `max_subsets` subsets the mean is over that many drawn with a fixed seed: the same number on
    every call, within a few standard errors (<= 0.5 / sqrt(600)) of the exact mean."""
    correct = [a == "2" for a in answers]
    exact = maj_at_k(answers, correct, k, max_subsets=10**6)
    sampled = maj_at_k(answers, correct, k, max_subsets=600)
    assert sampled == maj_at_k(answers, correct, k, max_subsets=600)
    assert abs(sampled - exact) < 0.1


def test_maj_at_k_rejects_bad_arguments_and_uses_same():
    with pytest.raises(ValueError, match="same length"):
        maj_at_k(["1"], [True, False], 1)
    for k in (0, 3):
        with pytest.raises(ValueError, match="1 <= k <= n"):
            maj_at_k(["1", "2"], [True, False], k)
    # "0.5" and "1/2" are one class under `same`: they outvote "3" in the vote of all three
    same = lambda a, b: {a, b} <= {"0.5", "1/2"} or a == b  # noqa: E731
    assert maj_at_k(["0.5", "3", "1/2"], [True, False, True], 3, same) == 1.0
    assert maj_at_k(["0.5", "3", "1/2"], [True, False, True], 3) == pytest.approx(2 / 3)


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

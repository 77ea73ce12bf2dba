"""Eval metrics as pure functions: accuracy with bootstrap CIs, pass@k, maj@k, costs, savings, Pareto front.

Nothing here does I/O; the report and the CLI feed these with rows from the store.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


def accuracy(correct: Sequence[bool | None]) -> float:
    """Fraction correct; ungraded (None) problems are left out. 0.0 for an empty list."""
    graded = [bool(c) for c in correct if c is not None]
    return sum(graded) / len(graded) if graded else 0.0


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean. A constant sample gives a zero-width interval at its value."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    m = float(x.mean())
    return (min(float(lo), m), max(float(hi), m))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): chance that at least one of k samples drawn from n, c correct, is."""
    if not (0 <= c <= n) or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


MAJ_EXACT_SUBSETS = 2048
"""maj@k is averaged over every k-subset of the n traces when there are at most this many, else over this
many subsets drawn with a fixed seed (`maj_at_k`)."""


def answer_classes(answers: Sequence[str | None], same: Callable[[str, str], bool] | None = None) -> list[int]:
    """Each answer's class: equal to the class of the first earlier answer `same` finds it equal to, else
    new (numbered in order seen); -1 for no answer (None), which never votes."""
    same = same or (lambda a, b: a == b)
    firsts: list[str] = []  # each class's first answer, the one the others are compared with
    out = []
    for a in answers:
        if a is None:
            out.append(-1)
            continue
        out.append(next((c for c, first in enumerate(firsts) if same(first, a)), len(firsts)))
        if out[-1] == len(firsts):
            firsts.append(a)
    return out


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int,
             same: Callable[[str, str], bool] | None = None, *, max_subsets: int = MAJ_EXACT_SUBSETS,
             seed: int = 0) -> float:
    """Expected correctness of a majority vote over k of the n traces, drawn without replacement: the
    estimate that uses every trace, as unbiased pass@k does (voting over the first k would leave the
    others out, and maj@1 would not be pass@1).

    `correct[i]` grades `answers[i]` (a class is as right as its first member); `same` decides equivalence
    (default: exact string match). In each subset the largest class wins; a tie counts as a uniformly drawn
    winner among the tied classes (credit right / tied), so the value does not depend on trace order; a
    subset with no answer is wrong. Exact (the mean over all C(n, k) subsets) when there are at most
    `max_subsets` of them, else the mean over `max_subsets` subsets drawn with `seed` (the same numbers on
    every call). maj@1 is the share of traces that are right, i.e. pass@1; maj@n is the vote over all.
    """
    n = len(answers)
    if n != len(correct):
        raise ValueError("answers and correct must have the same length")
    if not 1 <= k <= n:
        raise ValueError(f"maj@k needs 1 <= k <= n (n={n}, k={k})")
    labels = np.asarray(answer_classes(answers, same), dtype=np.int64)
    n_classes = int(labels.max()) + 1
    if n_classes == 0:
        return 0.0
    first = [int(np.flatnonzero(labels == c)[0]) for c in range(n_classes)]
    class_right = np.asarray([bool(correct[i]) for i in first], dtype=float)
    if math.comb(n, k) <= max_subsets:
        subsets = np.asarray(list(itertools.combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
    else:
        rng = np.random.default_rng(seed)
        subsets = np.argsort(rng.random((max_subsets, n)), axis=1)[:, :k]
    drawn = np.where(labels[subsets] < 0, n_classes, labels[subsets])  # (subsets, k); no answer: n_classes
    rows = len(subsets)
    flat = (drawn + (n_classes + 1) * np.arange(rows)[:, None]).ravel()
    votes = np.bincount(flat, minlength=rows * (n_classes + 1)).reshape(rows, n_classes + 1)[:, :n_classes]
    top = votes.max(axis=1, keepdims=True)
    tied = (votes == top) & (top > 0)
    credit = (tied * class_right).sum(axis=1) / np.maximum(tied.sum(axis=1), 1)
    return float(credit.mean())


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats (lower-or-equal cost and higher-or-equal accuracy, one strictly).

    Sorted by cost. Points are (cost, accuracy).
    """
    front = []
    for i, (c, a) in enumerate(points):
        dominated = any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


@dataclass(frozen=True)
class Summary:
    """One strategy on one dataset."""

    label: str
    problems: int
    graded: int
    accuracy: float
    ci_low: float
    ci_high: float
    total_tokens: int
    mean_tokens: float
    mean_sequential_tokens: float
    mean_wall_s: float
    total_wall_s: float
    saved_tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(label: str, correct: Sequence[bool | None], generated: Sequence[int], sequential: Sequence[int],
              wall: Sequence[float], saved: Sequence[int] = (), *, seed: int = 0) -> Summary:
    """Accuracy with a 95% bootstrap CI and per-problem cost means."""
    n = len(correct)
    if not (len(generated) == len(sequential) == len(wall) == n):
        raise ValueError("all per-problem lists must have the same length")
    graded = [float(bool(c)) for c in correct if c is not None]
    lo, hi = bootstrap_ci(graded, seed=seed)
    return Summary(
        label=label, problems=n, graded=len(graded), accuracy=accuracy(correct), ci_low=lo, ci_high=hi,
        total_tokens=int(sum(generated)), mean_tokens=float(np.mean(generated)) if n else 0.0,
        mean_sequential_tokens=float(np.mean(sequential)) if n else 0.0,
        mean_wall_s=float(np.mean(wall)) if n else 0.0, total_wall_s=float(sum(wall)),
        saved_tokens=int(sum(saved)),
    )


@dataclass(frozen=True)
class Savings:
    """A strategy against a baseline: cost ratios (< 1 means cheaper) and the accuracy difference."""

    tokens_ratio: float
    sequential_ratio: float
    wall_ratio: float
    accuracy_delta: float

    @property
    def tokens_saved(self) -> float:
        """Fraction of the baseline's tokens not spent (negative: spent more)."""
        return 1.0 - self.tokens_ratio


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


def savings(s: Summary, baseline: Summary) -> Savings:
    return Savings(
        tokens_ratio=_ratio(s.mean_tokens, baseline.mean_tokens),
        sequential_ratio=_ratio(s.mean_sequential_tokens, baseline.mean_sequential_tokens),
        wall_ratio=_ratio(s.mean_wall_s, baseline.mean_wall_s),
        accuracy_delta=s.accuracy - baseline.accuracy,
    )


@dataclass(frozen=True)
class PairedSavings:
    """A run against a baseline run on the problems both answered: the measured saving.

    Unlike `Usage.saved_tokens` (an estimate read off one run), this is the difference of what two runs
    really spent on the same problems.
    """

    problems: int
    tokens: int
    baseline_tokens: int
    sequential_tokens: int
    baseline_sequential_tokens: int
    accuracy: float
    baseline_accuracy: float

    @property
    def tokens_saved(self) -> int:
        """Generated tokens the baseline spent and the run did not (negative: the run spent more)."""
        return self.baseline_tokens - self.tokens

    @property
    def tokens_saved_fraction(self) -> float:
        return 1.0 - _ratio(self.tokens, self.baseline_tokens)

    @property
    def sequential_saved_fraction(self) -> float:
        return 1.0 - _ratio(self.sequential_tokens, self.baseline_sequential_tokens)

    @property
    def accuracy_delta(self) -> float:
        return self.accuracy - self.baseline_accuracy


Cost = tuple[int, int, bool | None]  # generated tokens, sequential tokens, correct


def paired_savings(run: dict[str, Cost], baseline: dict[str, Cost]) -> PairedSavings:
    """Savings of `run` against `baseline` over the problem ids present in both (id -> cost)."""
    shared = sorted(set(run) & set(baseline))
    return PairedSavings(
        problems=len(shared),
        tokens=sum(run[p][0] for p in shared), baseline_tokens=sum(baseline[p][0] for p in shared),
        sequential_tokens=sum(run[p][1] for p in shared),
        baseline_sequential_tokens=sum(baseline[p][1] for p in shared),
        accuracy=accuracy([run[p][2] for p in shared]),
        baseline_accuracy=accuracy([baseline[p][2] for p in shared]),
    )


def k_values(n: int) -> list[int]:
    """The k reported for maj@k and pass@k with n samples per problem: 1, 2, 4, ... and n itself."""
    ks = [k for k in (2 ** i for i in range(max(1, n).bit_length())) if k <= n]
    return ks + ([n] if n >= 1 and n not in ks else [])


def sample_k_metrics(samples: Sequence[tuple[Sequence[str | None], Sequence[bool]]]
                     ) -> tuple[dict[int, float], dict[int, float]]:
    """(maj@k, pass@k) averaged over problems, each problem given as (trace answers, trace correctness).

    Both are estimates over k of a problem's n traces (`maj_at_k`, `pass_at_k`), so maj@1 == pass@1. The k
    are `k_values` of the fewest traces any problem has, so every k is computable on every problem; both are
    empty when there are no problems or a problem has no traces.
    """
    if not samples or any(len(a) != len(c) for a, c in samples):
        if samples:
            raise ValueError("answers and correct must have the same length for every problem")
        return {}, {}
    n_min = min(len(a) for a, _ in samples)
    if n_min == 0:
        return {}, {}
    maj: dict[int, float] = {}
    pas: dict[int, float] = {}
    for k in k_values(n_min):
        maj[k] = float(np.mean([maj_at_k(a, c, k) for a, c in samples]))
        pas[k] = float(np.mean([pass_at_k(len(c), sum(map(bool, c)), k) for _, c in samples]))
    return maj, pas

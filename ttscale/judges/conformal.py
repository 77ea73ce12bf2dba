"""Conformal p-values and online calibrators for ATTS (arXiv 2509.15148): pure logic.

Scores are non-conformity scores (for ATTS: the target model's perplexity of a draft step; higher =
the target likes it less). Given calibration scores c_1..c_n and a new score s, the conformal p-value

    p(s) = (1 + #{i : c_i >= s}) / (n + 1)

is super-uniform when s and the c_i are exchangeable: P(p(s) <= alpha) <= alpha, and >= alpha - 1/(n+1).
A step is rejected when p(s) <= alpha, so alpha is the rejection rate on in-distribution steps.
ATTS's code (`ref_async.py`) instead rejects when the score's percentile rank, the share of calibration
scores strictly below it, is >= 0.6 (`percentile_rank(s) >= 1 - alpha` with alpha = 0.4). The two
rules differ by the +1 terms only: rank >= (1 - alpha) n against rank >= (1 - alpha)(n + 1).

Calibrators: `MarginalCalibrator` pools every first-turn score it has seen (per dataset: one instance
lives across problems), or holds a fixed offline array (the authors' way: first-turn scores of a
calibration split, computed once); `ConditionalCalibrator` keeps one pool per question (its parallel
samples).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Hashable, Iterable, Sequence

import numpy as np


def conformal_p_value(score: float, calibration: Sequence[float]) -> float:
    """Conservative p-value of `score` against `calibration` (see module doc); 1.0 if empty."""
    n = len(calibration)
    if n == 0:
        return 1.0
    cal = np.asarray(calibration, dtype=np.float64)
    return float((1 + np.count_nonzero(cal >= score)) / (n + 1))


def conformal_p_values(scores: Sequence[float], calibration: Sequence[float]) -> np.ndarray:
    """Vectorised `conformal_p_value` for many scores against one calibration set."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    n = len(cal)
    if n == 0:
        return np.ones_like(s)
    ge = n - np.searchsorted(cal, s, side="left")
    return (1 + ge) / (n + 1)


def percentile_rank(score: float, calibration: Sequence[float]) -> float:
    """Share of calibration scores strictly below `score` (ATTS's code: `np.sum(ppl_array < ppl) / n`); 0 if
    empty."""
    n = len(calibration)
    if n == 0:
        return 0.0
    return float(np.count_nonzero(np.asarray(calibration, dtype=np.float64) < score) / n)


def reject(score: float, calibration: Sequence[float], alpha: float) -> bool:
    """Reject when the p-value is at most alpha (never with an empty calibration set)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return len(calibration) > 0 and conformal_p_value(score, calibration) <= alpha


class MarginalCalibrator:
    """One pool of calibration scores (per dataset), kept sorted for O(log n) p-values."""

    def __init__(self, scores: Iterable[float] = (), max_size: int | None = None):
        self._sorted: list[float] = sorted(float(s) for s in scores)
        self._fifo: list[float] = []
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self._sorted)

    def add(self, score: float, key: Hashable | None = None) -> None:
        s = float(score)
        if math.isnan(s):
            raise ValueError("a calibration score is NaN")
        bisect.insort(self._sorted, s)
        self._fifo.append(s)
        if self.max_size is not None and len(self._fifo) > self.max_size:
            old = self._fifo.pop(0)
            self._sorted.pop(bisect.bisect_left(self._sorted, old))

    def scores(self, key: Hashable | None = None) -> list[float]:
        return list(self._sorted)

    def p_value(self, score: float, key: Hashable | None = None) -> float:
        n = len(self._sorted)
        if n == 0:
            return 1.0
        ge = n - bisect.bisect_left(self._sorted, float(score))
        return (1 + ge) / (n + 1)

    def count(self, key: Hashable | None = None) -> int:
        return len(self._sorted)

    def percentile(self, score: float, key: Hashable | None = None) -> float:
        """Share of calibration scores strictly below `score` (0.0 with none)."""
        n = len(self._sorted)
        return bisect.bisect_left(self._sorted, float(score)) / n if n else 0.0

    def reject(self, score: float, alpha: float, key: Hashable | None = None) -> bool:
        return self.count(key) > 0 and self.p_value(score, key) <= alpha


class ConditionalCalibrator:
    """One calibration pool per key (per question: its parallel samples' first-turn scores)."""

    def __init__(self) -> None:
        self._pools: dict[Hashable, MarginalCalibrator] = {}

    def _pool(self, key: Hashable) -> MarginalCalibrator:
        return self._pools.setdefault(key, MarginalCalibrator())

    def add(self, score: float, key: Hashable | None = None) -> None:
        self._pool(key).add(score)

    def scores(self, key: Hashable | None = None) -> list[float]:
        return self._pool(key).scores()

    def count(self, key: Hashable | None = None) -> int:
        return len(self._pool(key))

    def p_value(self, score: float, key: Hashable | None = None) -> float:
        return self._pool(key).p_value(score)

    def percentile(self, score: float, key: Hashable | None = None) -> float:
        return self._pool(key).percentile(score)

    def reject(self, score: float, alpha: float, key: Hashable | None = None) -> bool:
        return self._pool(key).reject(score, alpha)


def rejection_rate(scores: Sequence[float], calibration: Sequence[float], alpha: float) -> float:
    """Share of `scores` rejected at level alpha against a fixed calibration set."""
    if len(scores) == 0:
        return 0.0
    return float(np.mean(conformal_p_values(scores, calibration) <= alpha)) if len(calibration) else 0.0

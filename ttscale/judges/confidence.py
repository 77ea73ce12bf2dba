"""Trace confidence from logprobs: pure functions shared by weighted vote, best-of-n and DeepConf."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def token_confidence(top_logprobs: Sequence[dict[str, float]]) -> np.ndarray:
    """DeepConf token confidence: minus the mean of the top-k logprobs at each position."""
    return np.array([-float(np.mean(list(d.values()))) if d else 0.0 for d in top_logprobs], dtype=np.float64)


def group_confidence(conf: np.ndarray, window: int) -> np.ndarray:
    """Mean token confidence over a sliding window (shorter prefixes use what they have)."""
    if len(conf) == 0:
        return conf
    c = np.cumsum(np.concatenate([[0.0], conf]))
    idx = np.arange(1, len(conf) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def lowest_group_confidence(top_logprobs: Sequence[dict[str, float]], window: int = 2048) -> float:
    """DeepConf's trace score: the lowest sliding-window group confidence."""
    g = group_confidence(token_confidence(top_logprobs), window)
    return float(g.min()) if len(g) else 0.0


def mean_logprob(logprobs: Sequence[float]) -> float:
    """Average token logprob (a length-normalised log-likelihood)."""
    return float(np.mean(logprobs)) if len(logprobs) else float("-inf")


def self_certainty(top_logprobs: Sequence[dict[str, float]]) -> float:
    """Self-certainty (KL from uniform, Kang et al. 2025) estimated on the top-k candidates of each token.

    With only top-k logprobs the distribution is renormalised over those k; the score is the mean over
    tokens of KL(U_k || p_k) = -log k - mean_j log p_j. Higher means more certain.
    """
    vals = []
    for d in top_logprobs:
        if not d:
            continue
        lp = np.array(list(d.values()), dtype=np.float64)
        lp = lp - np.logaddexp.reduce(lp)
        vals.append(-math.log(len(lp)) - float(lp.mean()))
    return float(np.mean(vals)) if vals else 0.0

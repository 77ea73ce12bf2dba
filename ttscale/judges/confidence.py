"""Trace confidence from logprobs: pure functions shared by weighted vote, best-of-n and DeepConf."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def token_confidence(top_logprobs: Sequence[dict[str, float]]) -> np.ndarray:
    """DeepConf token confidence: minus the mean of the top-k logprobs at each position.

    Positions without top logprobs are skipped, as the authors' `compute_confidence` does.
    """
    return np.array([-float(np.mean(list(d.values()))) for d in top_logprobs if d], dtype=np.float64)


def group_confidence(conf: np.ndarray, window: int) -> np.ndarray:
    """Mean token confidence over every full sliding window, as the DeepConf authors compute it.

    A trace of at least `window` tokens gets one value per full window (no partial windows at its start:
    one uncertain first token must not become a group of its own); a shorter trace gets one value, the mean
    over all its tokens (`compute_least_grouped` in facebookresearch/deepconf `helper.py`).
    """
    if len(conf) == 0:
        return conf
    if len(conf) < window:
        return np.array([float(np.mean(conf))])
    c = np.cumsum(np.concatenate([[0.0], conf]))
    return (c[window:] - c[:-window]) / window


def lowest_group_confidence(top_logprobs: Sequence[dict[str, float]], window: int = 2048) -> float:
    """DeepConf's trace score: the lowest full-window group confidence (0.0 for an empty trace, as theirs)."""
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

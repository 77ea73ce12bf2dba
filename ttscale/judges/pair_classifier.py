"""The trainable pair judge: a logistic model over pair features trained with focal loss and oversampling."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ttscale.errors import ConfigError
from ttscale.judges.pair_base import JudgeBase, jaccard, ngrams, words

_NUM = re.compile(r"-?\d+(?:\.\d+)?")

FEATURES = ("jaccard1", "jaccard2", "jaccard3", "len_ratio", "num_jaccard", "last_num_equal",
            "tail_jaccard", "log_max_num", "log_min_len", "bias")


def pair_features(a: str, b: str) -> np.ndarray:
    """Cheap symmetric features of a prefix pair (see FEATURES). Besides overlap, two difficulty cues: the
    magnitude of the largest number either prefix mentions, and the shorter prefix's length (a trace that
    ended before its prefix is judged whole); on easy problems samples agree more often."""
    ta, tb = words(a), words(b)
    j = [jaccard(ngrams(ta, n), ngrams(tb, n)) for n in (1, 2, 3)]
    la, lb = len(ta), len(tb)
    len_ratio = min(la, lb) / max(la, lb) if max(la, lb) else 1.0
    na, nb = _NUM.findall(a), _NUM.findall(b)
    num_j = jaccard(set(na), set(nb))
    last_eq = float(bool(na) and bool(nb) and na[-1] == nb[-1])
    tail = jaccard(set(ta[-30:]), set(tb[-30:]))
    magnitudes = [abs(float(x)) for x in na + nb]
    log_max_num = math.log10(1.0 + max(magnitudes)) if magnitudes else 0.0
    return np.array([*j, len_ratio, num_j, last_eq, tail, log_max_num, math.log1p(min(la, lb)), 1.0],
                    dtype=np.float64)


def focal_loss(p: np.ndarray, y: np.ndarray, alpha: float = 0.25, gamma: float = 2.0) -> float:
    """Mean of -alpha_t (1 - p_t)^gamma log p_t (alpha_t = alpha for y=1, 1-alpha for y=0)."""
    p = np.clip(p, 1e-12, 1 - 1e-12)
    pt = np.where(y == 1, p, 1 - p)
    at = np.where(y == 1, alpha, 1 - alpha)
    return float(np.mean(-at * (1 - pt) ** gamma * np.log(pt)))


def _focal_grad(z: np.ndarray, y: np.ndarray, alpha: float, gamma: float) -> np.ndarray:
    """d focal / d logit, elementwise."""
    p = 1.0 / (1.0 + np.exp(-z))
    pt = np.clip(np.where(y == 1, p, 1 - p), 1e-12, 1 - 1e-12)
    at = np.where(y == 1, alpha, 1 - alpha)
    sign = np.where(y == 1, 1.0, -1.0)  # d pt / d z = sign * pt (1 - pt)
    dl_dpt = at * (gamma * (1 - pt) ** (gamma - 1) * np.log(pt) - (1 - pt) ** gamma / pt)
    return dl_dpt * sign * pt * (1 - pt)


def oversample_minority(X: np.ndarray, y: np.ndarray, factor: int = 2, minority: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Repeat the rows of class `minority` `factor` times in all (the paper's 2x). Default: the rarer class
    ("different" in the paper's traces, where 80% of pairs agree; "same" in SmolLM2's scattered ones)."""
    if minority is None:
        minority = int((y == 1).sum() < (y == 0).sum())
    idx = np.concatenate([np.arange(len(y))] + [np.flatnonzero(y == minority)] * (factor - 1))
    return X[idx], y[idx]


@dataclass
class ClassifierModel:
    """A logistic model over standardised `pair_features`, saved as JSON (no pickle).

    `report` holds what was measured when it was trained: held-out AUROC, TNR, the false-positive and
    false-negative rates at tau, the pair counts and the problem split (see `ttscale judge train`).
    """

    weights: list[float]
    mean: list[float]
    std: list[float]
    features: tuple[str, ...] = FEATURES
    alpha: float = 0.25
    gamma: float = 2.0
    report: dict[str, Any] = field(default_factory=dict)

    def logits(self, X: np.ndarray) -> np.ndarray:
        Z = (X - np.asarray(self.mean)) / np.asarray(self.std)
        Z[:, -1] = 1.0
        return Z @ np.asarray(self.weights)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(X)))

    def save(self, path: str | Path) -> None:
        data = {"kind": "ttscale-pair-classifier", "weights": self.weights, "mean": self.mean, "std": self.std,
                "features": list(self.features), "alpha": self.alpha, "gamma": self.gamma, "report": self.report}
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ClassifierModel:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"no classifier model at {path}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not a classifier model (invalid JSON: {e})") from e
        if data.get("kind") != "ttscale-pair-classifier" or tuple(data.get("features", ())) != FEATURES:
            raise ConfigError(f"{path} is not a ttscale pair classifier with features {FEATURES}")
        return cls(weights=data["weights"], mean=data["mean"], std=data["std"], alpha=data["alpha"],
                   gamma=data["gamma"], report=data.get("report", {}))


def train_classifier(
    X: np.ndarray, y: np.ndarray, *, alpha: float = 0.25, gamma: float = 2.0, oversample: int = 2,
    l2: float = 1e-3, steps: int = 2000, lr: float = 0.5,
) -> ClassifierModel:
    """Fit the logistic model by gradient descent on the focal loss, after oversampling class 0."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(np.unique(y)) < 2:
        raise ConfigError("training pairs need both labels (same and different)")
    Xo, yo = oversample_minority(X, y, factor=oversample)
    mean, std = Xo.mean(0), Xo.std(0)
    std[std < 1e-9] = 1.0
    mean[-1], std[-1] = 0.0, 1.0
    Z = (Xo - mean) / std
    w = np.zeros(Z.shape[1])
    for _ in range(steps):
        g = _focal_grad(Z @ w, yo, alpha, gamma)
        grad = Z.T @ g / len(yo) + l2 * w
        w -= lr * grad
    return ClassifierModel(weights=w.tolist(), mean=mean.tolist(), std=std.tolist(), alpha=alpha, gamma=gamma)


class ClassifierJudge(JudgeBase):
    """The focal-loss feature classifier; `report` is its held-out measurement (empty when none was made)."""

    name = "classifier"

    def __init__(self, model: ClassifierModel | str | Path, name: str | None = None):
        self.model = model if isinstance(model, ClassifierModel) else ClassifierModel.load(model)
        if name is not None:
            self.name = name

    @property
    def report(self) -> dict[str, Any]:
        return self.model.report

    def p_same(self, prefix_a: str, prefix_b: str) -> float:
        return float(self.model.predict(pair_features(prefix_a, prefix_b)[None, :])[0])

    def p_same_many(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        if not pairs:
            return np.zeros(0)
        return self.model.predict(np.stack([pair_features(a, b) for a, b in pairs]))


"""Labelled prefix pairs (files, trace banks, problem splits) and the metrics pair judges are scored by."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ttscale.errors import ConfigError
from ttscale.judges.pair_base import judged_prefix


def load_pairs(path: str | Path) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Read a labelled pair file (schema in the module docstring)."""
    pairs: list[tuple[str, str]] = []
    labels: list[int] = []
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"pair file {path} does not exist")
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i}: not JSON ({e})") from e
        a = row.get("a", row.get("prefix_a"))
        b = row.get("b", row.get("prefix_b"))
        lab = row.get("same", row.get("label"))
        if not isinstance(a, str) or not isinstance(b, str) or lab is None:
            raise ConfigError(f"{path}:{i}: a pair needs string fields 'a', 'b' and a label 'same' (true/false)")
        if lab not in (0, 1, True, False):
            raise ConfigError(f"{path}:{i}: label 'same' must be true/false or 0/1, got {lab!r}")
        pairs.append((a, b))
        labels.append(int(lab))
    if not pairs:
        raise ConfigError(f"pair file {path} has no pairs")
    return pairs, np.array(labels, dtype=np.int64)


def tnr_at_fnr(y: np.ndarray, scores: np.ndarray, fnr: float = 0.2) -> float:
    """True-negative rate at the loosest threshold whose false-negative rate is at most `fnr`
    (positive = "same answer"): how many "different" pairs are caught while losing <= fnr of the "same"."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, scores)
    ok = np.flatnonzero(tpr >= 1.0 - fnr - 1e-12)
    return float(1.0 - fpr[ok[0]])


def evaluate(y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC and TNR at 0.2 FNR of judge scores against labels."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        raise ConfigError("evaluation needs pairs of both labels (same and different)")
    return {"auroc": float(roc_auc_score(y, scores)), "tnr_at_0.2_fnr": tnr_at_fnr(y, scores, 0.2),
            "pairs": len(y), "positives": int(y.sum())}


def rates_at(y: np.ndarray, scores: np.ndarray, tau: float) -> dict[str, float]:
    """Error rates of the join rule `score > tau`: FPR = share of "different" pairs that would be joined
    (what makes DeepPrune collapse distinct answers), FNR = share of "same" pairs kept apart."""
    y, scores = np.asarray(y), np.asarray(scores)
    neg, pos = scores[y == 0], scores[y == 1]
    return {"tau": tau, "fpr": float(np.mean(neg > tau)) if len(neg) else 0.0,
            "fnr": float(np.mean(pos <= tau)) if len(pos) else 0.0}


def tau_for_fpr(y: np.ndarray, scores: np.ndarray, target_fpr: float) -> float:
    """The lowest threshold whose join rule `score > tau` joins at most `target_fpr` of the "different"
    pairs: DeepPrune's tau calibrated for a bounded loss of answer diversity."""
    if not 0.0 <= target_fpr < 1.0:
        raise ConfigError(f"target FPR must be in [0, 1), got {target_fpr}")
    neg = np.sort(np.asarray(scores)[np.asarray(y) == 0])[::-1]
    if len(neg) == 0:
        raise ConfigError("calibrating tau needs 'different' pairs")
    k = int(np.floor(target_fpr * len(neg)))
    return float(np.clip(neg[min(k, len(neg) - 1)], 0.0, 1.0))


def split_problems(problem_ids: Sequence[str], heldout_frac: float = 1 / 3, seed: int = 0
                   ) -> tuple[list[str], list[str]]:
    """(train, held-out) problem ids: a seeded shuffle of the sorted ids, so the split is reproducible and
    no problem gives pairs to both sides."""
    if not 0.0 < heldout_frac < 1.0:
        raise ConfigError(f"heldout_frac must be in (0, 1), got {heldout_frac}")
    ids = sorted(set(problem_ids))
    if len(ids) < 2:
        raise ConfigError(f"a train/held-out split needs at least 2 problems, got {len(ids)}")
    random.Random(seed).shuffle(ids)
    k = min(len(ids) - 1, max(1, round(len(ids) * heldout_frac)))
    return sorted(ids[k:]), sorted(ids[:k])


def trace_prefix(trace: Any, *, prefix_words: int = 25, prefix_tokens: int | None = None) -> str | None:
    """The prefix DeepPrune judges of a recorded trace: `judged_prefix` after each recorded delta, the first
    one reached, exactly as the live strategy sees the stream (a replay sends the same deltas)."""
    text, n = "", 0
    for d in trace.deltas:
        text += d.text
        n += d.n_tokens
        pre = judged_prefix(text, done=d.finished, num_tokens=n, prefix_words=prefix_words,
                            prefix_tokens=prefix_tokens)
        if pre is not None:
            return pre
    return judged_prefix(text, done=True, num_tokens=n, prefix_words=prefix_words, prefix_tokens=prefix_tokens)


def bank_pairs(bank: Any, problem_ids: Sequence[str] | None = None, *, prefix_words: int = 25,
               prefix_tokens: int | None = None) -> list[dict[str, Any]]:
    """Labelled pairs from a trace bank: every two finished traces of one problem that both gave an answer.

    `a`/`b` are the prefixes DeepPrune would judge (`judged_prefix` of the complete trace), `same` is
    answer equivalence of the full traces (math-verify through `ttscale.answers`). Traces without an
    extractable answer carry no label and are left out.
    """
    from ttscale.answers import equivalent, extract_answer
    from ttscale.evals.bank import TraceBank

    tb = bank if isinstance(bank, TraceBank) else TraceBank(bank)
    problems = tb.problems()
    rows: list[dict[str, Any]] = []
    for pid in (problem_ids if problem_ids is not None else tb.problem_ids()):
        if pid not in problems:
            raise ConfigError(f"problem {pid!r} is not in the trace bank {str(tb.path)!r}")
        p = problems[pid]
        done = []
        for t in tb.traces(pid):
            if t.status != "finished":
                continue
            ans = extract_answer(t.text, p.kind, p.choices)
            pre = trace_prefix(t, prefix_words=prefix_words, prefix_tokens=prefix_tokens)
            if ans is not None and pre is not None:
                done.append((t.index, pre, ans))
        for i in range(len(done)):
            for j in range(i + 1, len(done)):
                (ia, a, xa), (ib, b, xb) = done[i], done[j]
                rows.append({"a": a, "b": b, "same": equivalent(xa, xb), "problem": pid, "traces": [ia, ib]})
    return rows


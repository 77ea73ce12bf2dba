"""What the native strategy loops share: sampling rows, banned-token masks, KV workspaces, graph runners.

The loops themselves live in `native_hogwild` (Hogwild! workers) and `native_parathinker` (ParaThinker
paths); `native` re-exports both for existing imports.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ttscale.backends.engine.kv_cache import KVCache
from ttscale.backends.engine.model import Model
from ttscale.backends.engine.sampler import SamplingTensors, sample
from ttscale.errors import ConfigError

if TYPE_CHECKING:
    from ttscale.backends.engine.cuda_graphs import GraphRunner

@dataclass
class SamplingRow:
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0


def ban_mask(model: Model, banned: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """`[vocab]` bool mask on the model's device, True at the token ids a loop must never sample."""
    mask = torch.zeros(model.cfg.vocab_size, dtype=torch.bool, device=model.cfg.device)
    set_banned(mask, banned)
    return mask


def set_banned(mask: torch.Tensor, banned: list[int] | tuple[int, ...]) -> None:
    """Rewrite `mask` in place (a captured CUDA graph reads it at replay) to ban exactly `banned`."""
    bad = [t for t in banned if not 0 <= t < mask.shape[0]]
    if bad:
        raise ConfigError(f"banned token ids {bad} are outside the vocabulary (0..{mask.shape[0] - 1})")
    mask.zero_()
    if banned:
        mask[torch.tensor(list(banned), dtype=torch.long, device=mask.device)] = True


def apply_ban(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits with the banned entries at -inf: they get probability 0 and are never the argmax."""
    if mask is None:
        return logits
    return logits.masked_fill(mask, float("-inf"))


def _sample(model: Model, logits: torch.Tensor, rows: list[tuple[float, float, int, int, int]],
            ban: torch.Tensor | None = None):
    st = SamplingTensors.build(rows, len(rows), model.cfg.device)
    filtered = any(r[1] < 1.0 or r[2] > 0 for r in rows)
    tok, lp, _, _ = sample(apply_ban(logits, ban), st, filtered, 0)
    return tok.tolist(), lp.tolist()


def _graph_runner(model: Model, cache: KVCache, cuda_graphs: bool | None, graphs: GraphRunner | None):
    """The CUDA-graph runner a native loop decodes with: `graphs` as given (on the loop's cache), a new one
    on CUDA (or when `cuda_graphs` asks), None on CPU or when `cuda_graphs` is False.

    A new runner captures forward, ban mask and sampling; its mask is `runner.ban`, rewritten in place by
    each run (`set_banned`) so that the captured graphs serve runs with different banned tokens."""
    if graphs is not None:
        if graphs.cache is not cache:
            raise ConfigError("the graph runner must capture on the same KV cache the run writes")
        return graphs
    on_cuda = model.cfg.device.type == "cuda"
    if cuda_graphs is None:
        cuda_graphs = on_cuda
    if not cuda_graphs:
        return None
    if not on_cuda:
        raise ConfigError("CUDA graphs need the model on a CUDA device")
    from ttscale.backends.engine.cuda_graphs import GraphRunner

    ban = ban_mask(model)

    def forward_ban_sample(meta, st, filtered, n_top):
        return sample(apply_ban(model.forward_meta(cache, meta), ban), st, filtered, n_top)

    runner = GraphRunner(model, cache, step=forward_ban_sample)
    runner.ban = ban  # type: ignore[attr-defined]
    return runner


def _blocks_for(tokens_hint: int, block_size: int = 16) -> int:
    return max(64, 2 * (tokens_hint // block_size + 8))


def _cache_for(model: Model, tokens_hint: int, block_size: int = 16,
               num_blocks: int | None = None) -> KVCache:
    if num_blocks is None:
        num_blocks = _blocks_for(tokens_hint, block_size)
    return KVCache.for_model(model.cfg, num_blocks=num_blocks, block_size=block_size)


class Workspaces:
    """KV caches (with their CUDA-graph runners) kept between native runs on one model, so that a second
    problem replays the graphs the first one captured instead of capturing (and allocating) again.

    `take(num_blocks)` lends a free workspace at least that large, or makes one; concurrent runs get
    different workspaces. `for_model(model)` is the pool of a model, kept on the model itself so that it
    lives and dies with it (a global map would keep every model alive through its graph runners).
    """

    _pools_lock = threading.Lock()

    def __init__(self, model: Model) -> None:
        self.model = model
        self._free: list[tuple[KVCache, GraphRunner | None]] = []
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, model: Model) -> Workspaces:
        with cls._pools_lock:
            pool = getattr(model, "_native_workspaces", None)
            if pool is None:
                pool = cls(model)
                model._native_workspaces = pool  # type: ignore[attr-defined]
            return pool

    @contextlib.contextmanager
    def take(self, num_blocks: int) -> Iterator[tuple[KVCache, GraphRunner | None]]:
        with self._lock:
            # the most recently returned one that fits: its graphs are the likeliest to match
            ws = next((w for w in reversed(self._free) if w[0].pool.num_blocks >= num_blocks), None)
            if ws is not None:
                self._free.remove(ws)
        if ws is None:
            cache = KVCache.for_model(self.model.cfg, num_blocks=_pow2_at_least(num_blocks))
            ws = (cache, _graph_runner(self.model, cache, None, None))
        try:
            yield ws
        finally:
            with self._lock:
                self._free.append(ws)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


"""What runs in the next step: prefill chunks for waiting requests, then one decode for every running one.

Continuous batching: every step decodes all running sequences together; new prompts are prefilled in
chunks of at most `prefill_chunk` tokens between decode steps, so a long prompt never stalls the
branches already generating for more than one chunk. The prefix cache lets requests with the same prompt
(n samples of one question) share its blocks: the first one prefills, the others wait one step and then
view the cached segments instead of recomputing them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ttscale.backends.engine.kv_cache import KVCache, View


def block_hashes(tokens: list[int], block_size: int, n_blocks: int) -> list[int]:
    """Chained hash of each full block prefix: h[i] identifies tokens[: (i+1) * block_size]."""
    out, h = [], 0
    for i in range(n_blocks):
        h = hash((h, tuple(tokens[i * block_size:(i + 1) * block_size])))
        out.append(h)
    return out


class PrefixCache:
    """Frozen prompt prefixes (lists of views, block aligned) by chained block hash; LRU eviction."""

    def __init__(self, cache: KVCache, enabled: bool = True) -> None:
        self.cache, self.enabled = cache, enabled
        self.entries: OrderedDict[int, list[View]] = OrderedDict()

    def lookup(self, tokens: list[int]) -> tuple[list[View], int]:
        """Longest cached prefix of `tokens` leaving at least one token to compute: (views, n_tokens)."""
        if not self.enabled:
            return [], 0
        bs = self.cache.block_size
        hs = block_hashes(tokens, bs, (len(tokens) - 1) // bs)
        for i in range(len(hs) - 1, -1, -1):
            views = self.entries.get(hs[i])
            if views is not None:
                self.entries.move_to_end(hs[i])
                return views, (i + 1) * bs
        return [], 0

    def insert(self, tokens: list[int], views: list[View]) -> None:
        """Register each view boundary of a frozen, block-aligned prefix `views` (starting at 0)."""
        if not self.enabled or not views:
            return
        bs = self.cache.block_size
        end = views[-1].end
        hs = block_hashes(tokens, bs, end // bs)
        for j, v in enumerate(views):
            if v.end % bs or v.end == 0:
                continue
            h = hs[v.end // bs - 1]
            if h in self.entries:
                continue
            prefix = views[: j + 1]
            for p in prefix:
                p.segment.retain()
            self.entries[h] = prefix

    def evict_one(self) -> bool:
        if not self.entries:
            return False
        _, views = self.entries.popitem(last=False)
        for v in views:
            v.segment.release()
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass


@dataclass
class PrefillWork:
    request: object
    start: int
    count: int


class Scheduler:
    """Chooses the prefill chunks of a step (decode always takes every running request)."""

    def __init__(self, block_size: int, prefill_chunk: int = 512, max_running: int = 256) -> None:
        self.block_size = block_size
        self.prefill_chunk = prefill_chunk
        self.max_running = max_running

    def plan_prefill(self, waiting: list, n_running: int, setup) -> list[PrefillWork]:
        """Requests (in arrival order) to prefill this step within the token budget.

        A request whose first prompt block equals one being prefilled waits, so that it can reuse that
        prompt's blocks from the prefix cache next step instead of computing them again. `setup(r)` gives
        a request its sequence (prefix-cache lookup) the first time it is scheduled.
        """
        budget = self.prefill_chunk
        out: list[PrefillWork] = []
        busy: set[int] = set()
        bs = self.block_size
        for r in waiting:
            if budget <= 0 or n_running + len(out) >= self.max_running:
                break
            key = hash(tuple(r.prompt_ids[:bs])) if len(r.prompt_ids) > bs else None
            if key is not None and key in busy:
                continue
            if key is not None:
                busy.add(key)
            if r.seq is None:
                setup(r)
            left = len(r.prompt_ids) - r.prefilled
            n = min(left, budget)
            out.append(PrefillWork(r, r.prefilled, n))
            budget -= n
        return out

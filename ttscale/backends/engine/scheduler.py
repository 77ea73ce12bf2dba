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


class _Entry:
    """A cached prefix: views covering tokens [0, n), or lazily the first n tokens of `parent`'s views."""

    def __init__(self, n: int, views: list[View] | None = None, parent: _Entry | None = None,
                 logits=None) -> None:
        self.n, self.views, self.parent, self.logits = n, views, parent, logits
        self.children: list[_Entry] = []

    def materialize(self) -> list[View]:
        if self.views is None:
            out = []
            for v in self.parent.materialize():
                if v.end <= self.n:
                    out.append(View(v.segment.retain(), v.offset))
                elif v.offset < self.n:
                    k = (self.n - v.offset) // v.segment.pool.block_size
                    out.append(View(v.segment.share_prefix(k), v.offset))
            self.views = out
        return self.views

    def release(self) -> None:
        for c in self.children:
            c.release()
        self.children = []
        for v in self.views or []:
            v.segment.release()
        self.views = None


class PrefixCache:
    """Frozen prompt prefixes by chained block hash (every block boundary), with LRU eviction.

    A prefix that covers a whole prompt also keeps that prompt's last-token logits, so a request with an
    identical prompt needs no prefill at all and views exactly the same segments (read once per step).
    """

    def __init__(self, cache: KVCache, enabled: bool = True) -> None:
        self.cache, self.enabled = cache, enabled
        self.entries: OrderedDict[int, _Entry] = OrderedDict()

    def lookup(self, tokens: list[int]):
        """Longest cached prefix: (views, n_tokens, logits-or-None). Logits come only when n_tokens is
        the whole prompt; otherwise at least one token is left to compute."""
        if not self.enabled:
            return [], 0, None
        bs = self.cache.block_size
        hs = block_hashes(tokens, bs, len(tokens) // bs)
        for i in range(len(hs) - 1, -1, -1):
            e = self.entries.get(hs[i])
            if e is None:
                continue
            n = (i + 1) * bs
            if n == len(tokens) and e.logits is None:
                continue
            self.entries.move_to_end(hs[i])
            return e.materialize(), n, (e.logits if n == len(tokens) else None)
        return [], 0, None

    def insert(self, tokens: list[int], views: list[View], logits=None) -> None:
        """Register a frozen, block-aligned prefix `views` (from position 0) of `tokens`; `logits` are the
        next-token logits after it (kept only when it is the whole of `tokens`)."""
        if not self.enabled or not views:
            return
        bs = self.cache.block_size
        end = views[-1].end
        nb = end // bs
        if nb == 0:
            return
        hs = block_hashes(tokens, bs, nb)
        if hs[-1] in self.entries:
            return
        for v in views:
            v.segment.retain()
        full = _Entry(end, views=[View(v.segment, v.offset) for v in views],
                      logits=logits if end == len(tokens) else None)
        self.entries[hs[-1]] = full
        for k in range(1, nb):
            if hs[k - 1] not in self.entries:
                child = _Entry(k * bs, parent=full)
                full.children.append(child)
                self.entries[hs[k - 1]] = child

    def evict_one(self) -> bool:
        """Drop the least recently used entry (and the lazy entries cut from it)."""
        if not self.entries:
            return False
        _, e = self.entries.popitem(last=False)
        e.release()
        dead = {id(e)}
        stack = list(e.children)
        while stack:
            c = stack.pop()
            dead.add(id(c))
            stack += c.children
        for h in [h for h, x in self.entries.items() if id(x) in dead or (x.parent and id(x.parent) in dead)]:
            self.entries.pop(h).release()
        return True

    def held_blocks(self) -> set[int]:
        return {b for e in self.entries.values() for v in (e.views or []) for b in v.segment.blocks}

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

    def plan_prefill(self, waiting: list, n_running: int, setup, prefix: PrefixCache | None = None
                     ) -> list[PrefillWork]:
        """Requests (in arrival order) to prefill this step within the token budget.

        A request waits when the first block it would compute is one that another request computes this
        step: next step it finds that block in the prefix cache instead of computing it again (the n
        samples of one question; questions behind one system prompt). Keyed on the prompt's *first*
        block instead, every question behind a shared system prompt waited for the one before it, and the
        512 branches of a 64-question eval were prefilled one per step. `setup(r)` gives a request its
        sequence (prefix-cache lookup) the first time it is scheduled.
        """
        budget = self.prefill_chunk
        out: list[PrefillWork] = []
        busy: set[int] = set()
        for r in waiting:
            if budget <= 0 or n_running + len(out) >= self.max_running:
                break
            key = self._next_block_key(r, prefix)
            if key is not None and key in busy:
                continue
            if key is not None:
                busy.add(key)
            if r.seq is None:
                setup(r)
            ids = r.prefill_ids
            left = len(ids) - r.prefilled
            n = min(left, budget)
            out.append(PrefillWork(r, r.prefilled, n))
            budget -= n
        return out

    def _next_block_key(self, r, prefix: PrefixCache | None) -> int | None:
        """Chained hash of the first full prompt block `r` would compute (None: no full block left)."""
        ids, bs = r.prefill_ids, self.block_size
        cached = getattr(r, "block_hashes", None)
        if cached is None or cached[0] is not ids:
            cached = (ids, block_hashes(ids, bs, len(ids) // bs))
            r.block_hashes = cached
        hs = cached[1]
        if r.seq is not None:  # already under way: the block it is computing
            i = r.prefilled // bs
            return hs[i] if i < len(hs) else None
        if prefix is None or not prefix.enabled:
            return hs[0] if hs else None
        return next((h for h in hs if h not in prefix.entries), None)

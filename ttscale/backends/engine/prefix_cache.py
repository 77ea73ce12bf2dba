"""Frozen prompt prefixes shared between requests, by chained block hash, with LRU eviction.

Requests with the same prompt (n samples of one question; questions behind one system prompt) view the
cached segments instead of recomputing them; a prefix covering a whole prompt keeps its last logits, so
an identical prompt needs no prefill at all.
"""

from __future__ import annotations

from collections import OrderedDict

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
            assert self.parent is not None, "a lazy entry is cut from its parent's views"
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

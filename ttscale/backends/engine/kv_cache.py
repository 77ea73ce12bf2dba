"""KV memory: one preallocated block pool, ref-counted segments of blocks, and views placing them.

A *segment* holds the K/V of consecutive tokens at local indices 0..length-1; the key of local index j was
rotated (RoPE) at position `rope_start + j`. A *view* `(segment, offset)` places local index j at absolute
position `offset + j` in a sequence; attention rotates the query by `pos - offset + rope_start` instead of
moving keys, so one segment can sit at different positions in different sequences without recomputation.

Blocks are ref-counted: segments hold block references, views/sequences hold segment references. A block
returns to the free list when its last holder lets go, so dropping a sequence frees exactly the blocks
nothing else shares.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ttscale.errors import BackendError, ConfigError


class OutOfKVBlocks(BackendError):
    """The block pool is exhausted (raise the pool size, lower concurrency or max_tokens)."""


class BlockPool:
    """K and V storage `[layers, blocks, block_size, kv_heads, head_dim]` with a free list and ref counts."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(f"num_blocks and block_size must be >= 1 (got {num_blocks}, {block_size})")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype, self.device = dtype, torch.device(device)
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfKVBlocks(
                f"KV block pool exhausted ({self.num_blocks} blocks of {self.block_size} tokens)"
            )
        b = self._free.pop()
        self.refs[b] = 1
        return b

    def incref(self, b: int) -> None:
        if self.refs[b] <= 0:
            raise RuntimeError(f"incref of free block {b}")
        self.refs[b] += 1

    def decref(self, b: int) -> None:
        if self.refs[b] <= 0:
            raise RuntimeError(f"decref of free block {b}")
        self.refs[b] -= 1
        if self.refs[b] == 0:
            self._free.append(b)

    def copy_block(self, src: int, dst: int, n: int) -> None:
        """Copy the first `n` token slots of block `src` into `dst`, every layer (copy-on-write)."""
        self.k[:, dst, :n] = self.k[:, src, :n]
        self.v[:, dst, :n] = self.v[:, src, :n]


_seg_ids = itertools.count()


class Segment:
    """Ref-counted run of tokens' K/V in pool blocks. See the module docstring for positions.

    `embed_id` selects a per-segment embedding added to K/V before RoPE when the model has them
    (ParaThinker); None adds nothing.
    """

    def __init__(self, pool: BlockPool, rope_start: int = 0, embed_id: int | None = None) -> None:
        self.id = next(_seg_ids)
        self.pool = pool
        self.blocks: list[int] = []
        self.length = 0
        self.rope_start = rope_start
        self.embed_id = embed_id
        self.refs = 1
        self.frozen = False

    def __repr__(self) -> str:
        return f"Segment(id={self.id}, len={self.length}, blocks={len(self.blocks)}, refs={self.refs})"

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    def reserve(self, n: int) -> None:
        """Make room for `n` more tokens (allocates blocks; all-or-nothing)."""
        bs = self.pool.block_size
        need = -(-(self.length + n) // bs) - len(self.blocks)
        if need > self.pool.num_free:
            raise OutOfKVBlocks(
                f"need {need} KV blocks, {self.pool.num_free} free of {self.pool.num_blocks}"
            )
        for _ in range(max(0, need)):
            self.blocks.append(self.pool.allocate())

    def slots(self, start: int, n: int) -> list[int]:
        """Flat pool slot indices (block * block_size + offset) of local tokens start..start+n-1."""
        bs = self.pool.block_size
        return [self.blocks[j // bs] * bs + j % bs for j in range(start, start + n)]

    def retain(self) -> Segment:
        if self.refs <= 0:
            raise RuntimeError(f"retain of released {self!r}")
        self.refs += 1
        return self

    def release(self) -> None:
        """Drop one reference; the last one returns the blocks to the pool."""
        if self.refs <= 0:
            raise RuntimeError(f"double release of {self!r}")
        self.refs -= 1
        if self.refs == 0:
            for b in self.blocks:
                self.pool.decref(b)
            self.blocks = []

    def share_prefix(self, n_blocks: int) -> Segment:
        """A new frozen segment holding (sharing) this one's first `n_blocks` full blocks."""
        bs = self.pool.block_size
        if n_blocks * bs > self.length:
            raise ValueError(f"{self!r} has fewer than {n_blocks} full blocks")
        seg = Segment(self.pool, rope_start=self.rope_start, embed_id=self.embed_id)
        seg.blocks = list(self.blocks[:n_blocks])
        for b in seg.blocks:
            self.pool.incref(b)
        seg.length = n_blocks * bs
        seg.frozen = True
        return seg

    def tail_copy(self, from_token: int, share: bool) -> Segment:
        """A new segment continuing from local token `from_token` (block aligned) to the end.

        With `share` the partly filled block is shared (the caller keeps writing into it alone); without,
        it is copied into a fresh block (copy-on-write for a second writer).
        """
        bs = self.pool.block_size
        if from_token % bs:
            raise ValueError("tail_copy needs a block-aligned start")
        seg = Segment(self.pool, rope_start=self.rope_start + from_token, embed_id=self.embed_id)
        rest = self.length - from_token
        src_blocks = self.blocks[from_token // bs:]
        if share:
            seg.blocks = list(src_blocks)
            for b in seg.blocks:
                self.pool.incref(b)
        else:
            for j, b in enumerate(src_blocks):
                nb = self.pool.allocate()
                seg.blocks.append(nb)
                self.pool.copy_block(b, nb, min(bs, rest - j * bs))
        seg.length = rest
        return seg


@dataclass
class View:
    """A segment placed in a sequence: its local token j sits at absolute position `offset + j`."""

    segment: Segment
    offset: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.segment.length


class KVCache:
    """The pool plus segment constructors; the object the model's forward reads and writes."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._scratch: int | None = None

    @property
    def scratch_slot(self) -> int:
        """A pool slot that padding tokens write into (one block kept aside for it on first use)."""
        if self._scratch is None:
            self._scratch = self.pool.allocate() * self.pool.block_size
        return self._scratch

    @classmethod
    def for_model(cls, cfg, num_blocks: int, block_size: int = 16, dtype=None, device=None) -> KVCache:
        return cls(
            BlockPool(
                cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks, block_size,
                dtype=dtype or cfg.dtype, device=device or cfg.device,
            )
        )

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def new_segment(self, rope_start: int = 0, embed_id: int | None = None) -> Segment:
        return Segment(self.pool, rope_start=rope_start, embed_id=embed_id)

    def segment_from_kv(self, k: torch.Tensor, v: torch.Tensor, rope_start: int = 0) -> Segment:
        """A frozen segment filled with given K/V `[layers, tokens, kv_heads, head_dim]` (ParScale prefixes).

        Keys are stored as given: they act as rotated at positions `rope_start + j`, so a view of this
        segment at offset `o` rotates queries by `pos - o + rope_start` (offset 0, rope_start 0: queries
        rotated by their own position, keys unrotated, as ParScale's prefix tokens are).
        """
        pool = self.pool
        if k.shape != v.shape or k.dim() != 4 or k.shape[0] != pool.num_layers:
            raise ConfigError(f"prefix K/V must be [layers, tokens, kv_heads, head_dim]; got {tuple(k.shape)}")
        seg = self.new_segment(rope_start=rope_start)
        n = k.shape[1]
        seg.reserve(n)
        slots = torch.tensor(seg.slots(0, n), device=pool.device)
        kf = pool.k.view(pool.num_layers, -1, pool.num_kv_heads, pool.head_dim)
        vf = pool.v.view(pool.num_layers, -1, pool.num_kv_heads, pool.head_dim)
        kf[:, slots] = k.to(pool.device, pool.dtype)
        vf[:, slots] = v.to(pool.device, pool.dtype)
        seg.length = n
        seg.frozen = True
        return seg

    def read(self, seg: Segment, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V `[tokens, kv_heads, head_dim]` of a segment in one layer (for tests and debugging)."""
        pool = self.pool
        slots = torch.tensor(seg.slots(0, seg.length), device=pool.device, dtype=torch.long)
        kf = pool.k[layer].view(-1, pool.num_kv_heads, pool.head_dim)
        vf = pool.v[layer].view(-1, pool.num_kv_heads, pool.head_dim)
        return kf[slots], vf[slots]


class Sequence:
    """An ordered list of views; new tokens are written into the last view's segment.

    `fork(n)` returns n new sequences sharing everything written so far: full blocks of the write segment
    move into a frozen shared segment, and only the partly filled last block is copied (copy-on-write).
    """

    def __init__(self, views: list[View]) -> None:
        self.views = views

    @classmethod
    def new(cls, cache: KVCache, prefix: list[View] | None = None, offset: int | None = None) -> Sequence:
        """A sequence viewing `prefix` (retained) followed by a fresh write segment."""
        prefix = list(prefix or [])
        for v in prefix:
            v.segment.retain()
        if offset is None:
            offset = max((v.end for v in prefix), default=0)
        return cls(prefix + [View(cache.new_segment(), offset)])

    @property
    def write(self) -> Segment:
        return self.views[-1].segment

    @property
    def length(self) -> int:
        """Absolute position of the next token."""
        return self.views[-1].end

    def fork(self, n: int) -> list[Sequence]:
        tail = self.views[-1]
        seg, bs = tail.segment, tail.segment.pool.block_size
        full = seg.length // bs
        base = list(self.views[:-1])
        if full:
            base.append(View(seg.share_prefix(full), tail.offset))
        start = full * bs
        children = []
        for _ in range(n):
            for v in base:
                v.segment.retain()
            children.append(Sequence(list(base)))
        # Children first, so the parent's partial block can be handed over without a copy afterwards.
        for c in children:
            c.views.append(View(seg.tail_copy(start, share=False), tail.offset + start))
        mine = seg.tail_copy(start, share=True)
        seg.release()
        self.views = base + [View(mine, tail.offset + start)]
        return children

    def release(self) -> None:
        for v in self.views:
            v.segment.release()
        self.views = []

"""Attention metadata: which query rows attend to which segment blocks, as index tensors.

`build_meta` turns `ForwardItem`s (Python lists of views and tokens) into one flat int64 tensor of
indices, viewed as `AttnMeta`; the model's forward is then pure tensor code on fixed shapes, which is
what CUDA graphs capture. Attention is computed per *segment* ("job"): every query token of the batch
that sees a segment is gathered into that segment's job, so a prompt shared by 64 branches is read once
per step for all of them. Kept apart from `model.py` so the model file holds weights and the forward only.
"""

from __future__ import annotations

import array
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ttscale.backends.engine.kv_cache import KVCache, Segment, View
from ttscale.errors import ConfigError


@dataclass
class ForwardItem:
    """One sequence's part of a forward: `tokens` are appended to `write` and attend to `views`.

    `write` defaults to the last view's segment and must be one of the views' segments. `logits` picks
    which of the new tokens get logits: "last", "all" or "none".
    """

    views: list[View]
    tokens: Seq[int]
    write: Segment | None = None
    logits: Literal["last", "all", "none"] = "last"


@dataclass
class ClassMeta:
    """Jobs with the same (padded) query count: index tensors `[J, Qc]` and block tables `[J, MB]`."""

    qidx: torch.Tensor
    vslot: torch.Tensor
    delta: torch.Tensor
    limit: torch.Tensor
    blocks: torch.Tensor


@dataclass
class AttnMeta:
    tokens: torch.Tensor  # [N]
    write_slots: torch.Tensor  # [N]
    k_pos: torch.Tensor  # [N] rotation position of new keys
    embed_ids: torch.Tensor | None  # [N] segment-embedding row per new token
    classes: list[ClassMeta]
    vmax: int
    logits_idx: torch.Tensor  # [M]
    # [N] per new token: the row of the previous decode step's sampled tokens that is its token (-1: `tokens`
    # holds it). Decode steps launched before the previous one's tokens reach the host take them on device.
    src: torch.Tensor | None
    n_real: int = 0
    item_rows: list[tuple[int, int]] = field(default_factory=list)  # per item: (start, count) in logits
    jobs_per_segment: dict[int, int] = field(default_factory=dict)

    flat: torch.Tensor | None = None
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    layout: DecodeLayout | None = None  # how the next decode step of the same rows is derived (`build_meta`)

    has_emb: bool = False
    has_src: bool = False

    @classmethod
    def from_flat(cls, buf: torch.Tensor, shapes: list[tuple[int, ...]], has_emb: bool, vmax: int,
                  has_src: bool = False) -> AttnMeta:
        """Metadata over one flat index tensor, in the order `build_meta` wrote it. The per-section views are
        made at the first read of one of them (`__getattr__`): a step replayed from a CUDA graph reads only
        `flat` and the shapes, and each view is a torch call that lets go of the GIL, which a busy event
        loop then held (15-30 of them a step at 512 branches, twice: the step ahead is planned too)."""
        meta = cls.__new__(cls)
        meta.vmax, meta.flat, meta.shapes, meta.has_emb, meta.has_src = vmax, buf, list(shapes), has_emb, has_src
        meta.n_real, meta.item_rows, meta.jobs_per_segment, meta.layout = 0, [], {}, None
        return meta

    def __getattr__(self, name: str) -> Any:
        """The section views (`tokens`, `classes`, ...), made once, on first use (see `from_flat`)."""
        if name not in _VIEW_FIELDS or "flat" not in self.__dict__:
            raise AttributeError(name)
        self._make_views()
        return self.__dict__[name]

    def _make_views(self) -> None:
        buf, views, off = self.flat, [], 0
        assert buf is not None
        for sh in self.shapes:
            n = 1
            for d in sh:
                n *= d
            off = _aligned(off)
            views.append(buf[off:off + n].view(sh))
            off += n
        self.src = views.pop() if self.has_src else None
        it = iter(views)
        self.tokens, self.write_slots, self.k_pos, self.logits_idx = next(it), next(it), next(it), next(it)
        self.embed_ids = next(it) if self.has_emb else None
        self.classes = [ClassMeta(next(it), next(it), next(it), next(it), next(it))
                        for _ in range((len(views) - 4 - int(self.has_emb)) // 5)]

    @property
    def n_tokens(self) -> int:
        """Rows of this forward, padding included (without making the views)."""
        return self.shapes[0][0]

    @property
    def n_logits(self) -> int:
        """Rows of logits it returns, padding included."""
        return self.shapes[3][0]

    def shape_key(self) -> tuple:
        """What a CUDA graph of this forward is captured for, from the shapes alone."""
        sh, k = self.shapes, 4 + int(self.has_emb)
        n_classes = (len(sh) - k - int(self.has_src)) // 5
        return (
            sh[0][0], self.vmax, sh[3][0],
            tuple((tuple(sh[k + 5 * i]), sh[k + 5 * i + 4][1]) for i in range(n_classes)),
            self.has_emb, self.has_src,
        )

    def tensors(self) -> list[torch.Tensor]:
        out = [self.tokens, self.write_slots, self.k_pos, self.logits_idx]
        if self.embed_ids is not None:
            out.append(self.embed_ids)
        for c in self.classes:
            out += [c.qidx, c.vslot, c.delta, c.limit, c.blocks]
        if self.src is not None:
            out.append(self.src)
        return out


_VIEW_FIELDS = frozenset({"tokens", "write_slots", "k_pos", "embed_ids", "classes", "logits_idx", "src"})


def _aligned(offset: int) -> int:
    """Where a section of the flat metadata starts: an even int64 offset, so that every index tensor is
    16-byte aligned. Triton specialises pointer arguments on 16-byte alignment: sections at odd offsets gave
    the attention kernel up to 2^5 variants of its five index pointers, each compiled (about a second) the
    first time a batch layout put them there, at any point of a run."""
    return offset + (offset & 1)


def host_array(values: list[int]) -> np.ndarray:
    """`values` as an int64 numpy array, converted at C speed (writable: it shares the `array`'s memory)."""
    return np.frombuffer(array.array("q", values), dtype=np.int64) if values else np.empty(0, dtype=np.int64)


@dataclass
class DecodeLayout:
    """Where each row's indices sit in a decode step's flat metadata (one new token per row), so that the
    next step of the same rows is this one plus one: every slot, key position, query offset and causal
    limit moves by one token, except a row entering a new KV block (its slot, and one entry of its block
    table). `advance` derives that step without walking the views again; at hundreds of rows, building
    the metadata from the views was most of the host's time per step.

    The values live in a numpy array updated in place: at 512 branches a padded layout holds ~220k indices
    (the shared class is padded to the widest job), and a torch clone and copy of that size ran on the
    intra-op thread pool, ~1.3 ms a step on a 16-core GPU host next to the CUDA threads (py-spy: a quarter of
    the engine thread), where one single-threaded copy into the pinned upload buffer takes ~50 us."""

    host: np.ndarray  # the flat int64 values of the last step derived (updated in place by `advance`)
    shapes: list[tuple[int, ...]]
    has_emb: bool
    vmax: int
    n_real: int
    item_rows: list[tuple[int, int]]
    jobs_per_segment: dict[int, int]
    views: list[list[View]]  # per row: its sequence's views list (a fork replaces it)
    writes: list[Segment]  # per row: its write segment
    lengths: list[int]  # per row: the write segment's length after this step
    inc: np.ndarray  # flat positions that grow by one each step (distinct)
    block_pos: list[int]  # per row: flat position of its own job's block-table row
    mb: list[int]  # per row: width of that block-table row (a longer row needs a new layout)
    src_at: int  # flat position of the `src` section (-1: none)
    slots_at: int  # flat position of the write-slot section

    def advance(self, tokens: list[int], src: list[int] | None, staging: Staging,
                device: torch.device) -> AttnMeta | None:
        """The next decode step of the same rows (their segments unchanged since), reserving each row's
        slot; None when that is not this layout plus one (then build the metadata anew). Raises
        `OutOfKVBlocks` when a row needs a block and none is free. A layout whose step is given up
        (`ModelRunner.undo`) is dropped, never advanced again: its values are this step's already."""
        R = len(self.writes)
        if len(tokens) != R or (src is None) != (self.src_at < 0):
            return None
        bs = self.writes[0].pool.block_size if R else 1
        crossing = []
        for r, w in enumerate(self.writes):
            L0 = w.length
            if self.lengths[r] != L0 or w.frozen:
                return None
            if L0 % bs == 0:
                nb = L0 // bs + 1
                if nb > self.mb[r]:
                    return None
                crossing.append(r)
        for r in crossing:
            self.writes[r].reserve(1)
        host = self.host
        host[self.inc] += 1
        for r in crossing:  # a row entering a new block: its write slot and its block-table entry
            w = self.writes[r]
            b = w.length // bs
            blk = w.blocks[b]
            host[self.slots_at + r] = blk * bs
            host[self.block_pos[r] + b] = blk
        host[:R] = tokens
        if src is not None:
            host[self.src_at:self.src_at + R] = src
        for r, w in enumerate(self.writes):
            w.length += 1
            self.lengths[r] = w.length
        meta = AttnMeta.from_flat(staging.upload(host, device), self.shapes, self.has_emb, self.vmax,
                                  has_src=src is not None)
        meta.n_real, meta.item_rows, meta.jobs_per_segment = self.n_real, self.item_rows, self.jobs_per_segment
        return meta


class Staging:
    """Host-to-device upload of a step's index list through reused pinned buffers.

    `torch.tensor(list)` costs ~0.2 us an element and a fresh `pin_memory()` allocates every step; at 512
    branches the metadata is up to ~220k ints. A small ring of pinned buffers (each reused once its last copy
    has finished), filled by one numpy copy (single-threaded: torch's copy of that size went to the
    intra-op pool), keeps the copy asynchronous, so the next step's metadata is still prepared while the GPU
    runs this one. On CPU the upload is a copy of the values (the caller may change them in place next step).
    """

    def __init__(self, ring: int = 4) -> None:
        self.bufs: list[torch.Tensor | None] = [None] * ring
        self.events: list[torch.cuda.Event | None] = [None] * ring
        self.i = 0

    def upload(self, values: np.ndarray, device: torch.device) -> torch.Tensor:
        if device.type != "cuda":
            return torch.from_numpy(values.copy())
        self.i = (self.i + 1) % len(self.bufs)
        n, buf, ev = len(values), self.bufs[self.i], self.events[self.i]
        if buf is None or buf.numel() < n:
            buf = self.bufs[self.i] = torch.empty(max(1024, 2 * n), dtype=torch.long, pin_memory=True)
        elif ev is not None:
            ev.synchronize()
        np.copyto(buf.numpy()[:n], values)
        out = buf[:n].to(device, non_blocking=True)
        ev = self.events[self.i] = torch.cuda.Event()
        ev.record()
        return out


MIN_PAD_BLOCKS = 16  # narrowest padded block table: a decode step's width changes at 16, 32, 64... blocks


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def bucket(n: int) -> int:
    """Batch-size bucket for padding (CUDA graphs): powers of two up to 32, then multiples of 32 up to 256,
    of 64 up to 1,024, then of 128. Each bucket is one graph capture per layout; padded rows cost little
    (a decode step reads the weights once whatever the batch), while a run that crosses many buckets
    spends its time capturing (a 512-branch eval crossed ~50 buckets of 16 as its branches finished)."""
    if n <= 32:
        return _pow2(n)
    step = 32 if n <= 256 else 64 if n <= 1024 else 128
    return -(-n // step) * step



def build_meta(cache: KVCache, items: list[ForwardItem], staging: Staging, n_seg_ids: int | None = None,
               pad: bool = False, src: list[int] | None = None, record: bool = False) -> AttnMeta:
    """Index tensors for one forward; extends the write segments (allocating blocks as needed).

    `n_seg_ids`: rows of the model's segment-id embeddings (None: it has none); a segment without an
    embedding id uses the zero row after them.

    With `pad`, shapes are rounded up to buckets (CUDA graphs replay one capture per shape key).

    `src`: per new token, the row of the previous decode step's sampled tokens to take it from on device
    (-1: the token given in its item); becomes `AttnMeta.src`.

    `record`: for a decode step (one token per item, every view other than the write one frozen), also
    set `meta.layout` (`DecodeLayout`), from which the next step of the same items is derived.
    """
    if src is not None and len(src) != sum(len(it.tokens) for it in items):
        raise ConfigError(f"src has {len(src)} rows for {sum(len(it.tokens) for it in items)} new tokens")
    bs = cache.block_size
    len0: dict[int, int] = {}
    writes: set[int] = set()
    for it in items:
        for v in it.views:
            len0[v.segment.id] = v.segment.length
        w = it.write or it.views[-1].segment
        if w.id in writes:
            raise ConfigError("two items of one forward write the same segment")
        if w.frozen:
            raise ConfigError(f"{w!r} is frozen (shared); fork the sequence to write after it")
        writes.add(w.id)
    for it in items:
        (it.write or it.views[-1].segment).reserve(len(it.tokens))

    tokens: list[int] = []
    slots: list[int] = []
    kpos: list[int] = []
    eids: list[int] = []
    no_id = -1
    # per segment: [segment, rows, view slots, deltas, limits, max limit]
    jobs: dict[int, list] = {}
    logit_rows: list[int] = []
    item_rows: list[tuple[int, int]] = []
    vmax = 1
    for it in items:
        w = it.write or it.views[-1].segment
        wv = None
        for v in reversed(it.views):
            if v.segment is w:
                wv = v
                break
        if wv is None:
            raise ConfigError("an item's write segment must be one of its views")
        n = len(it.tokens)
        if n == 0:
            raise ConfigError("a forward item needs at least one token")
        L0, r0 = w.length, len(tokens)
        tokens.extend(it.tokens if isinstance(it.tokens, list) else [int(t) for t in it.tokens])
        if n == 1:
            b_, o_ = divmod(L0, bs)
            slots.append(w.blocks[b_] * bs + o_)
            kpos.append(w.rope_start + L0)
        else:
            slots.extend(w.slots(L0, n))
            kpos.extend(range(w.rope_start + L0, w.rope_start + L0 + n))
        eids.extend([no_id if w.embed_id is None else w.embed_id] * n)
        vmax = max(vmax, len(it.views))
        for vs, view in enumerate(it.views):
            seg = view.segment
            if seg is w:
                lim0, causal = L0 + 1, True
            else:
                lim0, causal = len0[seg.id], False
                if lim0 == 0:
                    continue
            job = jobs.get(seg.id)
            if job is None:
                job = jobs[seg.id] = [seg, [], [], [], [], 0]
            base = wv.offset + L0 - view.offset + seg.rope_start
            if n == 1:
                job[1].append(r0)
                job[2].append(vs)
                job[3].append(base)
                job[4].append(lim0)
            else:
                job[1].extend(range(r0, r0 + n))
                job[2].extend([vs] * n)
                job[3].extend(range(base, base + n))
                job[4].extend(range(lim0, lim0 + n) if causal else [lim0] * n)
            last_lim = lim0 + n - 1 if causal else lim0
            job[5] = max(job[5], last_lim)
        if it.logits == "last":
            item_rows.append((len(logit_rows), 1))
            logit_rows.append(r0 + n - 1)
        elif it.logits == "all":
            item_rows.append((len(logit_rows), n))
            logit_rows.extend(range(r0, r0 + n))
        else:
            item_rows.append((len(logit_rows), 0))
    for it in items:
        w = it.write or it.views[-1].segment
        w.length += len(it.tokens)

    n_real = len(tokens)
    n_pad = bucket(n_real) if pad else n_real
    if pad:
        vmax = _pow2(vmax)  # the kernels specialise on it; padded view slots stay empty (weight 0)
    dummy = n_pad
    scratch = cache.scratch_slot
    tokens += [0] * (n_pad - n_real)
    slots += [scratch] * (n_pad - n_real)
    kpos += [0] * (n_pad - n_real)
    eids += [no_id] * (n_pad - n_real)
    if pad:
        logit_rows = logit_rows + [0] * (bucket(max(1, len(logit_rows))) - len(logit_rows))

    groups: dict[int, list] = {}
    # Padded (graph) layouts put every shared segment's job in one class of the largest query count:
    # n samples of a question finish at different times, and classes per count (2, 4, 8, ...) made
    # a new shape key, so a new capture, each time one of them shrank.
    q_shared = _pow2(max((len(j[1]) for j in jobs.values()), default=1)) if pad else 0
    for job in jobs.values():
        q = len(job[1])
        qc = 1 if q == 1 else (q_shared if pad else _pow2(q))
        groups.setdefault(qc, []).append(job)
    has_emb = n_seg_ids is not None
    n_ids = n_seg_ids or 0
    # Everything goes into one flat int64 tensor (one host-to-device copy; CUDA graphs copy it whole).
    flat: list[int] = []
    shapes: list[tuple[int, ...]] = []

    def put(values: list[int], shape: tuple[int, ...]) -> int:
        """Append a section (at an aligned offset, as `AttnMeta.from_flat` reads it); returns its offset."""
        if len(flat) & 1:
            flat.append(0)
        at = len(flat)
        flat.extend(values)
        shapes.append(shape)
        return at

    put(tokens, (n_pad,))
    slots_at = put(slots, (n_pad,))
    kpos_at = put(kpos, (n_pad,))
    put(logit_rows, (len(logit_rows),))
    if has_emb:
        put([n_ids if e == no_id else e for e in eids], (n_pad,))
    record = record and all(len(it.tokens) == 1 and (it.write is None or it.write is it.views[-1].segment)
                            and all(v.segment.frozen for v in it.views[:-1]) for it in items)
    inc: list[int] = []
    block_pos = [0] * len(items)
    row_mb = [0] * len(items)
    if record:
        inc.extend(range(slots_at, slots_at + n_real))
        inc.extend(range(kpos_at, kpos_at + n_real))
    for qc in sorted(groups):
        js = groups[qc]
        nj = bucket(len(js)) if pad else len(js)
        mb = max(-(-job[5] // bs) for job in js)
        if pad:  # padded block-table entries are never read (limits stop first); fewer widths, fewer captures
            mb = max(MIN_PAD_BLOCKS, _pow2(mb))
        extra = nj - len(js)
        if qc == 1:
            cols = [[job[k][0] for job in js] for k in (1, 2, 3, 4)]
            cols[0].extend([dummy] * extra)
            for col in cols[1:]:
                col.extend([0] * extra)
        else:
            cols = [[], [], [], []]
            for job in js:
                fill = qc - len(job[1])
                for k in range(4):
                    cols[k].extend(job[k + 1])
                cols[0].extend([dummy] * fill)
                for col in cols[1:]:
                    col.extend([0] * fill)
            cols[0].extend([dummy] * (extra * qc))
            for col in cols[1:]:
                col.extend([0] * (extra * qc))
        blocks: list[int] = []
        for job in js:
            nb = -(-job[5] // bs)
            blocks.extend(job[0].blocks[:nb])
            if nb < mb:
                blocks.extend([0] * (mb - nb))
        blocks.extend([0] * (extra * mb))
        _, _, delta_at, limit_at = (put(col, (nj, qc)) for col in cols)  # qidx, vslot, delta, limit
        blocks_at = put(blocks, (nj, mb))
        if record:
            for ji, job in enumerate(js):
                e0 = ji * qc
                inc.extend(range(delta_at + e0, delta_at + e0 + len(job[1])))  # query offsets
                if job[0].id in writes:  # its row's own segment: causal limit, block-table row
                    r = job[1][0]
                    inc.append(limit_at + e0)
                    block_pos[r], row_mb[r] = blocks_at + ji * mb, mb
    src_at = put(src + [-1] * (n_pad - n_real), (n_pad,)) if src is not None else -1
    host = host_array(flat)
    buf = staging.upload(host, cache.pool.device)
    meta = AttnMeta.from_flat(buf, shapes, has_emb, vmax, has_src=src is not None)
    meta.n_real, meta.item_rows = n_real, item_rows
    meta.jobs_per_segment = {sid: len(job[1]) for sid, job in jobs.items()}
    if record:
        ws = [it.write or it.views[-1].segment for it in items]
        meta.layout = DecodeLayout(
            host=host, shapes=shapes, has_emb=has_emb, vmax=vmax, n_real=n_real, item_rows=item_rows,
            jobs_per_segment=meta.jobs_per_segment, views=[it.views for it in items], writes=ws,
            lengths=[w.length for w in ws], inc=host_array(inc), block_pos=block_pos, mb=row_mb, src_at=src_at,
            slots_at=slots_at)
    return meta


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
from typing import Literal

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
    n_real: int = 0
    item_rows: list[tuple[int, int]] = field(default_factory=list)  # per item: (start, count) in logits
    jobs_per_segment: dict[int, int] = field(default_factory=dict)

    flat: torch.Tensor | None = None
    shapes: list[tuple[int, ...]] = field(default_factory=list)

    @classmethod
    def from_flat(cls, buf: torch.Tensor, shapes: list[tuple[int, ...]], has_emb: bool, vmax: int) -> AttnMeta:
        """Views into one flat index tensor, in the order `build_meta` wrote them."""
        views, off = [], 0
        for sh in shapes:
            n = 1
            for d in sh:
                n *= d
            views.append(buf[off:off + n].view(sh))
            off += n
        it = iter(views)
        tokens, slots, kpos, lidx = next(it), next(it), next(it), next(it)
        eids = next(it) if has_emb else None
        classes = []
        for _ in range((len(shapes) - 4 - int(has_emb)) // 5):
            classes.append(ClassMeta(next(it), next(it), next(it), next(it), next(it)))
        return cls(tokens=tokens, write_slots=slots, k_pos=kpos, embed_ids=eids, classes=classes, vmax=vmax,
                   logits_idx=lidx, flat=buf, shapes=list(shapes))

    def shape_key(self) -> tuple:
        return (
            int(self.tokens.shape[0]), self.vmax, int(self.logits_idx.shape[0]),
            tuple((tuple(c.qidx.shape), int(c.blocks.shape[1])) for c in self.classes),
            self.embed_ids is not None,
        )

    def tensors(self) -> list[torch.Tensor]:
        out = [self.tokens, self.write_slots, self.k_pos, self.logits_idx]
        if self.embed_ids is not None:
            out.append(self.embed_ids)
        for c in self.classes:
            out += [c.qidx, c.vslot, c.delta, c.limit, c.blocks]
        return out


class Staging:
    """Host-to-device upload of a step's index list through reused pinned buffers.

    `torch.tensor(list)` costs ~0.2 us an element and a fresh `pin_memory()` allocates every step; at 512
    branches the metadata is ~15k ints, built twice a step (one speculative). `array('q', ...)` converts
    at C speed, and a small ring of pinned buffers (each reused once its last copy has finished) keeps the
    copy asynchronous, so the next step's metadata is still prepared while the GPU runs this one.
    """

    def __init__(self, ring: int = 4) -> None:
        self.bufs: list[torch.Tensor | None] = [None] * ring
        self.events: list[torch.cuda.Event | None] = [None] * ring
        self.i = 0

    def upload(self, values: list[int], device: torch.device) -> torch.Tensor:
        host = (torch.frombuffer(array.array("q", values), dtype=torch.long) if values
                else torch.empty(0, dtype=torch.long))
        if device.type != "cuda":
            return host
        self.i = (self.i + 1) % len(self.bufs)
        n, buf, ev = len(values), self.bufs[self.i], self.events[self.i]
        if buf is None or buf.numel() < n:
            buf = self.bufs[self.i] = torch.empty(max(1024, 2 * n), dtype=torch.long, pin_memory=True)
        elif ev is not None:
            ev.synchronize()
        buf[:n].copy_(host)
        out = buf[:n].to(device, non_blocking=True)
        ev = self.events[self.i] = torch.cuda.Event()
        ev.record()
        return out


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
               pad: bool = False) -> AttnMeta:
    """Index tensors for one forward; extends the write segments (allocating blocks as needed).

    `n_seg_ids`: rows of the model's segment-id embeddings (None: it has none); a segment without an
    embedding id uses the zero row after them.

    With `pad`, shapes are rounded up to buckets (CUDA graphs replay one capture per shape key).
    """
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

    def put(values: list[int], shape: tuple[int, ...]) -> None:
        flat.extend(values)
        shapes.append(shape)

    put(tokens, (n_pad,))
    put(slots, (n_pad,))
    put(kpos, (n_pad,))
    put(logit_rows, (len(logit_rows),))
    if has_emb:
        put([n_ids if e == no_id else e for e in eids], (n_pad,))
    for qc in sorted(groups):
        js = groups[qc]
        nj = bucket(len(js)) if pad else len(js)
        mb = max(-(-job[5] // bs) for job in js)
        if pad:
            mb = _pow2(mb)
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
        for col in cols:
            put(col, (nj, qc))
        put(blocks, (nj, mb))
    buf = staging.upload(flat, cache.pool.device)
    meta = AttnMeta.from_flat(buf, shapes, has_emb, vmax)
    meta.n_real, meta.item_rows = n_real, item_rows
    meta.jobs_per_segment = {sid: len(job[1]) for sid, job in jobs.items()}
    return meta


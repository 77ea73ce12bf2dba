"""Llama / Qwen2 / Qwen3 decoder forward over segments and views.

One forward takes any number of `ForwardItem`s: each appends tokens to its write segment and attends to
its views. Attention is computed per *segment* ("job"): every query token of the batch that sees a
segment is gathered into that segment's job, so a prompt shared by 64 branches is read once per step
for all of them. Each job returns partial outputs with their log-sum-exp; a query's partials over its
views are merged exactly. Queries are rotated per view (`pos - offset + rope_start`), keys never move.

`build_meta` turns items into index tensors (Python); `forward_meta` is pure tensor code on fixed
shapes, which is what CUDA graphs capture.
"""

from __future__ import annotations

import array
import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ttscale.backends.engine.kv_cache import KVCache, Segment, View
from ttscale.errors import ConfigError

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
_NEG = -1.0e30


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    tie_embeddings: bool
    qk_norm: bool
    max_position: int
    inv_freq: torch.Tensor
    rope_scale: float = 1.0
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_hf(cls, hf, dtype: torch.dtype, device) -> ModelConfig:
        """From a transformers config object (rope types through transformers' own init functions)."""
        arch = hf.model_type
        if arch not in SUPPORTED_ARCHS:
            raise ConfigError(f"unsupported model type {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        rope = getattr(hf, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type == "default":
            base = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scale = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
                raise ConfigError(f"unsupported rope type {rope_type!r}")
            inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
        if getattr(hf, "use_sliding_window", False) or (arch == "mistral" and getattr(hf, "sliding_window", None)):
            raise ConfigError("sliding-window attention is not supported by the engine")
        eos = hf.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            arch=arch, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim, intermediate_size=hf.intermediate_size, rms_eps=hf.rms_norm_eps,
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)), qk_norm=arch == "qwen3",
            max_position=getattr(hf, "max_position_embeddings", 32768), inv_freq=inv_freq.float(),
            rope_scale=float(scale), eos_token_ids=eos_ids, dtype=dtype, device=torch.device(device),
        )


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    ln2: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor


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
        host = torch.frombuffer(array.array("q", values), dtype=torch.long) if values else torch.empty(0, dtype=torch.long)
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


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rot_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Model:
    """Weights plus the forward. Build with `loader.load_model` or `Model(cfg, state_dict)`."""

    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        dev, dt = cfg.device, cfg.dtype

        def get(name: str, required: bool = True) -> torch.Tensor | None:
            for key in (name, "model." + name):
                if key in state:
                    return state[key].to(device=dev, dtype=dt).contiguous()
            if required:
                raise ConfigError(f"checkpoint lacks weight {name!r}")
            return None

        self.embed = get("embed_tokens.weight")
        lm = state.get("lm_head.weight")
        self.lm_head = self.embed if (lm is None or cfg.tie_embeddings) else lm.to(dev, dt).contiguous()
        self.norm = get("norm.weight")
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            q, k, v = (get(p + f"self_attn.{n}_proj.weight") for n in "qkv")
            bq, bk, bv = (get(p + f"self_attn.{n}_proj.bias", False) for n in "qkv")
            bqkv = None
            if bq is not None:
                bqkv = torch.cat([bq, bk if bk is not None else torch.zeros_like(k[:, 0]),
                                  bv if bv is not None else torch.zeros_like(v[:, 0])])
            self.layers.append(LayerWeights(
                ln1=get(p + "input_layernorm.weight"), wqkv=torch.cat([q, k, v]).contiguous(), bqkv=bqkv,
                q_norm=get(p + "self_attn.q_norm.weight", cfg.qk_norm),
                k_norm=get(p + "self_attn.k_norm.weight", cfg.qk_norm),
                wo=get(p + "self_attn.o_proj.weight"), bo=get(p + "self_attn.o_proj.bias", False),
                ln2=get(p + "post_attention_layernorm.weight"),
                w_gate_up=torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]).contiguous(),
                w_down=get(p + "mlp.down_proj.weight"),
            ))
        self.inv_freq = cfg.inv_freq.to(dev)
        self._staging = Staging()
        self.seg_k: torch.Tensor | None = None
        self.seg_v: torch.Tensor | None = None
        self.kernels = None

    def use_kernels(self, on: bool = True) -> bool:
        """Switch the forward to the fused Triton kernels (default on CUDA when Triton is installed)."""
        if not on:
            self.kernels = None
            return False
        try:
            from ttscale.backends.engine import kernels
        except ImportError:
            self.kernels = None
            return False
        self.kernels = kernels
        return True

    # ---- hooks for native strategies -------------------------------------------------------------------
    def set_segment_embeddings(self, k: torch.Tensor | None, v: torch.Tensor | None = None) -> None:
        """Per-layer segment-id embeddings `[layers, ids, kv_heads*head_dim]` added to new K/V before RoPE.

        A segment with `embed_id=i` adds row i; segments with `embed_id=None` add nothing.
        """
        if k is None:
            self.seg_k = self.seg_v = None
            return
        c = self.cfg
        shape = (c.num_layers, -1, c.num_kv_heads, c.head_dim)
        zero = torch.zeros(c.num_layers, 1, c.num_kv_heads * c.head_dim)
        self.seg_k = torch.cat([k.float().cpu(), zero], 1).reshape(shape).to(c.device, c.dtype)
        vv = torch.zeros_like(k) if v is None else v
        self.seg_v = torch.cat([vv.float().cpu(), zero], 1).reshape(shape).to(c.device, c.dtype)

    # ---- metadata ----------------------------------------------------------------------------------------
    def build_meta(self, cache: KVCache, items: list[ForwardItem], pad: bool = False) -> AttnMeta:
        """Index tensors for one forward; extends the write segments (allocating blocks as needed).

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
        has_emb = self.seg_k is not None
        n_ids = 0 if self.seg_k is None else self.seg_k.shape[1] - 1
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
        buf = self._staging.upload(flat, cache.pool.device)
        meta = AttnMeta.from_flat(buf, shapes, has_emb, vmax)
        meta.n_real, meta.item_rows = n_real, item_rows
        meta.jobs_per_segment = {sid: len(job[1]) for sid, job in jobs.items()}
        return meta

    # ---- tensor forward -----------------------------------------------------------------------------------
    def _cos_sin(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = pos.float()[..., None] * self.inv_freq
        emb = torch.cat((f, f), -1)
        dt = self.cfg.dtype
        return (emb.cos() * self.cfg.rope_scale).to(dt), (emb.sin() * self.cfg.rope_scale).to(dt)

    def forward_meta(self, cache: KVCache, meta: AttnMeta, return_hidden: bool = False):
        """Logits `[M, vocab]` (float32) for `meta.logits_idx` rows; with `return_hidden`, also the final
        normed hidden states `[M, hidden]`."""
        if self.kernels is not None:
            return self._forward_fused(cache, meta, return_hidden)
        c = self.cfg
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        G = H // Hkv
        pool = cache.pool
        N = meta.tokens.shape[0]
        scale = 1.0 / math.sqrt(D)
        kcos, ksin = self._cos_sin(meta.k_pos)
        kcos, ksin = kcos[:, None], ksin[:, None]
        qrot = [self._cos_sin(cm.delta) for cm in meta.classes]
        x = self.embed[meta.tokens]
        nq, nk = H * D, Hkv * D
        for li, L in enumerate(self.layers):
            h = rms_norm(x, L.ln1, c.rms_eps)
            qkv = F.linear(h, L.wqkv, L.bqkv)
            q = qkv[:, :nq].view(N, H, D)
            k = qkv[:, nq:nq + nk].view(N, Hkv, D)
            v = qkv[:, nq + nk:].view(N, Hkv, D)
            if L.q_norm is not None:
                q = rms_norm(q, L.q_norm, c.rms_eps)
                k = rms_norm(k, L.k_norm, c.rms_eps)
            if self.seg_k is not None and meta.embed_ids is not None:
                k = k + self.seg_k[li][meta.embed_ids]
                v = v + self.seg_v[li][meta.embed_ids]
            k = k * kcos + _rot_half(k) * ksin
            kf = pool.k[li].view(-1, Hkv, D)
            vf = pool.v[li].view(-1, Hkv, D)
            kf.index_copy_(0, meta.write_slots, k.to(pool.dtype))
            vf.index_copy_(0, meta.write_slots, v.to(pool.dtype))
            o = self._attend(q, pool.k[li], pool.v[li], meta, qrot, scale, G)
            x = x + F.linear(o, L.wo, L.bo)
            h = rms_norm(x, L.ln2, c.rms_eps)
            gu = F.linear(h, L.w_gate_up)
            g, u = gu.chunk(2, dim=-1)
            x = x + F.linear(F.silu(g) * u, L.w_down)
        hid = rms_norm(x[meta.logits_idx], self.norm, c.rms_eps)
        logits = F.linear(hid, self.lm_head).float()
        return (logits, hid) if return_hidden else logits

    def _forward_fused(self, cache: KVCache, meta: AttnMeta, return_hidden: bool):
        kn = self.kernels
        c = self.cfg
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        G = H // Hkv
        pool = cache.pool
        N = meta.tokens.shape[0]
        V = meta.vmax
        scale = 1.0 / math.sqrt(D)
        nq, nk = H * D, Hkv * D
        splits = [kn.attn_split(cm, G, Hkv, pool.block_size) for cm in meta.classes]
        smax = max(splits, default=1)
        out = torch.zeros(N + 1, V * smax, H, D, dtype=torch.float32, device=pool.device)
        lse = torch.full((N + 1, V * smax, H), _NEG, dtype=torch.float32, device=pool.device)
        attn = torch.empty(N, H * D, dtype=c.dtype, device=pool.device)
        x = self.embed[meta.tokens]
        res = None
        for li, L in enumerate(self.layers):
            h = kn.add_rmsnorm(x, res, L.ln1, c.rms_eps)
            qkv = F.linear(h, L.wqkv, L.bqkv)
            q = qkv[:, :nq].view(N, H, D)
            k = qkv[:, nq:nq + nk].view(N, Hkv, D)
            v = qkv[:, nq + nk:].view(N, Hkv, D)
            if L.q_norm is not None:
                q = rms_norm(q, L.q_norm, c.rms_eps)
                k = rms_norm(k, L.k_norm, c.rms_eps)
            if self.seg_k is not None and meta.embed_ids is not None:
                k = k + self.seg_k[li][meta.embed_ids]
                v = v + self.seg_v[li][meta.embed_ids]
            kn.rope_write(k, v, pool.k[li], pool.v[li], meta.write_slots, meta.k_pos, self.inv_freq,
                          c.rope_scale)
            for cm, sp in zip(meta.classes, splits):
                kn.seg_attn(q, pool.k[li], pool.v[li], cm, self.inv_freq, out, lse, N, V, scale,
                            c.rope_scale, G, sp, smax)
            kn.merge(out, lse, attn, V * smax)
            res = F.linear(attn, L.wo, L.bo)
            h = kn.add_rmsnorm(x, res, L.ln2, c.rms_eps)
            gu = F.linear(h, L.w_gate_up)
            res = F.linear(kn.silu_mul(gu), L.w_down)
        x = x + res
        hid = rms_norm(x[meta.logits_idx], self.norm, c.rms_eps)
        logits = F.linear(hid, self.lm_head).float()
        return (logits, hid) if return_hidden else logits

    def _attend(self, q, kpool, vpool, meta: AttnMeta, qrot, scale: float, G: int) -> torch.Tensor:
        N, H, D = q.shape
        Hkv = H // G
        bs = kpool.shape[1]
        qp = torch.cat([q, q.new_zeros(1, H, D)])
        V = meta.vmax
        single = V == 1 and len(meta.classes) == 1
        if not single:
            out_buf = q.new_zeros(N + 1, V, H, D, dtype=torch.float32)
            lse_buf = q.new_full((N + 1, V, H), _NEG, dtype=torch.float32)
        for cm, (cos, sin) in zip(meta.classes, qrot):
            J, Qc = cm.qidx.shape
            qj = qp[cm.qidx]  # [J, Qc, H, D]
            qj = qj * cos[:, :, None] + _rot_half(qj) * sin[:, :, None]
            T = cm.blocks.shape[1] * bs
            K = kpool[cm.blocks].view(J, T, Hkv, D)
            Vv = vpool[cm.blocks].view(J, T, Hkv, D)
            qh = qj.view(J, Qc, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(J, Hkv, Qc * G, D)
            s = torch.matmul(qh, K.permute(0, 2, 3, 1)).float() * scale  # [J, Hkv, Qc*G, T]
            s = s.view(J, Hkv, Qc, G, T)
            mask = torch.arange(T, device=q.device) < cm.limit[:, :, None]  # [J, Qc, T]
            s = s.masked_fill(~mask[:, None, :, None, :], _NEG)
            m = s.amax(-1, keepdim=True)
            p = torch.exp(s - m)
            l = p.sum(-1, keepdim=True)
            o = torch.matmul(p.view(J, Hkv, Qc * G, T).to(Vv.dtype), Vv.permute(0, 2, 1, 3)).float()
            o = o.view(J, Hkv, Qc, G, D) / l
            o = o.permute(0, 2, 1, 3, 4).reshape(J, Qc, H, D)
            lse = (m + torch.log(l)).view(J, Hkv, Qc, G).permute(0, 2, 1, 3).reshape(J, Qc, H)
            if single:
                res = q.new_zeros(N + 1, H, D, dtype=torch.float32)
                res[cm.qidx.reshape(-1)] = o.reshape(-1, H, D)
                return res[:N].reshape(N, H * D).to(q.dtype)
            out_buf[cm.qidx, cm.vslot] = o
            lse_buf[cm.qidx, cm.vslot] = lse
        M = lse_buf.amax(1, keepdim=True)
        w = torch.exp(lse_buf - M)
        o = (out_buf * w[..., None]).sum(1) / w.sum(1)[..., None]
        return o[:N].reshape(N, H * D).to(q.dtype)

    # ---- convenience -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, cache: KVCache, items: list[ForwardItem], return_hidden: bool = False, pad: bool = False):
        """Run items (eagerly); returns per-item logits `[k, vocab]` (and hidden states with `return_hidden`).

        `pad` rounds shapes up to buckets, which bounds how many kernel variants a long run compiles."""
        meta = self.build_meta(cache, items, pad=pad)
        res = self.forward_meta(cache, meta, return_hidden=return_hidden)
        logits, hid = res if return_hidden else (res, None)
        per = [logits[s:s + n] for s, n in meta.item_rows]
        if return_hidden:
            return per, [hid[s:s + n] for s, n in meta.item_rows]
        return per

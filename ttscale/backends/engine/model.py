"""Llama / Qwen2 / Qwen3 decoder forward over segments and views.

One forward takes any number of `ForwardItem`s: each appends tokens to its write segment and attends to
its views, per segment ("job", see `attn_meta`). Each job returns partial outputs with their
log-sum-exp; a query's partials over its views are merged exactly. Queries are rotated per view
(`pos - offset + rope_start`), keys never move.

`attn_meta.build_meta` turns items into index tensors (Python); `forward_meta` is pure tensor code on
fixed shapes, which is what CUDA graphs capture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ttscale.backends.engine.attn_meta import (  # noqa: F401 - re-exported: importers know them from here
    AttnMeta,
    ClassMeta,
    DecodeLayout,
    ForwardItem,
    Staging,
    bucket,
    build_meta,
)
from ttscale.backends.engine.kv_cache import KVCache
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

        def opt(name: str) -> torch.Tensor | None:
            for key in (name, "model." + name):
                if key in state:
                    return state[key].to(device=dev, dtype=dt).contiguous()
            return None

        def get(name: str) -> torch.Tensor:
            w = opt(name)
            if w is None:
                raise ConfigError(f"checkpoint lacks weight {name!r}")
            return w

        self.embed = get("embed_tokens.weight")
        lm = state.get("lm_head.weight")
        self.lm_head = self.embed if (lm is None or cfg.tie_embeddings) else lm.to(dev, dt).contiguous()
        self.norm = get("norm.weight")
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            q, k, v = (get(p + f"self_attn.{n}_proj.weight") for n in "qkv")
            bq, bk, bv = (opt(p + f"self_attn.{n}_proj.bias") for n in "qkv")
            bqkv = None
            if bq is not None:
                bqkv = torch.cat([bq, bk if bk is not None else torch.zeros_like(k[:, 0]),
                                  bv if bv is not None else torch.zeros_like(v[:, 0])])
            self.layers.append(LayerWeights(
                ln1=get(p + "input_layernorm.weight"), wqkv=torch.cat([q, k, v]).contiguous(), bqkv=bqkv,
                q_norm=get(p + "self_attn.q_norm.weight") if cfg.qk_norm else opt(p + "self_attn.q_norm.weight"),
                k_norm=get(p + "self_attn.k_norm.weight") if cfg.qk_norm else opt(p + "self_attn.k_norm.weight"),
                wo=get(p + "self_attn.o_proj.weight"), bo=opt(p + "self_attn.o_proj.bias"),
                ln2=get(p + "post_attention_layernorm.weight"),
                w_gate_up=torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]).contiguous(),
                w_down=get(p + "mlp.down_proj.weight"),
            ))
        self.inv_freq = cfg.inv_freq.to(dev)
        self._staging = Staging()
        self.seg_k: torch.Tensor | None = None
        self.seg_v: torch.Tensor | None = None
        self.kernels: Any = None  # the `kernels` module when the fused forward is on
        self.skinny: Any = None  # with it, `linear_kernels` for projections of few rows
        self.path: Path | None = None  # the checkpoint folder (`loader.load_model`)

    def use_kernels(self, on: bool = True) -> bool:
        """Switch the forward to the fused Triton kernels (default on CUDA when Triton is installed)."""
        self.kernels = self.skinny = None
        if not on:
            return False
        try:
            from ttscale.backends.engine import kernels, linear_kernels
        except ImportError:
            return False
        self.kernels, self.skinny = kernels, linear_kernels
        return True

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """`F.linear`, through the few-row kernel where the fused forward is on and it applies."""
        if self.skinny is not None and self.skinny.usable(x):
            return self.skinny.linear(x, w, b)
        return F.linear(x, w, b)

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
    def build_meta(self, cache: KVCache, items: list[ForwardItem], pad: bool = False,
                   src: list[int] | None = None, record: bool = False) -> AttnMeta:
        """Index tensors for one forward (`attn_meta.build_meta`); extends the write segments.

        With `pad`, shapes are rounded up to buckets (CUDA graphs replay one capture per shape key).
        """
        n_ids = None if self.seg_k is None else self.seg_k.shape[1] - 1
        return build_meta(cache, items, self._staging, n_ids, pad, src, record)

    def advance_meta(self, cache: KVCache, layout: DecodeLayout, tokens: list[int],
                     src: list[int] | None) -> AttnMeta | None:
        """The next decode step of a recorded layout's rows (`DecodeLayout.advance`)."""
        return layout.advance(tokens, src, self._staging, cache.pool.device)

    # ---- tensor forward -----------------------------------------------------------------------------------
    def _cos_sin(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = pos.float()[..., None] * self.inv_freq
        emb = torch.cat((f, f), -1)
        dt = self.cfg.dtype
        return (emb.cos() * self.cfg.rope_scale).to(dt), (emb.sin() * self.cfg.rope_scale).to(dt)

    def _qkv(self, li: int, L: LayerWeights, h: torch.Tensor, meta: AttnMeta
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer prologue both forwards share: Q, K, V `[N, heads, D]` of the normed input `h`, with
        Qwen3's q/k norms and the segment-id embeddings added to K and V (before RoPE)."""
        c = self.cfg
        N, H, Hkv, D = h.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        nq, nk = H * D, Hkv * D
        qkv = self._linear(h, L.wqkv, L.bqkv)
        q = qkv[:, :nq].view(N, H, D)
        k = qkv[:, nq:nq + nk].view(N, Hkv, D)
        v = qkv[:, nq + nk:].view(N, Hkv, D)
        if L.q_norm is not None and L.k_norm is not None:
            q = rms_norm(q, L.q_norm, c.rms_eps)
            k = rms_norm(k, L.k_norm, c.rms_eps)
        if self.seg_k is not None and self.seg_v is not None and meta.embed_ids is not None:
            k = k + self.seg_k[li][meta.embed_ids]
            v = v + self.seg_v[li][meta.embed_ids]
        return q, k, v

    def forward_meta(self, cache: KVCache, meta: AttnMeta, return_hidden: bool = False,
                     float_logits: bool = True):
        """Logits `[M, vocab]` for `meta.logits_idx` rows, float32 or, without `float_logits`, in the model's
        dtype (the fused sampler reads those as they are: the same values without a pass over them, which
        at 512 rows of a 152k vocabulary is a 300 MB copy per step); with `return_hidden`, also the final
        normed hidden states `[M, hidden]`."""
        if self.kernels is not None:
            return self._forward_fused(cache, meta, return_hidden, float_logits)
        c = self.cfg
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        G = H // Hkv
        pool = cache.pool
        scale = 1.0 / math.sqrt(D)
        kcos, ksin = self._cos_sin(meta.k_pos)
        kcos, ksin = kcos[:, None], ksin[:, None]
        qrot = [self._cos_sin(cm.delta) for cm in meta.classes]
        x = self.embed[meta.tokens]
        for li, L in enumerate(self.layers):
            q, k, v = self._qkv(li, L, rms_norm(x, L.ln1, c.rms_eps), meta)
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
        logits = F.linear(hid, self.lm_head)
        if float_logits:
            logits = logits.float()
        return (logits, hid) if return_hidden else logits

    def _forward_fused(self, cache: KVCache, meta: AttnMeta, return_hidden: bool, float_logits: bool):
        kn = self.kernels
        c = self.cfg
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        G = H // Hkv
        pool = cache.pool
        N = meta.tokens.shape[0]
        V = meta.vmax
        scale = 1.0 / math.sqrt(D)
        splits = [kn.attn_split(cm, G, Hkv, pool.block_size) for cm in meta.classes]
        smax = max(splits, default=1)
        # slots no job writes keep lse = _NEG, and the merge reads no output there: no zero fill needed
        out = torch.empty(N + 1, V * smax, H, D, dtype=torch.float32, device=pool.device)
        lse = torch.full((N + 1, V * smax, H), _NEG, dtype=torch.float32, device=pool.device)
        attn = torch.empty(N, H * D, dtype=c.dtype, device=pool.device)
        x = self.embed[meta.tokens]
        res: torch.Tensor | None = None  # the sublayer output not yet added to `x` (fused into the next norm)
        for li, L in enumerate(self.layers):
            q, k, v = self._qkv(li, L, kn.add_rmsnorm(x, res, L.ln1, c.rms_eps), meta)
            kn.rope_write(k, v, pool.k[li], pool.v[li], meta.write_slots, meta.k_pos, self.inv_freq,
                          c.rope_scale)
            for cm, sp in zip(meta.classes, splits, strict=True):
                kn.seg_attn(q, pool.k[li], pool.v[li], cm, self.inv_freq, out, lse, N, V, scale,
                            c.rope_scale, G, sp, smax)
            kn.merge(out, lse, attn, V * smax)
            res = self._linear(attn, L.wo, L.bo)
            h = kn.add_rmsnorm(x, res, L.ln2, c.rms_eps)
            if self.skinny is not None and self.skinny.usable(h):
                act = self.skinny.linear(h, L.w_gate_up, gated=True)
            else:
                act = kn.silu_mul(F.linear(h, L.w_gate_up))
            res = F.linear(act, L.w_down)  # cuBLAS: faster than the few-row kernel here (skinny_linear.py)
        hid = kn.add_rmsnorm(x, res, self.norm, c.rms_eps)[meta.logits_idx]
        logits = F.linear(hid, self.lm_head)
        if float_logits:
            logits = logits.float()
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
        for cm, (cos, sin) in zip(meta.classes, qrot, strict=True):
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
            denom = p.sum(-1, keepdim=True)
            o = torch.matmul(p.view(J, Hkv, Qc * G, T).to(Vv.dtype), Vv.permute(0, 2, 1, 3)).float()
            o = o.view(J, Hkv, Qc, G, D) / denom
            o = o.permute(0, 2, 1, 3, 4).reshape(J, Qc, H, D)
            lse = (m + torch.log(denom)).view(J, Hkv, Qc, G).permute(0, 2, 1, 3).reshape(J, Qc, H)
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
        if return_hidden:
            logits, hid = self.forward_meta(cache, meta, return_hidden=True)
            return [logits[s:s + n] for s, n in meta.item_rows], [hid[s:s + n] for s, n in meta.item_rows]
        logits = self.forward_meta(cache, meta)
        return [logits[s:s + n] for s, n in meta.item_rows]

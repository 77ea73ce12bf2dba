"""ParScale (arXiv 2505.10475): P parallel streams of one model, aggregated into one next-token distribution.

Checkpoint format (`qwen2_parscale`, as in the public ParScale code, `modeling_qwen2_parscale.py`):
- config.json: a Qwen2 config with `model_type: "qwen2_parscale"`, `parscale_n` (P),
  `parscale_n_tokens` (prefix length, 48) and `parscale_attn_smooth` (label smoothing eps, 0.01).
- weights: the Qwen2 weights, plus per layer `model.layers.{i}.self_attn.prefix_k` / `prefix_v`
  `[P, kv_heads, n_tokens, head_dim]` and the aggregation MLP `model.aggregate_layer.{0,2}.{weight,bias}`
  (Linear(P*hidden, hidden), SiLU, Linear(hidden, P)).

Semantics: the input is replicated P times; stream p attends to its own prefix K/V (stored without RoPE,
always visible, occupying no positions) and to its own tokens. The P final normed hidden states are
concatenated in interleaved order (`(h n)`: feature h of stream n at index h*P + n), the MLP gives P
weights by softmax, smoothed `w*(1-eps) + eps/P`, and the weighted sum goes through the one LM head.

On the engine each stream is one `Sequence` whose first view is a frozen prefix segment
(`KVCache.segment_from_kv`), so KV memory grows P x; one `model.forward` runs all P streams together.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ttscale.backends.base import BackendBase, Capabilities, DeltaStream
from ttscale.backends.engine.kv_cache import KVCache, Segment, Sequence, View
from ttscale.backends.engine.model import ForwardItem, Model, ModelConfig
from ttscale.errors import ConfigError
from ttscale.types import Delta, GenerationRequest, StrictModel

PARSCALE_FIELDS = ("parscale_n", "parscale_n_tokens", "parscale_attn_smooth")


@dataclass
class ParScaleWeights:
    """The ParScale-only parameters: prefixes `[layers, P, tokens, kv_heads, head_dim]` and the aggregator."""

    n: int
    n_tokens: int
    smooth: float
    prefix_k: torch.Tensor | None = None
    prefix_v: torch.Tensor | None = None
    agg: list[torch.Tensor] = field(default_factory=list)  # w0 [H, P*H], b0 [H], w2 [P, H], b2 [P]


class ParScaleModel:
    """A base `Model` plus ParScale prefixes and aggregation; runs P streams over a `KVCache`."""

    def __init__(self, model: Model, ps: ParScaleWeights) -> None:
        if ps.n < 1:
            raise ConfigError(f"parscale_n must be >= 1 (got {ps.n})")
        if ps.n > 1 and (ps.prefix_k is None or len(ps.agg) != 4):
            raise ConfigError("a ParScale model with parscale_n > 1 needs prefix_k/prefix_v and aggregate_layer")
        self.model, self.ps = model, ps
        self.cfg: ModelConfig = model.cfg
        self.P = ps.n
        self.path: Path | None = None  # the checkpoint folder, when loaded from one

    @property
    def lm_head(self) -> torch.Tensor:
        """The base model's output head (`Model` types it optional; a loaded model always has one)."""
        head = self.model.lm_head
        assert head is not None
        return head

    # ---- loading ---------------------------------------------------------------------------------------
    @classmethod
    def from_state(cls, cfg: ModelConfig, state: dict[str, torch.Tensor], n: int, n_tokens: int,
                   smooth: float) -> ParScaleModel:
        base = Model(cfg, state)
        ps = ParScaleWeights(n=n, n_tokens=n_tokens, smooth=smooth)
        if n > 1:
            ks, vs = [], []
            for i in range(cfg.num_layers):
                k = _get(state, f"layers.{i}.self_attn.prefix_k")
                v = _get(state, f"layers.{i}.self_attn.prefix_v")
                want = (n, cfg.num_kv_heads, n_tokens, cfg.head_dim)
                if tuple(k.shape) != want or tuple(v.shape) != want:
                    raise ConfigError(f"layer {i} prefix_k/prefix_v shape {tuple(k.shape)}, expected {want}")
                ks.append(k.permute(0, 2, 1, 3))
                vs.append(v.permute(0, 2, 1, 3))
            dev, dt = cfg.device, cfg.dtype
            ps.prefix_k = torch.stack(ks).to(dev, dt)  # [L, P, T, kv, hd]
            ps.prefix_v = torch.stack(vs).to(dev, dt)
            ps.agg = [_get(state, f"aggregate_layer.{j}").to(dev, dt) for j in
                      ("0.weight", "0.bias", "2.weight", "2.bias")]
            if tuple(ps.agg[0].shape) != (cfg.hidden_size, n * cfg.hidden_size) or ps.agg[2].shape[0] != n:
                raise ConfigError("aggregate_layer shapes do not match parscale_n and hidden_size")
        return cls(base, ps)

    # ---- streams ---------------------------------------------------------------------------------------
    def prefix_segments(self, cache: KVCache) -> list[Segment | None]:
        """One frozen prefix segment per stream (None per stream when P == 1 or no prefix tokens)."""
        pk, pv = self.ps.prefix_k, self.ps.prefix_v
        if self.P == 1 or self.ps.n_tokens == 0 or pk is None or pv is None:
            return [None] * self.P
        return [cache.segment_from_kv(pk[:, p], pv[:, p]) for p in range(self.P)]

    def new_streams(self, cache: KVCache, prefixes: list[Segment | None] | None = None) -> list[Sequence]:
        """P sequences, each viewing its prefix (positions start at 0 after it) and a fresh write segment."""
        own = prefixes is None
        segments = self.prefix_segments(cache) if prefixes is None else prefixes
        out = []
        for seg in segments:
            out.append(Sequence.new(cache, [View(seg, 0)] if seg is not None else [], offset=0))
            if own and seg is not None:
                seg.release()  # the sequence holds it now
        return out

    def aggregate(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[P, k, H]` final normed states of the P streams -> `[k, H]` weighted sum (see module doc)."""
        P = self.P
        if P == 1:
            return hidden[0]
        k, H = hidden.shape[1], hidden.shape[2]
        inter = hidden.permute(1, 2, 0).reshape(k, H * P)  # (h n) interleaved
        w0, b0, w2, b2 = self.ps.agg
        w = torch.softmax(F.linear(F.silu(F.linear(inter, w0, b0)), w2, b2).float(), -1)
        if self.ps.smooth:
            w = w * (1 - self.ps.smooth) + self.ps.smooth / P
        return (hidden.float() * w.t()[:, :, None]).sum(0).to(hidden.dtype)

    @torch.inference_mode()
    def forward(self, cache: KVCache, streams: list[Sequence], tokens: Seq[int],
                logits: Literal["last", "all", "none"] = "last") -> torch.Tensor:
        """Append `tokens` to every stream and return the aggregated logits `[k, vocab]` (float32)."""
        if len(streams) != self.P:
            raise ConfigError(f"expected {self.P} streams, got {len(streams)}")
        items = [ForwardItem(s.views, list(tokens), logits=logits) for s in streams]
        _, hid = self.model.forward(cache, items, return_hidden=True, pad=self.cfg.device.type == "cuda")
        agg = self.aggregate(torch.stack(hid))
        return F.linear(agg, self.lm_head).float()

    def graph_runner(self, cache: KVCache):
        """A CUDA-graph runner for decode steps on `cache`: the P streams' forward, the aggregation and the
        sampling of one token are captured together (one graph per shape key, reused across requests)."""
        from ttscale.backends.engine.cuda_graphs import GraphRunner
        from ttscale.backends.engine.sampler import sample

        def step(meta, st, filtered: bool, n_top: int):
            _, hid = self.model.forward_meta(cache, meta, return_hidden=True)
            agg = self.aggregate(hid[:self.P, None])
            return sample(F.linear(agg, self.lm_head).float(), st, filtered, n_top)

        return GraphRunner(self.model, cache, step=step)

    # ---- generation --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, cache: KVCache, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_ids: Iterable[int] = (),
                 on_token=None, should_stop=None, graphs=None) -> dict[str, Any]:
        """Decode from the aggregate distribution (sampling on device). Returns tokens, logprobs, reason.

        `graphs` (from `graph_runner(cache)`) replays decode steps as CUDA graphs; the prefill stays eager."""
        from ttscale.backends.engine.sampler import SamplingTensors, sample

        if graphs is not None and graphs.cache is not cache:
            raise ConfigError("the graph runner must capture on the same KV cache generate writes")
        streams = self.new_streams(cache)
        stop = set(stop_ids)
        toks: list[int] = []
        lps: list[float] = []
        reason = "length"
        try:
            filtered = top_p < 1.0 or top_k > 0
            st = SamplingTensors.build([(temperature, top_p, top_k, seed, 0)], 1, self.cfg.device)
            tok, lp, _, _ = sample(self.forward(cache, streams, prompt_ids), st, filtered, 0)
            tok_ids, tok_lps = tok.tolist(), lp.tolist()
            for t in range(max_tokens):
                tid, lpf = int(tok_ids[0]), float(tok_lps[0])
                if tid in stop:
                    reason = "stop"
                    break
                toks.append(tid)
                lps.append(lpf)
                if on_token is not None:
                    on_token(tid, lpf)
                if should_stop is not None and should_stop():
                    reason = "abort"
                    break
                if t + 1 == max_tokens:
                    break
                st = SamplingTensors.build([(temperature, top_p, top_k, seed, t + 1)], 1, self.cfg.device)
                if graphs is not None:
                    items = [ForwardItem(s.views, [tid]) for s in streams]
                    meta = self.model.build_meta(cache, items, pad=True)
                    tok, lp, _, _ = graphs.run(meta, st, filtered, 0)
                else:
                    tok, lp, _, _ = sample(self.forward(cache, streams, [tid]), st, filtered, 0)
                tok_ids, tok_lps = tok.tolist(), lp.tolist()
        finally:
            for s in streams:
                s.release()
        return {"token_ids": toks, "logprobs": lps, "finish_reason": reason}


def _get(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    for key in ("model." + name, name):
        if key in state:
            return state[key]
    raise ConfigError(f"ParScale checkpoint lacks weight {name!r}")


def is_parscale_folder(folder: str | Path) -> bool:
    p = Path(folder) / "config.json"
    return p.exists() and json.loads(p.read_text()).get("model_type") == "qwen2_parscale"


def parscale_hf_config(raw: dict[str, Any]):
    """(transformers Qwen2Config of the base model, P, n_tokens, smooth) from a qwen2_parscale config dict."""
    from transformers import Qwen2Config

    if raw.get("model_type") != "qwen2_parscale":
        raise ConfigError(f"not a qwen2_parscale config (model_type={raw.get('model_type')!r})")
    base = {k: v for k, v in raw.items() if k not in PARSCALE_FIELDS and k not in (
        "model_type", "architectures", "auto_map", "transformers_version")}
    base.setdefault("use_sliding_window", False)
    n = int(raw.get("parscale_n", 1))
    return (Qwen2Config(**base), n, int(raw.get("parscale_n_tokens", 48)),
            float(raw.get("parscale_attn_smooth", 0.01)))


def load_parscale(folder: str | Path, dtype: str | torch.dtype | None = None, device=None) -> ParScaleModel:
    """Load a `qwen2_parscale` folder (config.json + *.safetensors)."""
    from ttscale.backends.engine.loader import read_safetensors, resolve_device, resolve_dtype

    folder = Path(folder)
    if not is_parscale_folder(folder):
        raise ConfigError(f"{folder} is not a qwen2_parscale checkpoint (config.json model_type)")
    hf, n, n_tokens, smooth = parscale_hf_config(json.loads((folder / "config.json").read_text()))
    dev = resolve_device(device)
    cfg = ModelConfig.from_hf(hf, resolve_dtype(dtype, dev), dev)
    m = ParScaleModel.from_state(cfg, read_safetensors(folder), n, n_tokens, smooth)
    m.path = folder
    return m


def random_parscale_state(hf_config, n: int, n_tokens: int, seed: int = 0, std: float = 0.5,
                          base_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Random ParScale parameters (prefixes, aggregator) added to a base Qwen2 state dict."""
    g = torch.Generator().manual_seed(seed)
    c = hf_config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    state = dict(base_state or {})
    if n > 1:
        for i in range(c.num_hidden_layers):
            for name in ("prefix_k", "prefix_v"):
                state[f"model.layers.{i}.self_attn.{name}"] = torch.randn(
                    n, c.num_key_value_heads, n_tokens, hd, generator=g) * std
        H = c.hidden_size
        state["model.aggregate_layer.0.weight"] = torch.randn(H, n * H, generator=g) / (n * H) ** 0.5
        state["model.aggregate_layer.0.bias"] = torch.randn(H, generator=g) * 0.1
        state["model.aggregate_layer.2.weight"] = torch.randn(n, H, generator=g) / H ** 0.5 * 4
        state["model.aggregate_layer.2.bias"] = torch.randn(n, generator=g) * 0.1
    return state


def write_parscale_checkpoint(folder: str | Path, hf_model, n: int, n_tokens: int = 48, smooth: float = 0.01,
                              seed: int = 0) -> Path:
    """Save a transformers Qwen2 model plus random ParScale parameters as a `qwen2_parscale` folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = {k: v.detach().contiguous() for k, v in hf_model.state_dict().items()}
    if getattr(hf_model.config, "tie_word_embeddings", False):
        base.pop("lm_head.weight", None)
    state = random_parscale_state(hf_model.config, n, n_tokens, seed=seed, base_state=base)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    raw = hf_model.config.to_dict()
    raw.update(model_type="qwen2_parscale", architectures=["Qwen2ParScaleForCausalLM"], parscale_n=n,
               parscale_n_tokens=n_tokens, parscale_attn_smooth=smooth)
    (folder / "config.json").write_text(json.dumps(raw, indent=2, default=str))
    return folder


# ---- backend -----------------------------------------------------------------------------------------------


class ParScaleBackendConfig(StrictModel):
    model: str
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_blocks: int = 4096
    tokenizer: str | None = None


class ParScaleBackend(BackendBase):
    """A backend that samples from a ParScale model's aggregated distribution (`parallel_streams`).

    One request at a time on a background thread (the P streams are the parallelism); cancelling the
    consumer stops the decode loop at its next token. `ended` holds how recent requests ended, (request
    id, finish reason, tokens decoded), in the order their loops stopped, also for requests whose consumer
    had gone (that is where an abort shows).
    """

    name = "parscale"

    def __init__(self, config: ParScaleBackendConfig | None = None, *, model: ParScaleModel | None = None,
                 tokenizer=None, **kw: Any) -> None:
        if config is None:
            kw.setdefault("model", str(model.path) if model is not None and model.path is not None else "in-memory")
            config = ParScaleBackendConfig(**kw)
        self.config = c = config
        self.model = model or load_parscale(c.model, c.dtype, c.device)
        if tokenizer is None:
            from ttscale.backends.engine.loader import load_tokenizer

            tokenizer = load_tokenizer(c.tokenizer or c.model)
        self.tokenizer = tokenizer
        self.cache = KVCache.for_model(self.model.cfg, num_blocks=c.num_blocks, block_size=c.block_size)
        self.graphs = self.model.graph_runner(self.cache) if self.model.cfg.device.type == "cuda" else None
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.ended: deque[tuple[str, str, int]] = deque(maxlen=256)
        self.capabilities = Capabilities(
            streaming=True, abort=True, token_ids=True, tokenize=True, parallel_streams=True,
            chat=getattr(tokenizer, "chat_template", None) is not None, max_context=self.model.cfg.max_position,
        )

    @classmethod
    def from_spec(cls, rest: str, **opts: Any) -> ParScaleBackend:
        return cls(ParScaleBackendConfig(model=rest, **opts))

    def _ids_of(self, req: GenerationRequest) -> list[int]:
        if req.prompt_token_ids is not None:
            return list(req.prompt_token_ids)
        if req.messages is not None:
            text = self.tokenizer.apply_chat_template(
                req.messages, tokenize=False, add_generation_prompt=not req.continue_final_message,
                continue_final_message=req.continue_final_message)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(req.prompt)

    async def generate(self, request: GenerationRequest) -> DeltaStream:
        ids = self._ids_of(request)
        s = request.sampling
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        stop_flag = threading.Event()
        eos = (set() if s.ignore_eos else set(self.model.cfg.eos_token_ids)) | set(s.stop_token_ids)
        rid = request.request_id

        def on_token(t: int, lp: float) -> None:
            loop.call_soon_threadsafe(q.put_nowait, ("tok", t, lp))

        def work() -> None:
            try:
                with self._lock:
                    res = self.model.generate(
                        self.cache, ids, s.max_tokens, s.temperature, s.top_p, s.top_k,
                        s.seed if s.seed is not None else next(self._ids), eos, on_token, stop_flag.is_set,
                        graphs=self.graphs)
                self.ended.append((rid, res["finish_reason"], len(res["token_ids"])))
                loop.call_soon_threadsafe(q.put_nowait, ("end", res["finish_reason"], None))
            except Exception as e:  # noqa: BLE001 - reported as an error delta
                loop.call_soon_threadsafe(q.put_nowait, ("err", f"{type(e).__name__}: {e}", None))

        thread = threading.Thread(target=work, daemon=True, name=f"parscale-{rid}")
        thread.start()
        done = False
        toks: list[int] = []
        emitted = ""
        first = True
        try:
            while True:
                kind, a, b = await q.get()
                if kind == "tok":
                    toks.append(a)
                    text = self.tokenizer.decode(toks, skip_special_tokens=True)
                    new, emitted = text[len(emitted):], text
                    yield Delta(request_id=rid, text=new, token_ids=[a], logprobs=[b],
                                prompt_tokens=len(ids) if first else None)
                    first = False
                elif kind == "end":
                    done = True
                    stop_texts = [x for x in s.stop if x in emitted]
                    yield Delta(request_id=rid, finished=True, finish_reason="stop" if stop_texts else a,
                                prompt_tokens=len(ids) if first else None)
                    return
                else:
                    done = True
                    yield Delta(request_id=rid, finished=True, finish_reason="error", error=a)
                    return
        finally:
            if not done:
                stop_flag.set()

    async def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

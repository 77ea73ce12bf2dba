"""ParScale: a tiny random `qwen2_parscale` checkpoint loads and matches a reference forward written from
the paper's equations; KV use grows P x; the backend samples from the aggregate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures.native import attend_and_mlp, byte_decode, byte_encode, rope, tiny_hf
from ttscale.backends.engine.kv_cache import KVCache
from ttscale.backends.engine.parscale_model import load_parscale, write_parscale_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    hf = tiny_hf("qwen2", layers=2, seed=21)
    out = {}
    for n in (1, 4):
        out[n] = write_parscale_checkpoint(tmp_path_factory.mktemp(f"parscale{n}"), hf, n=n, n_tokens=48, seed=n)
    return hf, out


def reference(hf, folder, tokens: list[int]) -> torch.Tensor:
    """Replicate the input P times; stream p prepends its prefix K/V (no RoPE) in every layer; final norm;
    interleaved concat -> MLP -> softmax -> label smoothing -> weighted sum -> LM head."""
    import json

    from safetensors.torch import load_file

    raw = json.loads((folder / "config.json").read_text())
    P, eps = raw["parscale_n"], raw["parscale_attn_smooth"]
    st = load_file(str(folder / "model.safetensors"))
    c = hf.config
    H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, 16
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    N = len(tokens)
    pos = torch.arange(N)
    m = hf.model
    finals = []
    with torch.no_grad():
        for p in range(P):
            x = m.embed_tokens(torch.tensor(tokens))
            for li, layer in enumerate(m.layers):
                a = layer.self_attn
                h = layer.input_layernorm(x)
                q = rope(a.q_proj(h).view(N, H, D), pos, theta)
                k = rope(a.k_proj(h).view(N, Hkv, D), pos, theta)
                v = a.v_proj(h).view(N, Hkv, D)
                mask = torch.tril(torch.ones(N, N, dtype=torch.bool))
                if P > 1:
                    pk = st[f"model.layers.{li}.self_attn.prefix_k"][p].permute(1, 0, 2)  # [T, kv, D]
                    pv = st[f"model.layers.{li}.self_attn.prefix_v"][p].permute(1, 0, 2)
                    k, v = torch.cat([pk, k]), torch.cat([pv, v])
                    mask = torch.cat([torch.ones(N, pk.shape[0], dtype=torch.bool), mask], 1)
                x = attend_and_mlp(layer, x, q, k, v, mask)
            finals.append(m.norm(x))
        if P == 1:
            agg = finals[0]
        else:
            inter = torch.stack(finals, -1).reshape(N, -1)  # [N, H*P], feature h of stream n at h*P+n
            z = F.linear(F.silu(F.linear(inter, st["model.aggregate_layer.0.weight"],
                                         st["model.aggregate_layer.0.bias"])),
                         st["model.aggregate_layer.2.weight"], st["model.aggregate_layer.2.bias"])
            w = torch.softmax(z, -1) * (1 - eps) + eps / P
            agg = sum(w[:, i:i + 1] * finals[i] for i in range(P))
        return hf.lm_head(agg).float()


@pytest.mark.parametrize("P", [1, 4])
def test_logits_match_reference_and_kv_grows(ckpts, P):
    hf, folders = ckpts
    model = load_parscale(folders[P], dtype="float32", device="cpu")
    assert model.P == P and model.ps.n_tokens == 48
    cache = KVCache.for_model(model.cfg, num_blocks=64, block_size=16)
    toks = byte_encode("ParScale runs P streams.")  # 24 tokens
    streams = model.new_streams(cache)
    got = model.forward(cache, streams, toks, logits="all")
    torch.testing.assert_close(got, reference(hf, folders[P], toks), atol=1e-4, rtol=1e-4)
    prefix_blocks = 48 // 16 if P > 1 else 0
    scratch = 1  # the block the cache keeps aside for padding tokens
    assert cache.pool.num_used - scratch == P * (prefix_blocks + math.ceil(len(toks) / 16))
    nxt = model.forward(cache, streams, [ord("x")])  # decoding step over the same streams
    torch.testing.assert_close(nxt[0], reference(hf, folders[P], toks + [ord("x")])[-1], atol=1e-4, rtol=1e-4)
    for s in streams:
        s.release()
    assert cache.pool.num_used == scratch


def test_aggregation_weights_are_smoothed(ckpts):
    _, folders = ckpts
    model = load_parscale(folders[4], dtype="float32", device="cpu")
    h = torch.randn(4, 3, model.cfg.hidden_size)
    out = model.aggregate(h)
    assert out.shape == (3, model.cfg.hidden_size)
    # the weighted sum lies in the convex hull: each weight >= eps/P
    lo = torch.minimum(torch.minimum(h[0], h[1]), torch.minimum(h[2], h[3]))
    hi = torch.maximum(torch.maximum(h[0], h[1]), torch.maximum(h[2], h[3]))
    assert bool(((out >= lo - 1e-5) & (out <= hi + 1e-5)).all())


def test_bad_checkpoint_is_named(tmp_path, ckpts):
    import json

    from ttscale.errors import ConfigError

    with pytest.raises(ConfigError, match="qwen2_parscale"):
        load_parscale(tmp_path)
    _, folders = ckpts
    raw = json.loads((folders[4] / "config.json").read_text())
    raw["parscale_n_tokens"] = 32
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").write_bytes((folders[4] / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="prefix_k"):
        load_parscale(tmp_path, dtype="float32", device="cpu")


class ByteTok:
    """The byte tokenizer of the tiny models (token id = byte)."""

    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return byte_encode(text)

    def decode(self, ids, skip_special_tokens=True):
        return byte_decode(ids)


async def test_backend_and_strategy_sample_from_the_aggregate(ckpts):
    from ttscale.backends.engine.parscale_model import ParScaleBackend
    from ttscale.controller import Context
    from ttscale.strategies.registry import make_strategy
    from ttscale.types import Problem

    _, folders = ckpts
    model = load_parscale(folders[4], dtype="float32", device="cpu")
    be = ParScaleBackend(model=model, tokenizer=ByteTok())
    assert be.capabilities.parallel_streams
    strat = make_strategy("parscale:max_tokens=6,temperature=0")
    ctx = Context(be)
    res = await strat.run(Problem(prompt="2+2?"), ctx)
    assert res.traces and res.traces[0].num_tokens == 6
    # each aggregate token is P=4 stream forwards: counted 4x, the aggregate's own count kept apart
    assert res.decision["streams"] == 4 and res.decision["aggregate_tokens"] == 6
    assert res.usage.generated_tokens == 4 * 6 and res.usage.sequential_tokens == 6
    assert res.usage.prompt_tokens == 4 * res.decision["aggregate_prompt_tokens"] > 0
    # greedy from the aggregate == argmax of the aggregated logits, token by token
    cache = KVCache.for_model(model.cfg, num_blocks=64)
    streams = model.new_streams(cache)
    ids = res.traces[0].token_ids
    (branch,) = ctx.branches.values()
    prompt = byte_encode(branch.request.prompt)
    assert "2+2?" in branch.request.prompt
    lg = model.forward(cache, streams, prompt)
    for t in ids:
        assert int(lg[-1].argmax()) == t
        lg = model.forward(cache, streams, [t])


async def test_total_token_budget_counts_every_stream(ckpts):
    """P=4: each aggregate token costs 4 stream tokens, so a budget of 12 allows 3 aggregate tokens."""
    from ttscale.backends.engine.parscale_model import ParScaleBackend
    from ttscale.budget import Budget
    from ttscale.controller import Context
    from ttscale.strategies.registry import make_strategy
    from ttscale.types import Problem

    _, folders = ckpts
    be = ParScaleBackend(model=load_parscale(folders[4], dtype="float32", device="cpu"), tokenizer=ByteTok())
    res = await make_strategy("parscale:max_tokens=50,temperature=1.0,seed=1").run(
        Problem(prompt="2+2?"), Context(be, budget=Budget(total_tokens=12)))
    assert res.decision["aggregate_tokens"] <= 3 and res.usage.generated_tokens <= 12


async def test_cancel_stops_the_decode_loop(ckpts):
    """Cancelled after its first token, a sample's decode loop stops at its next token (`ended` records
    it): the next request, which waits for the model, sees an abort far short of max_tokens."""
    from ttscale.backends.engine.parscale_model import ParScaleBackend
    from ttscale.controller import Context
    from ttscale.types import GenerationRequest, SamplingSpec

    _, folders = ckpts
    be = ParScaleBackend(model=load_parscale(folders[4], dtype="float32", device="cpu"), tokenizer=ByteTok())
    ctx = Context(be)
    most = be.model.cfg.max_position - 8
    (b,) = ctx.spawn(GenerationRequest(request_id="a", prompt="2+2?"), 1,
                     SamplingSpec(max_tokens=most, temperature=1.0, seed=1, ignore_eos=True))
    async for ev in ctx.watch([b]):
        if ev.kind == "delta":
            break
    assert not b.done, b.error
    ctx.cancel(b)
    (nxt,) = ctx.spawn(GenerationRequest(request_id="b", prompt="3+3?"), 1, SamplingSpec(max_tokens=1, ignore_eos=True))
    await ctx.wait_all([b, nxt])
    ended = {rid: (reason, n) for rid, reason, n in be.ended}
    reason, n = ended[b.request.request_id]
    assert reason == "abort" and n < most
    assert ended[nxt.request.request_id][0] == "length"
    await ctx.aclose()

"""ParaThinker native mode: the summary over merged path KV equals a forward over the concatenated
sequence with ParaThinker's positions, segment ids and mask, written here from the paper's equations."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.native import attend_and_mlp, byte_encode, rope, tiny_hf
from ttscale.backends.engine.loader import model_from_hf
from ttscale.backends.engine.native import ParaThinkerSpec, SamplingRow, parathinker_run

THINK = [250, 251, 252]  # <think1..3> in the tiny vocabulary
SUMMARY = 254


def reference(hf, tokens, pos, seg, allowed, seg_k, seg_v) -> torch.Tensor:
    """Logits of a Qwen2 forward where layer l adds seg_k[l, s] / seg_v[l, s] to K / V before RoPE."""
    c = hf.config
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // H
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    m = hf.model
    N = len(tokens)
    with torch.no_grad():
        x = m.embed_tokens(torch.tensor(tokens))
        for li, layer in enumerate(m.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(N, H, D)
            k = (a.k_proj(h) + seg_k[li][seg]).view(N, Hkv, D)
            v = (a.v_proj(h) + seg_v[li][seg]).view(N, Hkv, D)
            x = attend_and_mlp(layer, x, rope(q, pos, theta), rope(k, pos, theta), v, allowed)
        return hf.lm_head(m.norm(x)).float()


@pytest.fixture(scope="module")
def pt_pair():
    hf = tiny_hf("qwen2", layers=2, seed=11)
    model = model_from_hf(hf, dtype="float32")
    g = torch.Generator().manual_seed(5)
    kv = hf.config.num_key_value_heads * 16
    seg_k = torch.randn(2, 4, kv, generator=g)
    seg_v = torch.randn(2, 4, kv, generator=g)
    model.set_segment_embeddings(seg_k, seg_v)
    return hf, model, seg_k, seg_v


def test_summary_over_merged_path_kv_matches_reference(pt_pair):
    hf, model, seg_k, seg_v = pt_pair
    prompt = byte_encode("Q: 7*6?")
    prefix = [SUMMARY] + byte_encode(" The final answer is")
    seen = []
    calls = []
    orig = model.forward

    def counting(cache, items, **kw):
        calls.append(sum(len(it.tokens) for it in items))
        return orig(cache, items, **kw)

    model.forward = counting
    try:
        spec = ParaThinkerSpec(prompt_ids=prompt, paths=3, path_starts=[[t] for t in THINK], summary_prefix=prefix,
                               max_think=12, max_summary=4, finish_share=1.0,
                               end_ids=list(range(30)), sampling=SamplingRow(1.0, 1.0, 0, 3))
        out = parathinker_run(model, spec, on_summary=lambda cur, lg: seen.append((cur, lg)))
    finally:
        del model.forward
    L = len(prompt)
    paths = out.path_tokens
    assert all(p[0] == THINK[i] for i, p in enumerate(paths))
    assert len({len(p) for p in paths}) > 1, "paths of different lengths exercise the summary offset"
    summary = prefix + out.summary_tokens
    # No re-prefill: the summary stage fed only its own tokens through the model.
    summary_calls = calls[-out.summary_forwards:]
    assert sum(summary_calls) == len(summary) == out.written["summary"]
    assert sum(calls) == L + sum(len(p) for p in paths) + len(summary)
    assert out.written["think"] == sum(len(p) for p in paths)

    tokens, pos, seg, owner = list(prompt), list(range(L)), [0] * L, [0] * L
    for i, p in enumerate(paths):
        tokens += p
        pos += list(range(L, L + len(p)))
        seg += [i + 1] * len(p)
        owner += [i + 1] * len(p)
    off = L + max(len(p) for p in paths)
    assert out.summary_offset == off
    tokens += summary
    pos += list(range(off, off + len(summary)))
    seg += [0] * len(summary)
    owner += [-1] * len(summary)
    N = len(tokens)
    allowed = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        for j in range(i + 1):
            oi, oj = owner[i], owner[j]
            allowed[i, j] = oj == 0 or oi == -1 or oi == oj
    ref = reference(hf, tokens, torch.tensor(pos), torch.tensor(seg), allowed, seg_k, seg_v)
    got = torch.cat([lg for _, lg in seen])
    start = N - len(summary)
    torch.testing.assert_close(got, ref[start:start + got.shape[0]], atol=1e-4, rtol=1e-4)
    # and the paths' own last logits are not what the summary sees: the merge really mixes the paths
    assert not torch.allclose(ref[start], ref[L + len(paths[0]) - 1], atol=1e-3)


def test_think_stage_ends_at_finish_share(pt_pair):
    _, model, _, _ = pt_pair
    spec = ParaThinkerSpec(prompt_ids=byte_encode("Q?"), paths=3, path_starts=[[t] for t in THINK],
                           summary_prefix=[SUMMARY], max_think=50, max_summary=2, finish_share=0.6,
                           end_ids=list(range(40)), sampling=SamplingRow(1.0, 1.0, 0, 1))
    out = parathinker_run(model, spec)
    assert sum(out.path_finished) >= 2
    assert out.think_forwards < 50


def test_bad_config_is_named(pt_pair):
    from ttscale.errors import ConfigError

    _, model, _, _ = pt_pair
    with pytest.raises(ConfigError, match="finish_share"):
        parathinker_run(model, ParaThinkerSpec(prompt_ids=[1], finish_share=0, summary_prefix=[1]))
    with pytest.raises(ConfigError, match="forced start"):
        parathinker_run(model, ParaThinkerSpec(prompt_ids=[1], paths=2, summary_prefix=[1]))

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
        spec = ParaThinkerSpec(prompt_ids=prompt, paths=3, path_starts=[[t] for t in THINK],
                               summary_prefix=prefix, max_think=12, max_summary=4, finish_share=1.0,
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


# ---------------------------------------------------------------------------------- the authors' checkpoint

CONTROL = [f"<{c}think{i}>" for i in (1, 2, 3) for c in ("", "/")] + ["<summary>", "</summary>"]
MAX_SEGMENTS = 32  # the fork's default `max_segments`


def _authors_checkpoint(root, with_embeddings: bool):
    """A tiny random Qwen2 in the ParaThinker layout: SmolLM2 tokenizer plus the control tokens, and (when
    asked) `model.layers.N.self_attn.seg_embeddings.weight [32, head_dim]` in a safetensors file of its own.
    Both variants have byte-identical base weights (same seed)."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from ttscale.models import default_tokenizer_dir
    from ttscale.testing import build_tiny_model

    tok_dir = root / "tok"
    if not tok_dir.exists():
        tok = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
        tok.add_special_tokens({"additional_special_tokens": CONTROL})
        tok.save_pretrained(str(tok_dir))
    folder = build_tiny_model(root / ("with" if with_embeddings else "without"), "qwen2", seed=6,
                              tokenizer_dir=tok_dir, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16)
    if with_embeddings and not (folder / "seg_embeddings.safetensors").exists():
        c = json.loads((folder / "config.json").read_text())
        g = torch.Generator().manual_seed(9)
        seg = {f"model.layers.{i}.self_attn.seg_embeddings.weight":
               torch.randn(MAX_SEGMENTS, c["head_dim"], generator=g) for i in range(c["num_hidden_layers"])}
        save_file(seg, str(folder / "seg_embeddings.safetensors"))
    return folder


@pytest.fixture(scope="module")
def authors_pair(tmp_path_factory):
    """(folder with seg_embeddings, folder without) of the same tiny model."""
    root = tmp_path_factory.mktemp("parathinker-ckpt")
    return _authors_checkpoint(root, True), _authors_checkpoint(root, False)


def _path_logits(model, prompt: list[int], path: list[int], path_id: int) -> torch.Tensor:
    """Logits of `path` written as ParaThinker path `path_id` after `prompt` (segment ids 0 and path_id)."""
    from ttscale.backends.engine.kv_cache import KVCache, View
    from ttscale.backends.engine.model import ForwardItem

    cache = KVCache.for_model(model.cfg, num_blocks=32)
    p = cache.new_segment(embed_id=0)
    model.forward(cache, [ForwardItem([View(p, 0)], prompt, logits="none")])
    s = cache.new_segment(embed_id=path_id)
    item = ForwardItem([View(p, 0), View(s, len(prompt))], path, write=s, logits="all")
    [lg] = model.forward(cache, [item])
    return lg


def test_authors_checkpoint_loads_and_changes_the_logits(authors_pair):
    """`seg_embeddings` [32, head_dim] per layer load, broadcast over the KV heads and added to K and V before
    RoPE: logits equal a plain-torch Qwen2 forward that does exactly that, and differ from the same weights
    without them."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from ttscale.backends.engine.loader import load_model

    with_emb, without = authors_pair
    model = load_model(with_emb, dtype="float32", device="cpu")
    plain = load_model(without, dtype="float32", device="cpu")
    assert model.thought_embeddings and model.seg_k is not None
    assert not plain.thought_embeddings and plain.seg_k is None
    prompt, path = [5, 17, 230, 99, 4, 61], [301, 8, 77, 1024, 12]
    got = _path_logits(model, prompt, path, path_id=2)
    assert not torch.allclose(got, _path_logits(plain, prompt, path, path_id=2), atol=1e-3)
    other_id = _path_logits(model, prompt, path, path_id=1)
    assert not torch.allclose(got, other_id, atol=1e-3), "the embedding row is the path's own"

    hf = AutoModelForCausalLM.from_pretrained(str(without), torch_dtype=torch.float32).eval()
    with safe_open(str(with_emb / "seg_embeddings.safetensors"), framework="pt") as h:
        rows = torch.stack([h.get_tensor(f"model.layers.{i}.self_attn.seg_embeddings.weight")
                            for i in range(hf.config.num_hidden_layers)])
    per_head = rows.repeat(1, 1, hf.config.num_key_value_heads)  # one row, every KV head
    L = len(prompt)
    tokens = prompt + path
    pos = torch.tensor(list(range(L)) + list(range(L, L + len(path))))
    seg = torch.tensor([0] * L + [2] * len(path))
    allowed = torch.tril(torch.ones(len(tokens), len(tokens), dtype=torch.bool))
    ref = reference(hf, tokens, pos, seg, allowed, per_head, per_head)
    torch.testing.assert_close(got, ref[L:], atol=1e-4, rtol=1e-4)


def test_partial_or_misshapen_embeddings_are_refused():
    from ttscale.backends.engine.loader import pop_segment_embeddings
    from ttscale.errors import ConfigError

    key = "model.layers.{}.self_attn.seg_embeddings.weight"
    with pytest.raises(ConfigError, match=r"layers \[1\]"):
        pop_segment_embeddings({key.format(0): torch.zeros(32, 16)}, num_layers=2, head_dim=16)
    with pytest.raises(ConfigError, match="head_dim=16"):
        pop_segment_embeddings({key.format(0): torch.zeros(32, 8)}, num_layers=1, head_dim=16)
    state = {key.format(0): torch.ones(32, 16), "model.norm.weight": torch.ones(16)}
    assert pop_segment_embeddings(state, num_layers=1, head_dim=16).shape == (1, 32, 16)
    assert list(state) == ["model.norm.weight"]  # taken out: the model never sees an unknown key


def test_paths_end_on_their_own_end_token_and_ignore_eos(pt_pair):
    """A path that samples any stop token writes its own </think_i> instead and stops; EOS (not a stop
    token) is an ordinary token inside a path; start tokens are never sampled inside a path."""
    _, model, _, _ = pt_pair
    ends = [240, 241, 242]
    stops = list(range(100, 160))  # about one draw in four: paths end at different steps
    eos = 10
    spec = ParaThinkerSpec(prompt_ids=byte_encode("Q: 1+1?"), paths=3, path_starts=[[t] for t in THINK],
                           path_ends=ends, summary_prefix=[SUMMARY], max_think=40, max_summary=2,
                           finish_share=1.0,
                           end_ids=stops, summary_end_ids=[eos], path_banned=THINK + [SUMMARY],
                           sampling=SamplingRow(1.5, 1.0, 0, 4))
    out = parathinker_run(model, spec)
    assert all(out.path_finished)
    for i, p in enumerate(out.path_tokens):
        assert p[0] == THINK[i] and p[-1] == ends[i]
        assert not set(p[1:-1]) & set(stops), "a stop token ends the path at once"
        assert not set(p[1:]) & set(THINK + [SUMMARY]), "start tokens are banned inside a path"
    assert len({len(p) for p in out.path_tokens}) > 1
    assert out.written["think"] == sum(len(p) for p in out.path_tokens), "the end tokens are in the KV"
    assert out.summary_offset == len(spec.prompt_ids) + max(len(p) for p in out.path_tokens)


def test_summary_reads_every_path_and_paths_do_not_see_each_other(pt_pair):
    """The defining rule (vs self-consistency's vote over independent samples): the summary's logits depend
    on the content of every path. Changing only path 3's forced start changes the summary's logits while
    paths 1 and 2, which never see path 3, keep their exact tokens."""
    _, model, _, _ = pt_pair
    runs = []
    for path3 in ([THINK[2], 65], [THINK[2], 66]):
        seen = []
        spec = ParaThinkerSpec(prompt_ids=byte_encode("Q: 3*3?"), paths=3,
                               path_starts=[[THINK[0]], [THINK[1]], path3],
                               summary_prefix=[SUMMARY] + byte_encode(" The final answer is"), max_think=8,
                               max_summary=1, finish_share=1.0, end_ids=[0],
                               sampling=SamplingRow(1.0, 1.0, 0, 2))
        out = parathinker_run(model, spec, on_summary=lambda cur, lg, seen=seen: seen.append(lg))
        runs.append((out, seen[0]))
    (a, la), (b, lb) = runs
    assert a.path_tokens[:2] == b.path_tokens[:2]
    assert a.path_tokens[2][:2] != b.path_tokens[2][:2]
    assert not torch.allclose(la, lb, atol=1e-4), "the summary attends to path 3"


def _backend(folder):
    """An EngineBackend over a checkpoint folder on CPU (float32)."""
    from ttscale.backends.engine import EngineBackend, EngineConfig

    return EngineBackend(EngineConfig(model=str(folder), dtype="float32", device="cpu", num_blocks=256))


async def test_strategy_uses_the_checkpoints_thought_embeddings(authors_pair):
    from ttscale.controller import Context
    from ttscale.strategies.registry import make_strategy
    from ttscale.types import Problem

    be = _backend(authors_pair[0])
    try:
        strat = make_strategy("parathinker:paths=2,max_tokens=6,summary_max_tokens=4,seed=1")
        res = await strat.run(Problem(prompt="2+2?"), Context(be))
    finally:
        await be.close()
    assert res.fallbacks == [] and res.decision["mode"] == "native" and res.decision["thought_embeddings"]
    tok = be.tokenizer
    starts = [tok.convert_tokens_to_ids(f"<think{i}>") for i in (1, 2)]
    assert [t.token_ids[0] for t in res.traces[:2]] == starts
    for i, t in enumerate(res.traces[:2]):
        if t.status.value == "finished":
            assert t.token_ids[-1] == tok.convert_tokens_to_ids(f"</think{i + 1}>")
    prefix = tok.encode(res.config["summary_prefix"], add_special_tokens=False)
    assert prefix[0] == tok.convert_tokens_to_ids("<summary>")
    assert res.decision["written"]["summary"] <= len(prefix) + 4
    assert res.usage.generated_tokens == sum(t.num_tokens for t in res.traces)


async def test_missing_thought_embeddings_give_a_fallback_entry_or_a_refusal(authors_pair):
    from ttscale.controller import Context
    from ttscale.errors import CapabilityError
    from ttscale.strategies.registry import make_strategy
    from ttscale.types import Problem

    be = _backend(authors_pair[1])
    try:
        strat = make_strategy("parathinker:paths=2,max_tokens=4,summary_max_tokens=2,seed=1")
        res = await strat.run(Problem(prompt="2+2?"), Context(be))
        assert res.decision["mode"] == "native" and not res.decision["thought_embeddings"]
        assert len(res.fallbacks) == 1 and "seg_embeddings" in res.fallbacks[0]
        with pytest.raises(CapabilityError, match="seg_embeddings"):
            await make_strategy("parathinker:paths=2,max_tokens=4,thought_embeddings=required").run(
                Problem(prompt="2+2?"), Context(be))
    finally:
        await be.close()


async def test_paths_and_summary_are_branches_of_the_context(authors_pair):
    """Through the Context: branches path1, path2 and summary with their events; the summary continues the
    critical path after the longest path; the run's peak KV blocks reach the usage."""
    from ttscale.controller import Context
    from ttscale.strategies.registry import make_strategy
    from ttscale.types import Problem

    be = _backend(authors_pair[0])
    events = []
    try:
        ctx = Context(be, listeners=[events.append])
        strat = make_strategy("parathinker:paths=2,max_tokens=6,summary_max_tokens=4,seed=1,temperature=1.0")
        res = await strat.run(Problem(prompt="2+2?"), ctx)
        await ctx.aclose()
    finally:
        await be.close()
    branches = list(ctx.branches.values())
    assert [b.meta["stream"] for b in branches] == ["path1", "path2", "summary"]
    assert {e.branch_id for e in events if e.kind == "spawned"} == {b.id for b in branches}
    assert {e.branch_id for e in events if e.kind == "finished"} == {b.id for b in branches}
    paths, summary = branches[:2], branches[2]
    assert [b.token_ids for b in paths] == [t.token_ids for t in res.traces[:2]]
    assert summary.token_ids == res.traces[2].token_ids
    assert [t.is_sample for t in res.traces] == [True, True, False]  # the summary is no sample for maj@k
    if summary.num_tokens:
        assert summary.seq_base == max(b.num_tokens for b in paths)
    assert res.usage.sequential_tokens >= summary.seq_end
    assert res.usage.peak_kv_blocks and res.usage.peak_kv_blocks > 0

"""The three strategies' decision logic and capability checks (engine runs are in the other tests)."""

from __future__ import annotations

import pytest

from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.controller import Context
from ttscale.errors import CapabilityError
from ttscale.strategies.registry import make_strategy
from ttscale.types import Problem


@pytest.mark.parametrize("spec,needs", [("hogwild", "concurrent_views"), ("parscale", "parallel_streams")])
async def test_engine_strategies_refuse_other_backends(spec, needs):
    be = ScriptedBackend(["The answer is \\boxed{4}."])
    with pytest.raises(CapabilityError, match=needs):
        await make_strategy(spec).run(Problem(prompt="2+2?"), Context(be))


async def test_parathinker_native_mode_refuses_without_kv_merge():
    be = ScriptedBackend(["x"])
    with pytest.raises(CapabilityError, match="kv_merge"):
        await make_strategy("parathinker:mode=native").run(Problem(prompt="2+2?"), Context(be))


async def test_parathinker_text_fallback_stops_at_finish_share_and_summarises():
    def script(req, i):
        content = req.messages[-1]["content"]
        if "independent attempts" in content:
            assert "Attempt 1:" in content and "Attempt 3:" in content
            return Script(text="Attempts agree: \\boxed{4}")
        if i == 0:
            return Script(text="quick \\boxed{4}")
        return Script(text="slow " * 50 + "\\boxed{5}", delay_s=0.01)

    be = ScriptedBackend(script)
    res = await make_strategy("parathinker:paths=3,finish_share=0.3").run(Problem(prompt="2+2?"), Context(be))
    assert res.answer == "4"
    assert res.fallbacks and "text fallback" in res.fallbacks[0]
    assert res.decision["mode"] == "text"
    assert [t.status.value for t in res.traces[:3]].count("aborted") == 2  # think stage ended at the first finish
    assert res.usage.branches == 4
    assert res.usage.sequential_tokens > 0


async def test_hogwild_on_smollm2_reports_usage(smollm2_backend):
    """Two workers on the real SmolLM2 for a few steps: usage counts forward passes per worker."""
    strat = make_strategy("hogwild:workers=2,max_tokens=6,final_tokens=4,temperature=0.7,seed=3")
    res = await strat.run(Problem(prompt="What is 12 + 30?"), Context(smollm2_backend))
    u = res.usage
    assert u.branches == 2 and u.calls == 1
    assert [t.id for t in res.traces] == ["hogwild-Alice", "hogwild-Bob"]
    assert u.sequential_tokens == res.decision["forwards"] <= 6 + 4
    assert u.generated_tokens == sum(t.num_tokens for t in res.traces) + res.decision["final_tokens"]
    assert u.prompt_tokens > 0 and res.text


@pytest.fixture(scope="module")
def parathinker_backend(tmp_path_factory):
    """Engine backend over a tiny random Qwen2 whose tokenizer has <think1..2>/<summary> and whose
    checkpoint carries segment embeddings (the layout `native.load_segment_embeddings` documents)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from ttscale.backends.engine import EngineBackend, EngineConfig
    from ttscale.models import default_tokenizer_dir
    from ttscale.testing import build_tiny_model

    tok_dir = tmp_path_factory.mktemp("pt-tok")
    tok = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    tok.add_special_tokens({"additional_special_tokens": ["<think1>", "<think2>", "<summary>"]})
    tok.save_pretrained(str(tok_dir))
    folder = build_tiny_model(tmp_path_factory.mktemp("pt") / "m", "qwen2", seed=2, tokenizer_dir=tok_dir)
    g = torch.Generator().manual_seed(0)
    import json

    c = json.loads((folder / "config.json").read_text())
    kv = c["num_key_value_heads"] * (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    seg = {f"model.layers.{i}.self_attn.segment_{w}_embed.weight": torch.randn(3, kv, generator=g)
           for i in range(c["num_hidden_layers"]) for w in "kv"}
    save_file(seg, str(folder / "segments.safetensors"))
    be = EngineBackend(EngineConfig(model=str(folder), dtype="float32", device="cpu", num_blocks=256))
    yield be
    be.engine.close()


async def test_parathinker_native_mode_on_engine(parathinker_backend):
    be = parathinker_backend
    strat = make_strategy("parathinker:paths=2,max_tokens=6,summary_max_tokens=4,temperature=0.8,seed=1")
    res = await strat.run(Problem(prompt="2+2?"), Context(be))
    assert res.fallbacks == [] and res.decision["mode"] == "native"
    think = [be.tokenizer.convert_tokens_to_ids(f"<think{i}>") for i in (1, 2)]
    assert [t.token_ids[0] for t in res.traces[:2]] == think
    w = res.decision["written"]
    assert w["summary"] <= len(be.tokenizer.encode(" The final answer is", add_special_tokens=False)) + 1 + 4
    assert be.engine.model.seg_k is not None  # the checkpoint's segment embeddings are in use
    assert res.usage.generated_tokens == sum(t.num_tokens for t in res.traces)

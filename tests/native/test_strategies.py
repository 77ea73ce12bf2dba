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


async def test_parscale_on_the_default_engine_says_what_to_pass(smollm2_backend):
    """The embedded default model has no parallel streams: the error names the backend spec to give, not a
    Python class."""
    with pytest.raises(CapabilityError) as info:
        await make_strategy("parscale").run(Problem(prompt="2+2?"), Context(smollm2_backend))
    message = str(info.value)
    assert "--backend parscale:PATH" in message and "qwen2_parscale" in message
    assert "ParScaleBackend" not in message


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
    # the think stage ended at the first finish
    assert [t.status.value for t in res.traces[:3]].count("aborted") == 2
    assert res.usage.branches == 4
    assert res.usage.sequential_tokens > 0
    # the summary is written over the paths, not one more sample: maj@k / pass@k leave it out
    assert [t.is_sample for t in res.traces] == [True, True, True, False]


async def test_hogwild_on_smollm2_reports_usage(smollm2_backend):
    """Two workers on the real SmolLM2 for a few steps: one branch (one engine stream) per worker; usage
    counts forward passes as sequential tokens and every kept token once."""
    strat = make_strategy("hogwild:workers=2,max_tokens=6,final_tokens=4,temperature=0.7,seed=3")
    res = await strat.run(Problem(prompt="What is 12 + 30?"), Context(smollm2_backend))
    u = res.usage
    assert u.branches == 2 and u.calls == 2 and u.peak_kv_blocks and u.peak_kv_blocks > 0
    assert [t.id for t in res.traces] == ["hogwild-Alice", "hogwild-Bob"]
    assert u.sequential_tokens == res.decision["forwards"] <= 6 + 4
    assert u.generated_tokens == sum(t.num_tokens for t in res.traces) + res.decision["final_tokens"]
    assert u.prompt_tokens > 0 and res.text


# ParaThinker's native mode on the engine (the authors' checkpoint layout) is in test_parathinker.py.

"""ATTS and DeepConf decision logic on scripted backends, and capability checks before starting."""

from __future__ import annotations

import pytest

from ttscale.backends.base import Capabilities
from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.controller import Context
from ttscale.errors import CapabilityError, ConfigError
from ttscale.pipeline import Pipeline
from ttscale.strategies.atts import ATTS
from ttscale.strategies.deepconf import DeepConf
from ttscale.strategies.registry import make_strategy
from ttscale.types import BranchStatus, Problem

P = Problem(id="p", prompt="What is 3 + 4?")


def draft_script(req, i):
    history = req.messages[-1]["content"] if req.messages[-1]["role"] == "assistant" else ""
    if "target" in history:
        return Script(text="so \\boxed{7}")
    return Script(text="BAD step\n\n" if "first step" in history else "first step\n\n")


def target_score(req):
    n = len(req.continuation.split())
    return [-5.0] * n if "BAD" in req.continuation else [-0.5] * n


def backends():
    draft = ScriptedBackend(draft_script)
    target = ScriptedBackend([Script(text="target fix\n\n")], score_fn=target_score)
    return draft, target


async def test_atts_rejects_the_step_the_target_dislikes_and_the_target_continues():
    draft, target = backends()
    strat = ATTS({"samples": 4, "calibration": "conditional", "alpha": 0.4}, target_backend=target)
    async with Context(draft, seed=0) as ctx:
        res = await strat.run(P, ctx)
    assert res.answer == "7" and res.decision["chain_answers"] == ["7"] * 4
    for chain in res.decision["chains"]:
        assert [s["rejected"] for s in chain] == [False, True, False]
        assert chain[0]["p_value"] is None and chain[1]["p_value"] == pytest.approx(1 / 5)
        assert "target" in chain[1] and "target" not in chain[2]
    assert res.decision["rejection_rate"] == pytest.approx(0.5) and res.decision["calibration_size"] == 4
    # the draft step is kept and the target writes after it (on_reject=append)
    assert "BAD step\n\ntarget fix" in res.text
    u = res.usage
    assert u.score_calls == 12 and len(target.requests) == 4 and len(draft.requests) == 12
    # every scripted step is two tokens: 3 draft steps per chain, plus 1 target step, folded in
    assert u.generated_tokens == 4 * 3 * 2 + 4 * 2
    assert u.sequential_tokens == 4 * 2  # one chain through both models: draft, draft, target, draft


async def test_atts_replace_drops_the_rejected_step():
    draft, target = backends()
    strat = ATTS({"samples": 3, "calibration": "conditional", "on_reject": "replace"}, target_backend=target)
    async with Context(draft, seed=0) as ctx:
        res = await strat.run(P, ctx)
    assert "BAD" not in res.text and "target fix" in res.text


async def test_atts_marginal_calibration_pools_across_problems():
    draft, target = backends()
    strat = ATTS({"samples": 2}, target_backend=target)
    for pid in ("p1", "p2"):
        async with Context(draft, seed=0) as ctx:
            res = await strat.run(P.model_copy(update={"id": pid}), ctx)
    assert res.decision["calibration_size"] == 4 and len(strat.marginal) == 4


async def test_atts_needs_score_on_the_target_before_starting():
    draft, target = backends()
    target.capabilities = target.capabilities.model_copy(update={"score": False})
    with pytest.raises(CapabilityError, match=r"needs `score`.*target backend.*perplexity"):
        await Pipeline(draft, ATTS({"samples": 2}, target_backend=target)).solve(P)
    assert draft.requests == [] and target.requests == []
    with pytest.raises(ConfigError, match="target"):
        make_strategy("atts").check(draft)


def deepconf_scripts(req, i):
    # warm-up b0..b3: three confident (lp=-2 -> C=2.5), one not; online: alternate unconfident / confident
    low = i in (3, 4, 6, 8)
    words = " ".join(["w"] * 40)
    return Script(text=f"{words} \\boxed{{{2 if low else 1}}}", logprob=-0.1 if low else -2.0, delay_s=0.001)


async def test_deepconf_stops_low_confidence_traces_and_votes_by_confidence():
    be = ScriptedBackend(deepconf_scripts)
    strat = DeepConf({"n": 10, "warmup": 4, "top_logprobs": 2, "window": 4})
    async with Context(be, seed=0) as ctx:
        res = await strat.run(P, ctx)
    assert res.decision["threshold"] == pytest.approx(0.6 + 0.3 * 1.9)
    assert sorted(res.decision["stopped"]) == ["b4", "b6", "b8"]
    st = {t.id: t for t in res.traces}
    assert all(st[k].status is BranchStatus.aborted and st[k].num_tokens < 41 for k in ("b4", "b6", "b8"))
    assert all(st[k].status is BranchStatus.finished for k in ("b5", "b7", "b9"))
    assert res.answer == "1" and res.usage.saved_tokens > 0
    # keep_percent=90 of 7 finished -> the 7 most confident (ceil); b3 is the least confident
    assert len(res.decision["voters"]) == 7


async def test_deepconf_keep_percent_filters_the_least_confident():
    be = ScriptedBackend(deepconf_scripts)
    strat = DeepConf({"n": 4, "warmup": 4, "top_logprobs": 2, "window": 4, "keep_percent": 75})
    async with Context(be, seed=0) as ctx:
        res = await strat.run(P, ctx)
    assert res.decision["voters"] == ["b0", "b1", "b2"] and res.answer == "1"


async def test_deepconf_without_top_logprobs_says_which_and_why_before_starting():
    be = ScriptedBackend(["x"])
    be.capabilities = Capabilities(top_logprobs=0)
    with pytest.raises(CapabilityError, match=r"top_logprobs.*token confidence"):
        await Pipeline(be, make_strategy("deepconf")).solve(P)
    assert be.requests == []
    be.capabilities = Capabilities(top_logprobs=5)
    with pytest.raises(CapabilityError, match="top-20 logprobs.*at most 5"):
        make_strategy("deepconf").check(be)

"""ATTS decision logic on scripted backends, and capability checks before starting (DeepConf: test_deepconf.py).

Draft steps end on the length limit (`finish_reason="length"`), as a 500-token turn with no stop string
does; a step ending on "stop" is the model's end of sequence and ends the chain.
"""

from __future__ import annotations

import pytest

from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.controller import Context
from ttscale.errors import CapabilityError, ConfigError
from ttscale.pipeline import Pipeline
from ttscale.strategies.atts import ATTS, ATTSCalibration
from ttscale.strategies.registry import make_strategy
from ttscale.strategies.self_consistency import SelfConsistency
from ttscale.types import Problem

P = Problem(id="p", prompt="What is 3 + 4?")
GOOD, BAD = -0.5, -5.0  # the target's logprob per token of a step it likes / dislikes


def draft_script(req, i):
    history = req.messages[-1]["content"] if req.messages[-1]["role"] == "assistant" else ""
    if "target" in history:
        return Script(text="so \\boxed{7}")
    if "first step" in history:
        return Script(text="BAD step\n\n", finish_reason="length")
    return Script(text="first step\n\n", finish_reason="length")


def target_score(req):
    n = len(req.continuation.split())
    return [BAD] * n if "BAD" in req.continuation else [GOOD] * n


def backends(draft=draft_script, target_text="target fix\n\n"):
    return ScriptedBackend(draft), ScriptedBackend([Script(text=target_text, finish_reason="length")],
                                                   score_fn=target_score)


async def test_atts_turns_have_no_stop_string_and_a_500_token_limit():
    paragraphs = "\n\n".join(f"paragraph {j}" for j in range(20))  # far more than ~15 blank lines in one turn
    draft = ScriptedBackend([Script(text=paragraphs + " \\boxed{7}")])
    _, target = backends()
    async with Context(draft, seed=0) as ctx:
        res = await ATTS({"samples": 1}, target_backend=target).run(P, ctx)
    (req,) = draft.requests
    assert req.sampling.stop == [] and req.sampling.max_tokens == 500
    assert res.answer == "7" and len(res.decision["chains"][0]) == 1 and res.decision["chain_ends"] == ["boxed"]


async def test_atts_rejects_the_step_the_target_dislikes_and_the_target_continues():
    draft, target = backends()
    strat = ATTS({"samples": 4, "calibration": "conditional", "rule": "p_value"}, target_backend=target)
    async with Context(draft, seed=0) as ctx:
        res = await strat.run(P, ctx)
    assert res.answer == "7" and res.decision["chain_answers"] == ["7"] * 4
    for chain in res.decision["chains"]:
        # turn 1 is tested too: against the 4 first-turn scores, which it ties, so p = 5/5
        assert [s["rejected"] for s in chain] == [False, True, False]
        assert chain[0]["p_value"] == pytest.approx(1.0) and chain[1]["p_value"] == pytest.approx(1 / 5)
        assert "target" in chain[1] and "target" not in chain[2]
    assert res.decision["rejection_rate"] == pytest.approx(1 / 3) and res.decision["calibration_size"] == 4
    assert "BAD step\n\ntarget fix" in res.text  # the draft step is kept, the target writes after it
    u = res.usage
    assert u.score_calls == 12 and len(target.requests) == 4 and len(draft.requests) == 12
    # every scripted step is two tokens: 3 draft steps per chain, 1 target step, split by model
    assert u.by_model["scripted"].generated_tokens == 4 * 3 * 2
    assert u.by_model["target"].generated_tokens == 4 * 2 and u.by_model["target"].score_calls == 12
    assert u.generated_tokens == 4 * 3 * 2 + 4 * 2
    assert u.sequential_tokens == 4 * 2  # one chain through both models: draft, draft, target, draft
    assert any("calibrated online (conditional)" in f for f in res.fallbacks)


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
    assert "(4 at the end)" in res.fallbacks[0]


def wrong_first_step(req, i):
    """The draft's first step is a confident-looking wrong answer the target dislikes."""
    history = req.messages[-1]["content"] if req.messages[-1]["role"] == "assistant" else ""
    if not history:
        return Script(text="BAD guess \\boxed{5}")
    return Script(text="fine \\boxed{5}")


async def test_atts_first_turn_rejection_changes_the_answer_self_consistency_gives(tmp_path):
    """Defining rule: a step the target finds unlikely (vs the offline array) is handed to the target.

    Self-consistency over the same draft model answers 5; ATTS rejects every first step and the target's
    continuation answers 7. Without the rejection (or without testing turn 1) ATTS would answer 5.
    """
    cal_draft = ScriptedBackend([Script(text="a plain first step", finish_reason="length")])
    _, target = backends(target_text="no: \\boxed{7}")
    strat = ATTS({"samples": 4, "calibration": "offline"}, target_backend=target)
    calib = await strat.calibrate([Problem(id=f"c{i}", prompt="calibration") for i in range(3)], cal_draft,
                                  samples=2)
    assert len(calib.scores) == 6 and calib.problem_ids == ["c0", "c1", "c2"] and calib.target == "scripted"
    path = tmp_path / "atts_calibration.json"
    calib.save(path)

    strat = ATTS({"samples": 4, "calibration": "offline", "calibration_file": str(path)}, target_backend=target)
    draft = ScriptedBackend(wrong_first_step)
    async with Context(draft, seed=0) as ctx:
        res = await strat.run(P, ctx)
    async with Context(ScriptedBackend(wrong_first_step), seed=0) as ctx:
        sc = await SelfConsistency({"n": 4}).run(P, ctx)
    assert sc.answer == "5"
    assert res.answer == "7" and res.decision["chain_answers"] == ["7"] * 4
    assert all(chain[0]["rejected"] and chain[0]["percentile"] == 1.0 for chain in res.decision["chains"])
    assert res.decision["calibration_size"] == 6 and res.fallbacks == []
    assert res.usage.by_model["target"].generated_tokens == 4 * 2


async def test_atts_offline_calibration_refuses_problems_of_its_split_and_needs_a_file(tmp_path):
    _, target = backends()
    calib = ATTSCalibration(scores=[1.5, 2.0], problem_ids=["p"], draft="d", target="t", step_tokens=500,
                            temperature=0.8)
    draft, _ = backends()
    async with Context(draft, seed=0) as ctx:
        with pytest.raises(ConfigError, match="'p' is in the calibration split"):
            await ATTS({"calibration": "offline"}, target_backend=target, calibration=calib).run(P, ctx)
        with pytest.raises(ConfigError, match="calibration_file"):
            await ATTS({"calibration": "offline"}, target_backend=target).run(P, ctx)
    with pytest.raises(ConfigError, match="calibration_file is read only with calibration=offline"):
        make_strategy("atts", calibration_file=str(tmp_path / "x.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="not an ATTS calibration"):
        ATTSCalibration.load(bad)


async def test_atts_needs_score_on_the_target_before_starting():
    draft, target = backends()
    target.capabilities = target.capabilities.model_copy(update={"score": False})
    with pytest.raises(CapabilityError, match=r"needs `score`.*target backend.*perplexity"):
        await Pipeline(draft, ATTS({"samples": 2}, target_backend=target)).solve(P)
    assert draft.requests == [] and target.requests == []
    with pytest.raises(ConfigError, match="target"):
        make_strategy("atts").check(draft)

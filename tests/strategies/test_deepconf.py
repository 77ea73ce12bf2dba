"""DeepConf on scripted traces: the authors' group confidence, the online chain, variants, the vote.

The scripted backend gives each token the top-k logprobs {token: lp, alt_j: lp - 1 - j}; with k=2 a
token's confidence is -(lp + lp - 1) / 2 = 0.5 - lp, so a script's `logprobs` set confidences exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from ttscale.backends.base import Capabilities
from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.controller import Context
from ttscale.errors import CapabilityError
from ttscale.judges.confidence import group_confidence, lowest_group_confidence
from ttscale.pipeline import Pipeline
from ttscale.strategies.deepconf import NO_THRESHOLD, DeepConf, DeepConfConfig
from ttscale.strategies.registry import make_strategy
from ttscale.types import BranchStatus, Problem

P = Problem(id="p", prompt="What is 3 + 4?")


def tops(confs: list[float]) -> list[dict[str, float]]:
    """Top-2 logprobs whose DeepConf token confidences are `confs`."""
    return [{"t": 0.5 - c, "<alt0>": -0.5 - c} for c in confs]


def script(conf: float | list[float], words: int = 40, answer: str = "1", delay_s: float = 0.001) -> Script:
    confs = conf if isinstance(conf, list) else [conf] * (words + 1)
    text = " ".join(["w"] * (len(confs) - 1) + [f"\\boxed{{{answer}}}"])
    return Script(text=text, logprobs=[0.5 - c for c in confs], delay_s=delay_s)


async def run(strategy, scripts):
    be = ScriptedBackend(scripts)
    async with Context(be, seed=0) as ctx:
        res = await strategy.run(P, ctx)
    return be, res


def authors_least_grouped(confs: list[float], group_size: int) -> list[float]:
    """facebookresearch/deepconf helper.compute_least_grouped, without its rounding to 3 decimals."""
    if len(confs) < group_size:
        return [sum(confs) / len(confs)] if confs else [0]
    return [sum(confs[i:i + group_size]) / group_size for i in range(len(confs) - group_size + 1)]


def test_group_confidence_of_a_hand_computed_trace_uses_full_windows_only():
    # window 4 over confidences 0.6, 4.5, 4.5, 4.5, 4.5, 2.5: windows (0.6 + 13.5)/4 = 3.525, 4.5, 16/4 = 4.0
    confs = [0.6, 4.5, 4.5, 4.5, 4.5, 2.5]
    assert group_confidence(np.array(confs), 4) == pytest.approx([3.525, 4.5, 4.0])
    assert lowest_group_confidence(tops(confs), 4) == pytest.approx(3.525)  # a start window of 1 gave 0.6
    # shorter than a window: one group, the mean of all tokens
    assert lowest_group_confidence(tops([1.0, 2.0, 6.0]), 4) == pytest.approx(3.0)
    # the case: one uncertain first token (3.0) then 4,095 confident ones (12.0), window 2048
    long = tops([3.0] + [12.0] * 4095)
    assert lowest_group_confidence(long, 2048) == pytest.approx((3.0 + 2047 * 12.0) / 2048)


def test_group_confidence_matches_the_authors_loop_on_random_traces():
    rng = np.random.default_rng(0)
    for length in (1, 3, 7, 8, 9, 40):
        confs = list(rng.uniform(0.1, 15.0, size=length))
        assert list(group_confidence(np.array(confs), 8)) == pytest.approx(authors_least_grouped(confs, 8))


async def test_the_strategy_scores_a_trace_with_the_authors_rule():
    strat = DeepConf({"n": 1, "warmup": 1, "top_logprobs": 2, "window": 4})
    _, res = await run(strat, [script([0.6, 4.5, 4.5, 4.5, 4.5, 2.5])])
    assert res.decision["confidence"]["b0"] == pytest.approx(3.525)
    assert res.traces[0].score == pytest.approx(3.525)


async def test_online_traces_come_after_the_warmup_on_the_critical_path():
    # warm-up traces of 11 and 21 tokens, online ones of 31 and 16; equal confidence, nothing stopped
    scripts = [script(2.0, words=w) for w in (10, 20, 30, 15)]
    strat = DeepConf({"n": 4, "warmup": 2, "top_logprobs": 2, "window": 1000})
    _, res = await run(strat, scripts)
    assert res.decision["stopped"] == [] and all(t.status is BranchStatus.finished for t in res.traces)
    warm_path = max(t.num_tokens for t in res.traces[:2])
    online_longest = max(t.num_tokens for t in res.traces[2:])
    assert (warm_path, online_longest) == (21, 31)
    assert res.usage.sequential_tokens == warm_path + online_longest == 52
    assert res.usage.generated_tokens == 11 + 21 + 31 + 16


def graded_scripts(req, i):
    # warm-up b0..b9 with confidences 1..10; online b10, b11, b12 with 0.5, 5.0 and 9.5
    confs = [float(c) for c in range(1, 11)] + [0.5, 5.0, 9.5]
    return script(confs[i], words=40)


async def test_low_and_high_variants_stop_different_traces():
    base = {"n": 13, "warmup": 10, "top_logprobs": 2, "window": 4}
    _, low = await run(DeepConf({**base, "variant": "low"}), graded_scripts)
    _, high = await run(DeepConf({**base, "variant": "high"}), graded_scripts)
    assert low.decision["threshold"] == pytest.approx(9.1) and low.decision["percentile"] == 90.0
    assert high.decision["threshold"] == pytest.approx(1.9) and high.decision["percentile"] == 10.0
    assert sorted(low.decision["stopped"]) == ["b10", "b11"]
    assert high.decision["stopped"] == ["b10"]
    # low: only the top 10% vote (b9 at 10.0 and b12 at 9.5); high: all but b0 and the stopped b10
    assert sorted(low.decision["voters"]) == ["b12", "b9"]
    assert len(high.decision["voters"]) == 11 and "b0" not in high.decision["voters"]
    stopped = {t.id: t for t in low.traces if t.id in ("b10", "b11")}
    assert all(t.status is BranchStatus.aborted and t.num_tokens < 41 for t in stopped.values())


def test_the_default_is_the_authors_online_headline_deepconf_low():
    assert DeepConfConfig().variant == "low" and DeepConfConfig().threshold_percentile == 90.0
    assert DeepConfConfig(variant="high").threshold_percentile == 10.0
    assert DeepConfConfig(variant="high", percentile=25).threshold_percentile == 25.0


def split_scripts(req, i):
    # confident traces answer 1 (b0, b4); the six unconfident ones answer 2
    confident = i in (0, 4)
    return script(5.0 if confident else 1.0, answer="1" if confident else "2")


async def test_deepconf_answers_otherwise_than_self_consistency_on_the_same_traces():
    _, sc = await run(make_strategy("self-consistency", n=8), split_scripts)
    _, dc = await run(DeepConf({"n": 8, "warmup": 4, "top_logprobs": 2, "window": 4}), split_scripts)
    assert sc.answer == "2" and sc.usage.aborted == 0
    # threshold: 90th percentile of 5, 1, 1, 1 = 3.8; b5..b7 fall below it after one window and stop
    assert dc.decision["threshold"] == pytest.approx(3.8)
    assert sorted(dc.decision["stopped"]) == ["b5", "b6", "b7"] and dc.usage.aborted == 3
    assert dc.decision["voters"] == ["b0", "b4"] and dc.answer == "1"
    assert dc.usage.generated_tokens < sc.usage.generated_tokens


def mixed_scripts(req, i):
    # warm-up b0..b3: three confident (2.5), b3 not (0.6); online: b4, b6, b8 unconfident
    low = i in (3, 4, 6, 8)
    return script(0.6 if low else 2.5, answer="2" if low else "1")


async def test_deepconf_high_stops_low_confidence_traces_and_votes_above_the_threshold():
    strat = DeepConf({"n": 10, "warmup": 4, "top_logprobs": 2, "window": 4, "variant": "high"})
    _, res = await run(strat, mixed_scripts)
    assert res.decision["threshold"] == pytest.approx(0.6 + 0.3 * 1.9)
    assert sorted(res.decision["stopped"]) == ["b4", "b6", "b8"]
    st = {t.id: t for t in res.traces}
    assert all(st[k].status is BranchStatus.aborted and st[k].num_tokens < 41 for k in ("b4", "b6", "b8"))
    assert all(st[k].status is BranchStatus.finished for k in ("b5", "b7", "b9"))
    assert res.answer == "1" and res.usage.aborted == 3
    # the finished warm-up trace b3 is below the threshold: it does not vote
    assert sorted(res.decision["voters"]) == ["b0", "b1", "b2", "b5", "b7", "b9"]


async def test_keep_percent_adds_a_top_x_filter_to_the_vote():
    strat = DeepConf({"n": 4, "warmup": 4, "top_logprobs": 2, "window": 4, "variant": "high",
                      "keep_percent": 50})
    _, res = await run(strat, mixed_scripts)
    assert len(res.decision["voters"]) == 2 and "b3" not in res.decision["voters"] and res.answer == "1"


async def test_no_finished_warmup_means_no_threshold_and_says_so():
    def scripts(req, i):
        return Script(text="x", error="boom") if i < 2 else script(1.0)

    _, res = await run(DeepConf({"n": 3, "warmup": 2, "top_logprobs": 2, "window": 4}), scripts)
    assert res.fallbacks == [NO_THRESHOLD] and res.decision["stopped"] == [] and res.answer == "1"


async def test_deepconf_without_top_logprobs_says_which_and_why_before_starting():
    be = ScriptedBackend(["x"])
    be.capabilities = Capabilities(top_logprobs=0)
    with pytest.raises(CapabilityError, match=r"top_logprobs.*token confidence"):
        await Pipeline(be, make_strategy("deepconf")).solve(P)
    assert be.requests == []
    be.capabilities = Capabilities(top_logprobs=5)
    with pytest.raises(CapabilityError, match="top-20 logprobs.*at most 5"):
        make_strategy("deepconf").check(be)

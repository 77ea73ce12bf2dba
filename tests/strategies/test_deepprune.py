"""DeepPrune decision logic on scripted traces with known answer groups."""

from __future__ import annotations

import logging

import pytest

from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.controller import Context
from ttscale.judges.pairwise import JudgeBase
from ttscale.strategies.deepprune import DeepPrune
from ttscale.types import BranchStatus, Problem

P = Problem(id="p", prompt="Pick a letter.")


def trace(group: str, n: int = 60) -> str:
    return " ".join([f"group{group}", "wait", "so", "then"] + ["x"] * n + [f"\\boxed{{{group}}}"])


class PerfectJudge(JudgeBase):
    """Knows the answer group from the tag every scripted trace starts with."""

    name = "perfect"

    def p_same(self, a: str, b: str) -> float:
        return float(a.split()[0] == b.split()[0])


class DifferentJudge(JudgeBase):
    name = "always-different"

    def p_same(self, a: str, b: str) -> float:
        return 0.0


async def run(groups, judge, **cfg):
    be = ScriptedBackend([Script(text=trace(g), delay_s=0.002) for g in groups])
    strat = DeepPrune({"n": len(groups), "prefix_words": 2, "seed": 0, **cfg}, judge=judge)
    async with Context(be, seed=0) as ctx:
        res = await strat.run(P, ctx)
    return be, res


async def test_perfect_judge_keeps_one_representative_per_answer_and_votes_by_cluster_size():
    groups = ["A", "B", "A", "C", "A", "B"]
    be, res = await run(groups, PerfectJudge())
    assert res.decision["clusters"] == [["b0", "b2", "b4"], ["b1", "b5"], ["b3"]]
    assert res.decision["rule"] == "representatives" and res.decision["survivors"] == ["b0", "b1", "b3"]
    status = {t.id: t.status for t in res.traces}
    assert [k for k, s in status.items() if s is BranchStatus.finished] == ["b0", "b1", "b3"]
    assert all(status[k] is BranchStatus.aborted for k in ("b2", "b4", "b5"))
    assert all(be.tokens_sent[k] < len(trace("A").split()) for k in ("b2", "b4", "b5"))
    # every distinct answer survives, and the vote still counts the pruned traces through their cluster
    assert res.decision["weights"] == {"b0": 3.0, "b1": 2.0, "b3": 1.0}
    assert {c["answer"]: c["weight"] for c in res.decision["classes"]} == {"A": 3.0, "B": 2.0, "C": 1.0}
    assert res.answer == "A" and res.fallbacks == []
    assert res.usage.saved_tokens > 0


async def test_deepprune_prunes_where_self_consistency_keeps_every_trace():
    """Acceptance 1: same scripted traces, same answers; DeepPrune's rule aborts the redundant traces
    (a different abort set than self-consistency's empty one) and keeps the minority answer alive.
    Fails if the clustering puts everything together (only b0 would survive) or if only the largest
    cluster survives (B's representative b3 would be aborted)."""
    from ttscale.strategies.registry import make_strategy

    groups = ["A", "A", "A", "B", "B"]
    be = ScriptedBackend([Script(text=trace(g), delay_s=0.002) for g in groups])
    async with Context(be, seed=0) as ctx:
        sc = await make_strategy("self-consistency", n=5, seed=0).run(P, ctx)
    _, dp = await run(groups, PerfectJudge())
    sc_aborted = {t.id for t in sc.traces if t.status is BranchStatus.aborted}
    dp_aborted = {t.id for t in dp.traces if t.status is BranchStatus.aborted}
    assert sc_aborted == set() and dp_aborted == {"b1", "b2", "b4"}
    assert {t.id for t in dp.traces if t.status is BranchStatus.finished} == {"b0", "b3"}
    assert sorted(c["answer"] for c in dp.decision["classes"]) == ["A", "B"]
    assert sc.answer == dp.answer == "A"
    assert dp.usage.generated_tokens < sc.usage.generated_tokens


async def test_largest_rule_keeps_only_the_largest_cluster():
    groups = ["A", "B", "A", "C", "A", "B"]
    _be, res = await run(groups, PerfectJudge(), survivors="largest")
    assert res.decision["rule"] == "largest-cluster" and res.decision["survivors"] == ["b0", "b2", "b4"]
    assert [t.id for t in res.traces if t.status is BranchStatus.finished] == ["b0", "b2", "b4"]
    assert res.answer == "A"


async def test_k2_caps_the_survivors_of_the_largest_rule():
    _be, res = await run(["A", "A", "A", "B"], PerfectJudge(), k2=2, survivors="largest")
    assert res.decision["survivors"] == ["b0", "b1"]
    assert sum(t.status is BranchStatus.finished for t in res.traces) == 2


async def test_per_cluster_representatives_share_their_clusters_weight():
    _be, res = await run(["A", "A", "A", "B"], PerfectJudge(), per_cluster=2)
    assert res.decision["survivors"] == ["b0", "b1", "b3"]
    assert res.decision["weights"] == {"b0": 1.5, "b1": 1.5, "b3": 1.0}


async def test_always_different_judge_falls_back_to_k3_random_traces():
    _be, res = await run(["A", "B", "A", "C", "A", "B"], DifferentJudge(), k3=2)
    assert res.decision["rule"] == "fallback-k3"
    assert all(len(c) == 1 for c in res.decision["clusters"])
    finished = [t.id for t in res.traces if t.status is BranchStatus.finished]
    assert finished == res.decision["survivors"] and len(finished) == 2
    assert res.fallbacks and "singleton" in res.fallbacks[0]


async def test_max_clusters_leaves_the_rest_unassigned():
    _, res = await run(["A", "B", "C", "D"], PerfectJudge(), max_clusters=2, k3=1)
    assert res.decision["clusters"] == [["b0"], ["b1"]] and res.decision["unassigned"] == ["b2", "b3"]
    assert res.decision["rule"] == "fallback-k3"


async def test_every_placement_is_logged():
    _, res = await run(["A", "B", "A"], PerfectJudge())
    placed = [e for e in res.decision["log"] if e["message"] == "placed"]
    assert [e["branch"] for e in placed] == ["b0", "b1", "b2"]
    assert placed[2]["scores"] == {"0": 1.0, "1": 0.0} and placed[2]["cluster"] == 0


REAL = [
    ("First, let me compute the sum. Since 17 + 25 = 42, so the total is 42. Then we check: 42 - 25 = 17, "
    "thus the answer is 42. \\boxed{42}"),
    ("First, let me add the numbers. Since 17 plus 25 equals 42, so the sum is 42. Then verify: 42 minus 17 "
    "is 25, thus it is 42. \\boxed{42}"),
    ("Hmm, maybe this is about the probability of drawing a red ball. Suppose there are 3 red and 5 blue, "
    "so the chance is 3/8. Then thus \\boxed{3/8}"),
]


async def test_embedding_judge_on_real_text_logs_its_decisions(embedding_judge):
    be = ScriptedBackend([Script(text=t, delay_s=0.002) for t in REAL])
    strat = DeepPrune({"n": 3, "prefix_words": 3, "seed": 0}, judge=embedding_judge)
    async with Context(be, seed=0) as ctx:
        res = await strat.run(P, ctx)
    log = res.decision["log"]
    placed = [e for e in log if e["message"] == "placed"]
    assert len(placed) == 3 and all(e["judge"] == "embedding" for e in placed)
    assert all(0.0 <= s <= 1.0 for e in placed for s in e["scores"].values())
    assert log[-1]["message"] == "survivors" and res.decision["judge"] == "embedding"
    # the two paraphrases of one computation go together, the unrelated trace does not
    assert ["b0", "b1"] in res.decision["clusters"] and res.answer == "42"


async def test_embedding_judge_chosen_by_name_is_a_warned_baseline(caplog):
    be = ScriptedBackend([Script(text=t, delay_s=0.002) for t in REAL])
    with caplog.at_level(logging.WARNING, logger="ttscale.strategies.deepprune"):
        async with Context(be, seed=0) as ctx:
            res = await DeepPrune({"n": 3, "prefix_words": 3, "seed": 0, "judge": "embedding"}).run(P, ctx)
    assert any("untrained baseline" in f and "'embedding'" in f for f in res.fallbacks)
    assert any("untrained baseline" in r.getMessage() for r in caplog.records)
    assert res.decision["judge"] == "embedding" and res.decision["judge_auroc"] is None


async def test_default_judge_is_the_trained_one_and_its_auroc_is_in_every_decision():
    from ttscale.judges.pairwise import TRAINED_JUDGE, ClassifierModel

    strat = DeepPrune({"n": 3, "seed": 0})
    assert strat.config.judge == "trained"
    be = ScriptedBackend([Script(text=t, delay_s=0.002) for t in REAL])
    strat.check(be)
    async with Context(be, seed=0) as ctx:
        res = await strat.run(P, ctx)
    held = ClassifierModel.load(TRAINED_JUDGE).report["heldout"]
    assert res.decision["judge"] == "trained" and res.decision["judge_auroc"] == held["auroc"] > 0.5
    assert res.decision["judge_fpr_at_tau"] == held["fpr"]
    assert res.decision["prefix"] == ClassifierModel.load(TRAINED_JUDGE).report["prefix"]
    assert not any("baseline" in f for f in res.fallbacks)
    assert f"AUROC {held['auroc']:.3f}" in strat.eval_note()


def test_llm_judge_needs_top_logprobs():
    from ttscale.backends.base import Capabilities
    from ttscale.errors import CapabilityError

    be = ScriptedBackend(["x"])
    be.capabilities = Capabilities(top_logprobs=0)
    with pytest.raises(CapabilityError, match="top_logprobs"):
        DeepPrune({"judge": "llm"}).check(be)


async def test_prefix_tokens_mode_clusters_on_the_first_tokens():
    _, res = await run(["A", "B", "B"], PerfectJudge(), prefix_tokens=3)
    assert res.decision["clusters"] == [["b0"], ["b1", "b2"]] and res.answer == "B"
    assert all(e["prefix_tokens"] >= 3 for e in res.decision["log"] if e["message"] == "placed")

"""`ctx.child(...)`: nested work shares the parent's budget, folds its usage in per model, closes with it."""

from __future__ import annotations

from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.budget import Budget
from ttscale.controller import Context
from ttscale.strategies.atts import ATTS, ATTSCalibration
from ttscale.types import BranchStatus, ModelUsage, Problem, SamplingSpec, ScoreRequest, Usage


def words(n: int, delay: float = 0.0, reason: str = "stop") -> Script:
    return Script(text=" ".join(f"w{i}" for i in range(n)), delay_s=delay, finish_reason=reason)


async def test_a_child_spends_the_parent_total_budget_and_is_aborted_with_it():
    parent_be, child_be = ScriptedBackend([words(500)]), ScriptedBackend([words(500)])
    budget = 100
    async with Context(parent_be, budget=Budget(total_tokens=budget)) as ctx:
        kid = ctx.child(backend=child_be, label="target")
        mine = ctx.spawn("q", 2, SamplingSpec(max_tokens=1000), after=[])
        theirs = kid.spawn("q", 2, SamplingSpec(max_tokens=1000), after=[])
        await ctx.wait_all(mine)
        await kid.wait_all(theirs)
        u = ctx.usage
        assert ctx.budget_hit == "total_tokens" and kid.budget_hit == "total_tokens"
        assert u.generated_tokens <= budget + 4  # one token per live branch, both Contexts together
        assert u.by_model["target"].generated_tokens > 0 and u.by_model["scripted"].generated_tokens > 0
        assert all(b.status is BranchStatus.aborted and b.meta["abort_reason"] == "budget" for b in theirs)
        assert {b.id for b in theirs} <= {f"target-{k}" for k in range(2)}
    assert sorted(child_be.aborted) == sorted(b.id for b in theirs)


async def test_new_child_branches_are_clamped_by_the_parent_and_their_own_budget():
    be = ScriptedBackend([words(90), words(50)])
    async with Context(be, budget=Budget(total_tokens=100)) as ctx:
        (a,) = ctx.spawn("q", 1, SamplingSpec(max_tokens=1000))
        await ctx.wait_all([a])
        kid = ctx.child(label="judge", budget=Budget(total_tokens=50))
        (b,) = kid.spawn("q", 1, SamplingSpec(max_tokens=1000))
        assert b.request.sampling.max_tokens == 10  # the parent has 10 left, the child's own 50
        await kid.wait_all([b])
        assert ctx.usage.generated_tokens == 100 and ctx.budget_hit == "total_tokens"
        narrow = Context(be).child(budget=Budget(total_tokens=7))
        (c,) = narrow.spawn("q", 1, SamplingSpec(max_tokens=1000))
        assert c.request.sampling.max_tokens == 7
        await narrow.aclose()


async def test_child_usage_folds_in_by_one_rule_with_the_critical_path_through_both():
    draft = ScriptedBackend([words(10)])
    judge = ScriptedBackend([words(5)], score_fn=lambda req: [-1.0] * 3)
    async with Context(draft) as ctx:
        (a,) = ctx.spawn("q", 1, SamplingSpec(max_tokens=100))
        await ctx.wait_all([a])
        kid = ctx.child(backend=judge, label="judge")
        (j,) = kid.spawn("q", 1, SamplingSpec(max_tokens=100))  # by default after every finished branch
        await kid.wait_all([j])
        await kid.score(ScoreRequest(prompt="q", continuation="a b c"))
        ctx.add_usage(Usage(generated_tokens=4, calls=1, peak_kv_blocks=12))
        own_counts = ModelUsage(generated_tokens=10 + 4, calls=2, branches=1, prompt_tokens=a.prompt_tokens)
        u = ctx.usage
    assert j.seq_base == 10 and u.sequential_tokens == 15  # draft then judge: one chain
    assert u.generated_tokens == 19 and u.score_calls == 1 and u.scored_tokens == 3 and u.peak_kv_blocks == 12
    assert u.by_model["scripted"] == own_counts
    assert u.by_model["judge"].generated_tokens == 5 and u.by_model["judge"].score_calls == 1
    summed = sum(u.by_model.values(), ModelUsage())
    assert summed.generated_tokens == u.generated_tokens and summed.calls == u.calls == 3
    kid_u = kid.usage
    assert kid_u.by_model.keys() == {"judge"} and kid_u.sequential_tokens == 15


async def test_closing_the_parent_aborts_the_child_work():
    be, other = ScriptedBackend([words(10_000, 0.001)]), ScriptedBackend([words(10_000, 0.001)])
    async with Context(be) as ctx:
        kid = ctx.child(backend=other)
        (b,) = kid.spawn("q", 1, SamplingSpec(max_tokens=20_000))
        async for ev in kid.watch([b]):
            if ev.kind == "delta" and b.num_tokens >= 3:
                break
    assert b.status is BranchStatus.aborted and b.id in other.aborted
    assert other.tokens_sent[b.id] < 100


def always_rejected_steps(req, i):
    return Script(text="BAD " + " ".join(f"d{k}" for k in range(29)), finish_reason="length")


async def test_atts_total_budget_caps_drafts_and_target_together():
    """ATTS with Budget(total_tokens=B) never exceeds B + one token per live branch, both models together.

    Every draft step is rejected and the target writes 30 tokens after it; with a budget per model (the
    old second Context) drafts and target could each spend B.
    """
    draft = ScriptedBackend(always_rejected_steps)
    target = ScriptedBackend([Script(text=" ".join(f"t{k}" for k in range(30)), finish_reason="length")],
                             score_fn=lambda req: [-5.0] * len(req.continuation.split()))
    samples, budget = 4, 150
    low = ATTSCalibration(scores=[1.0] * 8, problem_ids=["c"], draft="scripted", target="scripted",
                          step_tokens=500, temperature=0.8)
    strat = ATTS({"samples": samples, "calibration": "offline"}, target_backend=target, calibration=low)
    async with Context(draft, seed=0, budget=Budget(total_tokens=budget)) as ctx:
        res = await strat.run(Problem(id="p", prompt="What is 3 + 4?"), ctx)
    assert all(s["rejected"] for chain in res.decision["chains"] for s in chain if "rejected" in s)
    u = res.usage
    assert res.decision["budget_hit"] == "total_tokens"
    assert u.generated_tokens <= budget + samples
    assert u.by_model["scripted"].generated_tokens > 0 and u.by_model["target"].generated_tokens > 0
    assert u.by_model["scripted"].generated_tokens + u.by_model["target"].generated_tokens == u.generated_tokens
    assert set(res.decision["chain_ends"]) <= {"budget"}


async def test_best_of_n_counts_a_separate_verifiers_calls_under_its_label():
    from ttscale.strategies.best_of_n import BestOfN

    be = ScriptedBackend(["a \\boxed{1}", "b \\boxed{2}", "c \\boxed{2}"])
    verifier = ScriptedBackend([], score_fn=lambda req: [-1.0 if "1" in req.continuation else -3.0] * 2)
    async with Context(be, seed=0) as ctx:
        res = await BestOfN({"n": 3, "verifier": "loglik"}, verifier_backend=verifier).run(Problem(prompt="q"), ctx)
    assert res.answer == "1"
    assert res.usage.score_calls == 3 and res.usage.by_model["verifier"].score_calls == 3
    assert res.usage.by_model["verifier"].scored_tokens == 6 and res.usage.by_model["scripted"].score_calls == 0

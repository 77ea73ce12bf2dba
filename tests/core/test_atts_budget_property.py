"""Issue 15, acceptance 2 as a property: ATTS under `Budget(total_tokens=B)` never generates more than
B + one token per live branch, draft and target together, whatever B, the number of chains, the step
lengths and the accept/reject pattern (test_child_context.py has the one worked case). Scripted backends
stream one token per delta, so one engine step is one token; a chain has at most one live branch at a time."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.budget import Budget
from ttscale.controller import Context
from ttscale.strategies.atts import ATTS, ATTSCalibration
from ttscale.types import Problem


def words(prefix: str, n: int) -> Script:
    return Script(text=" ".join(f"{prefix}{k}" for k in range(n)), finish_reason="length")


@settings(max_examples=25, deadline=None)
@given(budget=st.integers(1, 300), samples=st.integers(1, 5), step=st.integers(1, 40),
       target_len=st.integers(1, 60), reject_score=st.booleans(), turns=st.integers(1, 6))
def test_atts_never_spends_more_than_the_budget_plus_one_token_per_live_branch(budget, samples, step, target_len,
                                                                            reject_score, turns):
    draft = ScriptedBackend(lambda _req, _i: words("d", step))
    # score -5 per token: perplexity e^5, above every calibration score, so each step is rejected and the
    # target writes; score 0: perplexity 1, below them all, so each step is accepted and drafts go on.
    score = -5.0 if reject_score else 0.0
    target = ScriptedBackend(lambda _req, _i: words("t", target_len),
                             score_fn=lambda req: [score] * len(req.continuation.split()))
    calibration = ATTSCalibration(scores=[1.0, 1.5, 2.0, 2.5, 3.0], problem_ids=["c"], draft="scripted",
                                  target="scripted", step_tokens=step, temperature=0.8)
    strat = ATTS({"samples": samples, "turns": turns, "step_tokens": step, "target_tokens": target_len,
                  "calibration": "offline"}, target_backend=target, calibration=calibration)

    async def run():
        async with Context(draft, seed=0, budget=Budget(total_tokens=budget)) as ctx:
            return await strat.run(Problem(id="p", prompt="What is 3 + 4?"), ctx)

    res = asyncio.run(run())
    u = res.usage
    assert u.generated_tokens <= budget + samples, (u.generated_tokens, res.decision)
    by_model = {name: m.generated_tokens for name, m in u.by_model.items()}
    assert sum(by_model.values()) == u.generated_tokens
    if reject_score and u.generated_tokens > step * samples:
        assert by_model.get("target", 0) > 0, "rejected steps hand over to the target"
    unbounded = samples * turns * (step + (target_len if reject_score else 0))
    if unbounded > budget + samples:
        assert res.decision["budget_hit"] == "total_tokens"

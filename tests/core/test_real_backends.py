"""The baseline strategies and the Context's budgets on real vLLM: in-process and through its
OpenAI-compatible server (the same tests, parametrised over both backends)."""

import pytest

from ttscale import Budget, Pipeline, Problem
from ttscale.answers import vote
from ttscale.controller import Context
from ttscale.types import BranchStatus, SamplingSpec

pytestmark = pytest.mark.vllm

BACKENDS = ["vllm_backend", "openai_backend"]


@pytest.fixture(params=BACKENDS)
def real_backend(request):
    return request.getfixturevalue(request.param)


async def test_self_consistency_runs_and_vote_matches_traces(real_backend):
    pipe = Pipeline(real_backend, "self-consistency:n=8,max_tokens=24,temperature=1.0", seed=3)
    r = await pipe.solve(Problem(id="p", prompt="What is 2 + 2?"))
    assert len(r.traces) == 8
    assert all(t.status is BranchStatus.finished for t in r.traces)
    assert all(0 < t.num_tokens <= 24 for t in r.traces)
    # The recorded vote is exactly the vote over the traces' extracted answers.
    voters = [t for t in r.traces if t.id in r.decision["voters"]]
    again = vote([t.answer for t in voters], order=[t.finish_order for t in voters])
    assert again.answer == r.answer
    u = r.usage
    assert u.generated_tokens == sum(t.num_tokens for t in r.traces)
    assert u.sequential_tokens == max(t.num_tokens for t in r.traces)
    assert u.prompt_tokens > 0 and u.calls == 8


async def test_total_token_budget_on_a_real_backend(real_backend):
    budget, n = 40, 8
    async with Context(real_backend, budget=Budget(total_tokens=budget), seed=1) as ctx:
        bs = ctx.spawn("Count slowly to one hundred.", n, SamplingSpec(max_tokens=200, temperature=1.0))
        await ctx.wait_all(bs)
        await ctx.drain()
        generated = ctx.usage.generated_tokens
    live = n
    assert ctx.budget_hit == "total_tokens"
    assert generated <= budget + live, f"{generated} tokens for a budget of {budget}"
    assert sum(b.status is BranchStatus.aborted for b in bs) >= 1


async def test_best_of_n_loglik_scores_on_real_backend(real_backend):
    pipe = Pipeline(real_backend, "best-of-n:n=3,verifier=loglik,max_tokens=12", seed=5)
    r = await pipe.solve(Problem(prompt="Name a colour."))
    scores = r.decision["scores"]
    assert len(scores) == 3 and all(s < 0 for s in scores.values())
    assert r.decision["chosen"] == max(scores, key=lambda k: scores[k])
    assert r.usage.score_calls == 3

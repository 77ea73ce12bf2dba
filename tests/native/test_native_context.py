"""Native runs through the Context (`ctx.run_native`) on a real EngineBackend: one branch per worker with the
Context's events, cancel (the engine frees the run's blocks), a total-token budget, and usage."""

from __future__ import annotations

import asyncio

import pytest

from ttscale.budget import Budget
from ttscale.controller import Context
from ttscale.strategies.registry import make_strategy
from ttscale.types import BranchStatus, Problem, SamplingSpec

HOGWILD = "hogwild:workers={w},max_tokens={n},final_tokens=2,seed=1,add_examples=false,temperature=1.0"


@pytest.fixture(scope="module")
def engine_backend(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer; no prefix cache, so that a finished request leaves
    no blocks behind and the free-block count is exact."""
    from ttscale.backends.engine import EngineBackend, EngineConfig
    from ttscale.testing import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("native-ctx") / "m", "llama", seed=5)
    be = EngineBackend(EngineConfig(model=str(folder), dtype="float32", device="cpu", num_blocks=512,
                                    prefix_cache=False))
    yield be
    be.engine.close()


async def test_workers_are_branches_with_events_and_usage(engine_backend):
    events = []
    ctx = Context(engine_backend, listeners=[events.append])
    res = await make_strategy(HOGWILD.format(w=2, n=8)).run(Problem(prompt="1+1?"), ctx)
    await ctx.aclose()
    branches = list(ctx.branches.values())
    assert [b.meta["stream"] for b in branches] == ["worker0", "worker1"]
    for b in branches:
        kinds = [e.kind for e in events if e.branch_id == b.id]
        assert kinds[0] == "spawned" and kinds[-1] == "finished" and "delta" in kinds
        assert kinds.count("finished") == 1
        assert sum(e.n_tokens for e in events if e.branch_id == b.id and e.kind == "delta") == b.num_tokens
    alice, bob = res.traces
    assert branches[1].token_ids == bob.token_ids and branches[1].text == bob.text
    assert branches[0].num_tokens == alice.num_tokens + res.decision["final_tokens"]
    u = res.usage
    assert u.generated_tokens == sum(b.num_tokens for b in branches)
    assert u.sequential_tokens == res.decision["forwards"]
    assert u.peak_kv_blocks is not None and u.peak_kv_blocks > 0
    assert u.prompt_tokens == branches[0].prompt_tokens > 0 and branches[1].prompt_tokens == 0


async def test_cancel_mid_run_frees_the_runs_blocks(engine_backend):
    from ttscale.backends.engine.native import HogwildRun

    be = engine_backend
    pool = be.engine.cache.pool
    free0 = pool.num_free
    strat = make_strategy(HOGWILD.format(w=3, n=400))
    spec, _ = strat.build_spec(Problem(prompt="1+1?"), be)
    seen = asyncio.Event()
    ctx = Context(be, listeners=[lambda e: e.kind == "delta" and seen.set()])
    job = HogwildRun(be.engine.model, spec, decode=be.tokenizer.decode, cache=be.engine.cache)
    run = ctx.run_native(job, group="workers")
    await seen.wait()
    ctx.cancel(run.branches[1], reason="test")
    done = await run.finished()
    assert done.finish == "abort" and done.steps < 400
    assert pool.num_free == free0, "the engine freed every block of the run"
    assert {b.status for b in run.branches} == {BranchStatus.aborted}
    assert run.branches[1].meta["abort_reason"] == "test"
    await ctx.aclose()


async def test_cancelling_the_strategy_aborts_the_engine_run(engine_backend):
    """What the proxy does when its client leaves: cancel the strategy's task, close the Context."""
    be = engine_backend
    pool = be.engine.cache.pool
    free0 = pool.num_free
    seen = asyncio.Event()
    ctx = Context(be, listeners=[lambda e: e.kind == "delta" and seen.set()])
    task = asyncio.create_task(make_strategy(HOGWILD.format(w=2, n=400)).run(Problem(prompt="1+1?"), ctx))
    await seen.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await ctx.aclose()
    (b0, b1) = ctx.branches.values()
    assert b0.status is BranchStatus.aborted and b1.status is BranchStatus.aborted
    # a plain request queued now runs after the abort command: once it is done the run's blocks are back
    (plain,) = ctx.spawn("hi", 1, SamplingSpec(max_tokens=2))
    await ctx.wait_all([plain])
    assert plain.status is BranchStatus.finished and pool.num_free == free0


@pytest.mark.parametrize("budget,workers", [(7, 2), (20, 3)])
async def test_total_token_budget_stops_the_run(engine_backend, budget, workers):
    events = []
    ctx = Context(engine_backend, budget=Budget(total_tokens=budget), listeners=[events.append])
    res = await make_strategy(HOGWILD.format(w=workers, n=300)).run(Problem(prompt="1+1?"), ctx)
    await ctx.aclose()
    assert res.decision["run_end"] == "budget"
    assert budget <= res.usage.generated_tokens <= budget + workers
    assert res.decision["forwards"] < 300
    assert [e.text for e in events if e.kind == "budget"] == ["total_tokens"]


async def test_a_spent_budget_refuses_a_new_native_run(engine_backend):
    from ttscale.backends.engine.native import HogwildRun
    from ttscale.errors import TTScaleError

    be = engine_backend
    ctx = Context(be, budget=Budget(total_tokens=3))
    (b,) = ctx.spawn("hi", 1, SamplingSpec(max_tokens=3))
    await ctx.wait_all([b])
    spec, _ = make_strategy(HOGWILD.format(w=2, n=5)).build_spec(Problem(prompt="1+1?"), be)
    with pytest.raises(TTScaleError, match="budget"):
        ctx.run_native(HogwildRun(be.engine.model, spec, cache=be.engine.cache))
    await ctx.aclose()

"""Issue 15, acceptance 1 for ParaThinker (Hogwild's are in test_native_context.py, test_native_runs.py and
test_native_serve.py): a ParaThinker run is a set of Context branches on a real EngineBackend, so it can be
cancelled mid-run (every KV block back), stops at a total-token budget within one step per path, and streams
through `ttscale serve` (uvicorn, the openai client). Model: a tiny random Qwen2 in the authors' checkpoint
layout (control tokens, thought embeddings), built by test_parathinker.py's helper."""

from __future__ import annotations

import asyncio

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.server import running_proxy
from tests.native.test_native_runs import _drive, _engine, _parathinker, _streams
from tests.native.test_parathinker import _authors_checkpoint
from ttscale.budget import Budget
from ttscale.controller import Context
from ttscale.server.app import ServeConfig
from ttscale.strategies.registry import make_strategy
from ttscale.types import BranchStatus, Problem, SamplingSpec

PARATHINKER = "parathinker:paths={p},max_tokens={n},summary_max_tokens=4,seed=1,temperature=1.0"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _authors_checkpoint(tmp_path_factory.mktemp("parathinker-runs"), True)


@pytest.fixture(scope="module")
def engine_backend(checkpoint):
    """No prefix cache, so a finished or aborted run leaves no blocks behind and the free count is exact."""
    from ttscale.backends.engine import EngineBackend, EngineConfig

    be = EngineBackend(EngineConfig(model=str(checkpoint), dtype="float32", device="cpu", num_blocks=512,
                                    prefix_cache=False))
    yield be
    be.engine.close()


async def test_cancelling_a_path_mid_run_aborts_the_run_and_frees_its_blocks(engine_backend):
    pool = engine_backend.engine.cache.pool
    free0 = pool.num_free
    deltas: list[str] = []
    seen = asyncio.Event()

    def on_event(e):
        if e.kind == "delta":
            deltas.append(e.branch_id)
            seen.set()

    ctx = Context(engine_backend, listeners=[on_event])
    task = asyncio.create_task(make_strategy(PARATHINKER.format(p=3, n=400)).run(Problem(prompt="2+2?"), ctx))
    await seen.wait()
    assert pool.num_free < free0, "the run holds blocks while it thinks"
    path = next(b for b in ctx.branches.values() if b.meta.get("stream") == "path2")
    ctx.cancel(path, reason="test")
    res = await task
    await ctx.aclose()
    assert res.decision["run_end"] == "abort"
    assert max(t.num_tokens for t in res.traces[:3]) < 400, "stopped mid-run, not at max_tokens"
    assert {b.status for b in ctx.branches.values()} == {BranchStatus.aborted}
    assert path.meta["abort_reason"] == "test"
    assert pool.num_free == free0, "the engine freed every block of the run"


async def test_cancelling_the_strategy_aborts_the_engine_run(engine_backend):
    """What the proxy does when its client leaves: cancel the strategy's task, close the Context."""
    pool = engine_backend.engine.cache.pool
    free0 = pool.num_free
    seen = asyncio.Event()
    ctx = Context(engine_backend, listeners=[lambda e: e.kind == "delta" and seen.set()])
    task = asyncio.create_task(make_strategy(PARATHINKER.format(p=2, n=400)).run(Problem(prompt="2+2?"), ctx))
    await seen.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await ctx.aclose()
    assert {b.status for b in ctx.branches.values()} == {BranchStatus.aborted}
    # a plain request queued now runs after the abort command: once it is done the run's blocks are back
    ctx2 = Context(engine_backend)
    (plain,) = ctx2.spawn("hi", 1, SamplingSpec(max_tokens=2))
    await ctx2.wait_all([plain])
    await ctx2.aclose()
    assert plain.status is BranchStatus.finished and pool.num_free == free0


@pytest.mark.parametrize("budget,paths", [(5, 2), (17, 3)])
async def test_total_token_budget_stops_the_run_within_one_step_per_path(engine_backend, budget, paths):
    events = []
    ctx = Context(engine_backend, budget=Budget(total_tokens=budget), listeners=[events.append])
    res = await make_strategy(PARATHINKER.format(p=paths, n=300)).run(Problem(prompt="2+2?"), ctx)
    await ctx.aclose()
    assert res.decision["run_end"] == "budget"
    assert budget <= res.usage.generated_tokens <= budget + paths
    # the engine's count: it includes tokens of the last step that reached no branch once the budget
    # closed them (ttscale/native_runs.py folds those in)
    assert res.usage.generated_tokens >= sum(b.num_tokens for b in ctx.branches.values())
    assert [e.text for e in events if e.kind == "budget"] == ["total_tokens"]


@settings(max_examples=6, deadline=None)
@given(cap=st.integers(1, 30))
def test_a_token_cap_stops_a_stepped_run_within_one_step_per_path(native_pair, cap):
    """In the engine's own loop: the run ends after the step that reaches `max_generated` (3 paths write
    at most 3 tokens a step)."""
    _, model = native_pair
    from ttscale.backends.engine.native import ParaThinkerRun

    eng = _engine(model)
    free0 = eng.cache.pool.num_free
    got: list = []
    eng.add_native("r", ParaThinkerRun(model, _parathinker(5), cache=eng.cache), got.append, max_generated=cap)
    _drive(eng)
    done = got[-1]
    if done.finish == "done":  # the run ended by itself before the cap: nothing to check against it
        assert sum(done.generated) < cap
    else:
        assert done.finish == "budget" and cap <= sum(done.generated) <= cap + 3 - 1
    assert sum(len(t) for t in _streams(got, 4)) == sum(done.generated)
    assert eng.cache.pool.num_free == free0


def test_parathinker_streams_its_paths_and_summary_through_serve(engine_backend):
    with running_proxy(ServeConfig(served_model_name="tiny-parathinker", max_n=4), backend=engine_backend) as p:
        c = openai.OpenAI(base_url=f"{p.url}/v1", api_key="x", max_retries=0, timeout=300)
        chunks = list(c.chat.completions.create(
            model="parathinker-2/tiny-parathinker", messages=[{"role": "user", "content": "What is 2+2?"}],
            max_tokens=6, stream=True, stream_options={"include_usage": True},
            extra_body={"ttscale": {"progress": "deltas"}}))
    events = [ch.model_extra["ttscale"] for ch in chunks if (ch.model_extra or {}).get("ttscale")]
    deltas = [e for e in events if e.get("event") == "delta"]
    spawned = [e["branch"] for e in events if e.get("event") == "spawned"]
    assert len(spawned) == 3  # path1, path2, summary
    assert {e["branch"] for e in deltas} <= set(spawned) and len({e["branch"] for e in deltas}) >= 2
    done = events[-1]
    assert done["event"] == "done" and done["strategy"].startswith("parathinker")
    assert done["decision"]["mode"] == "native"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == sum(e["n_tokens"] for e in deltas)
    assert usage.model_extra["ttscale"]["branches"] == 3

"""Strategies against real backends: FFS on in-process vLLM and through a vLLM OpenAI server; ATTS with a
draft and a target that are two different real models (vLLM on a tiny Llama, our engine on a tiny Qwen2).

The tiny random-weight models almost never sample EOS, so FFS gets an explicit set of stop token ids
(about 0.2% of the vocabulary): each trace then ends at a random length, like reasoning traces do, and the
first to end wins while the others are still far from `max_tokens`.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.fixtures.real_backends import running_requests
from ttscale.controller import Context
from ttscale.strategies.atts import ATTS
from ttscale.strategies.registry import make_strategy
from ttscale.types import BranchStatus, Problem

pytestmark = pytest.mark.vllm

P = Problem(id="race", prompt="Count to ten.")
STOP_IDS = list(range(1000, 1100))
MAX_TOKENS = 1500


def ffs(n: int = 8):
    return make_strategy("ffs", n=n, max_tokens=MAX_TOKENS, temperature=1.0, top_p=1.0, stop_token_ids=STOP_IDS)


def check_race(res) -> None:
    win = next(t for t in res.traces if t.id == res.decision["winner"])
    losers = [t for t in res.traces if t.id != win.id]
    assert win.status is BranchStatus.finished and win.finish_reason == "stop"
    assert win.token_ids[-1] in STOP_IDS and win.num_tokens < MAX_TOKENS
    assert len(losers) == 7
    assert all(t.status is BranchStatus.aborted and t.finish_reason == "abort" for t in losers)
    # the losers were stopped mid-way: no stop token at their end, far from max_tokens
    assert all(t.num_tokens < MAX_TOKENS and (not t.token_ids or t.token_ids[-1] not in STOP_IDS) for t in losers)
    assert win.finish_order == min(t.finish_order for t in res.traces)
    assert res.usage.aborted == 7 and res.usage.branches == 8
    assert res.usage.unspent_token_cap == sum(MAX_TOKENS - t.num_tokens for t in losers) > 0


async def wait_until(pred, deadline_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not await pred():
        assert time.monotonic() - t0 < deadline_s, f"{what} after {deadline_s}s"
        await asyncio.sleep(0.02)  # polling interval, bounded by the deadline
    return time.monotonic() - t0


async def test_async_ffs_on_inprocess_vllm_aborts_the_other_seven(vllm_backend):
    async with Context(vllm_backend, seed=3) as ctx:
        res = await ffs().run(P, ctx)
        await ctx.drain()

    async def engine_idle() -> bool:
        return vllm_backend.num_unfinished_requests() == 0

    # the seven losers had ~1,400 tokens each left: only an abort empties the engine this fast
    await wait_until(engine_idle, 2.0, "vLLM still holds requests")
    check_race(res)


async def test_async_ffs_through_the_openai_server_aborts_on_the_server(openai_backend, vllm_server):
    async with Context(openai_backend, seed=3) as ctx:
        res = await ffs().run(P, ctx)
        await ctx.drain()

    async def server_idle() -> bool:
        return await running_requests(vllm_server.base_url) == 0

    await wait_until(server_idle, 2.0, "the server still runs requests")
    check_race(res)


@pytest.fixture(scope="session")
def target_engine(tmp_path_factory):
    """Our engine on a second tiny model (Qwen2 architecture, other seed): a different real model."""
    from ttscale.backends.engine import EngineBackend, EngineConfig
    from ttscale.testing import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2", seed=1)
    be = EngineBackend(EngineConfig(model=str(path), dtype="float32", device="cpu", kv_memory_gb=0.05))
    yield be
    be.engine.close()


@pytest.mark.parametrize("alpha", [0.4, 1.0])
async def test_atts_runs_draft_and_target_as_two_real_models(vllm_backend, target_engine, alpha):
    strat = ATTS({"samples": 3, "turns": 3, "step_tokens": 12, "target_tokens": 6, "calibration": "conditional",
                  "rule": "p_value", "alpha": alpha, "seed": 0}, target_backend=target_engine)
    strat.check(vllm_backend)
    async with Context(vllm_backend, seed=0) as ctx:
        res = await strat.run(P, ctx)
    steps = [s for chain in res.decision["chains"] for s in chain]
    assert len(steps) == 9  # 3 chains x 3 turns (random models write no \boxed{})
    assert all(s["ppl"] > 1.0 for s in steps)
    assert res.usage.score_calls == 9 and res.usage.scored_tokens > 0
    judged = [s for s in steps if s["p_value"] is not None]
    rejected = [s for s in judged if s["rejected"]]
    # every turn is tested, the first included (against the pool its own chain's first score joined)
    assert len(judged) == 9 and all((s["p_value"] <= alpha) == s["rejected"] for s in judged)
    if alpha == 1.0:  # every judged step is rejected: the target model writes after each one
        assert len(rejected) == 9
    target_traces = [t for t in res.traces if t.id.startswith("t")]
    assert len(target_traces) == len(rejected)
    draft_tokens = sum(t.num_tokens for t in res.traces if t.id.startswith("b"))
    assert res.usage.generated_tokens == draft_tokens + sum(t.num_tokens for t in target_traces)


async def test_llm_judge_through_real_vllm_reads_top_logprobs(vllm_backend):
    from ttscale.judges.pairwise import LLMJudge

    j = LLMJudge(vllm_backend)
    p = await j.ap_same("Since 2 + 2 = 4, the answer is 4.", "Adding 2 and 2 gives 4.")
    assert 0.0 <= p <= 1.0
    # a random model rarely puts yes/no in its top 20: then the judge says 0.5 and counts it as undecided
    assert (p == 0.5) == (j.undecided == 1)
    assert j.usage.calls == 1 and j.usage.generated_tokens == 1 and j.usage.prompt_tokens > 20

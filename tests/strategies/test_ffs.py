"""FFS family decision logic on the scripted backend and sync-FFS on our engine (a tiny random model);
real-backend races on vLLM are in test_real_backends.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from ttscale.backends.base import BackendBase
from ttscale.backends.engine import EngineBackend
from ttscale.backends.scripted import Script, ScriptedBackend, branch_key
from ttscale.controller import Context
from ttscale.strategies.registry import make_strategy
from ttscale.types import BranchStatus, Delta, GenerationRequest, Problem

P = Problem(id="p", prompt="What is 1+1?")


def words(n: int, answer: str) -> str:
    return " ".join(["step"] * n + [f"\\boxed{{{answer}}}"])


async def run(spec: str, scripts, **kw):
    be = ScriptedBackend(scripts)
    strat = make_strategy(spec, **kw)
    async with Context(be, seed=0) as ctx:
        res = await strat.run(P, ctx)
    return be, res


async def test_first_finished_wins_and_the_rest_are_aborted():
    lengths = [30, 12, 25, 40]
    scripts = [Script(text=words(n, str(i)), delay_s=0.002) for i, n in enumerate(lengths)]
    be, res = await run("ffs:n=4,max_tokens=100", scripts)
    assert res.answer == "1" and res.decision["winner"] == "b1"
    assert {"b0", "b2", "b3"} <= set(be.aborted)
    assert all(be.tokens_sent[f"b{i}"] < lengths[i] + 1 for i in (0, 2, 3))  # losers stopped mid-script
    aborted = [t for t in res.traces if t.id != "b1"]
    assert all(t.status is BranchStatus.aborted and t.finish_reason == "abort" for t in aborted)
    assert res.usage.aborted == 3
    assert res.usage.unspent_token_cap == sum(100 - t.num_tokens for t in aborted) > 0
    assert res.usage.sequential_tokens == 13 and res.fallbacks == []


async def test_ffs_estimates_saved_tokens_from_the_winner_not_from_max_tokens():
    # the losers stream 4x slower: when b0 ends at 13 tokens they have about 3; max_tokens is 32K
    scripts = [Script(text=words(12, "1"), delay_s=0.002)] + [Script(text=words(60, "2"), delay_s=0.008)] * 3
    _, res = await run("ffs:n=4,max_tokens=32768", scripts)
    losers = [t for t in res.traces if t.id != "b0"]
    assert res.decision["winner"] == "b0" and all(t.status is BranchStatus.aborted for t in losers)
    # estimate: each loser would have needed to reach the winner's 13 tokens; the cap is 32768 - generated
    assert res.usage.saved_tokens == sum(13 - t.num_tokens for t in losers) > 0
    assert res.usage.unspent_token_cap == sum(32768 - t.num_tokens for t in losers)
    assert res.usage.saved_tokens < 40 and res.usage.unspent_token_cap > 90_000


async def test_length_limit_counts_as_finishing():
    scripts = [Script(text=words(50, "a"), delay_s=0.001), Script(text=words(50, "b"), delay_s=0.004)]
    be, res = await run("ffs:n=2,max_tokens=10", scripts)
    win = next(t for t in res.traces if t.id == res.decision["winner"])
    assert win.id == "b0" and win.finish_reason == "length"
    assert "b1" in be.aborted and be.tokens_sent["b1"] < 10


async def test_sync_ffs_keeps_the_fewest_tokens_finisher_even_when_it_streams_slower():
    # b0 ends after 11 tokens but streams slowly; b1 (31 tokens) and b2 (41) stream fast, b1 finishes first
    scripts = [Script(text=words(10, "short"), delay_s=0.02), Script(text=words(30, "fast"), delay_s=0.001),
               Script(text=words(40, "long"), delay_s=0.001)]
    be, res = await run("sync-ffs:n=3,max_tokens=100", scripts)
    assert res.decision["winner"] == "b0" and res.answer == "short" and res.decision["winner_tokens"] == 11
    assert "b0" in res.decision["waited_for"]
    st = {t.id: t for t in res.traces}
    assert st["b1"].status is BranchStatus.finished and st["b1"].finish_order < st["b0"].finish_order
    assert st["b2"].status is BranchStatus.aborted and "b2" in be.aborted and st["b2"].num_tokens >= 11
    assert res.fallbacks == []
    _, async_res = await run("ffs:n=3,max_tokens=100", scripts)  # async FFS: the first to finish wins
    assert async_res.decision["winner"] == "b1" and async_res.answer == "fast"
    _, res2 = await run("ffs:n=3,mode=sync,max_tokens=100", scripts)
    assert res2.decision["winner"] == "b0"


async def test_sync_ffs_aborts_a_trace_once_it_has_as_many_tokens_as_the_best_finisher():
    # b0 finishes at 6 tokens; b1 streams 200 tokens fast and must be stopped near 6, not run on
    scripts = [Script(text=words(5, "a"), delay_s=0.002), Script(text=words(199, "b"), delay_s=0.002)]
    be, res = await run("sync-ffs:n=2,max_tokens=300", scripts)
    assert res.decision["winner"] == "b0" and "b1" in be.aborted
    assert 6 <= be.tokens_sent["b1"] < 50


async def test_ffs_k_votes_over_the_k_first():
    # finishing order b3 (4 words), b1 (6), b0 (8), then b2 (20): k=3 votes over b3, b1, b0
    scripts = [Script(text=words(n, a), delay_s=0.002) for n, a in [(8, "5"), (6, "7"), (20, "7"), (4, "5")]]
    be, res = await run("ffs-k:n=4,k=3", scripts)
    assert res.decision["voters"] == ["b3", "b1", "b0"]
    assert res.answer == "5"  # 2 votes for 5 against 1 for 7
    assert be.tokens_sent["b2"] < 21 and res.traces[2].status is BranchStatus.aborted
    _, sc = await run("sc:n=4", scripts)  # the vote over all four runs b2 to its end
    assert sc.traces[2].status is BranchStatus.finished
    assert sc.usage.generated_tokens > res.usage.generated_tokens


async def test_short_m_stops_once_m_finished():
    scripts = [Script(text=words(n, a), delay_s=0.002) for n, a in [(3, "1"), (30, "2"), (5, "2"), (40, "3")]]
    be, res = await run("short-m:k=4,m=2", scripts)
    assert res.decision["voters"] == ["b0", "b2"]
    assert res.answer == "1"  # a 1-1 tie goes to the shortest (earliest finished)
    assert [t.id for t in res.traces if t.status is BranchStatus.aborted] == ["b1", "b3"]
    assert be.tokens_sent["b1"] < 31 and be.tokens_sent["b3"] < 41
    _, sc = await run("sc:n=4", scripts)  # the vote over all four: 2 wins, nothing aborted
    assert sc.answer == "2" and sc.usage.aborted == 0


async def test_last_finish_takes_the_longest():
    scripts = [Script(text=words(n, str(n)), delay_s=0.001) for n in (5, 15, 9)]
    _be, res = await run("last-finish:n=3", scripts)
    assert res.answer == "15" and all(t.status is BranchStatus.finished for t in res.traces)
    _, sc = await run("sc:n=3", scripts)  # three one-vote classes: the earliest finisher's wins
    assert sc.answer == "5"


async def test_no_finisher_gives_no_answer_and_says_so():
    scripts = [Script(text="x", error="boom")] * 2
    _, res = await run("ffs:n=2", scripts)
    assert res.answer is None and res.decision["winner"] is None
    assert res.decision["log"][0]["message"] == "no trace finished"


async def test_a_backend_without_abort_is_reported():
    be = ScriptedBackend([Script(text=words(n, "1"), delay_s=0.001) for n in (3, 9)])
    be.capabilities = be.capabilities.model_copy(update={"abort": False})
    async with Context(be, seed=0) as ctx:
        res = await make_strategy("ffs:n=2").run(P, ctx)
    assert res.fallbacks and "no abort" in res.fallbacks[0]


# ------------------------------------------------------------------------- sync-FFS on our engine

ENGINE_STOP_IDS = list(range(1000, 1600))  # about 1% of the vocabulary: traces end at random lengths


class HeldBackend(BackendBase):
    """Our engine, with one branch's stream held back until another branch has finished.

    The engine decodes the held branch in the same steps as the others (its outputs queue up), so its
    tokens are the same as without holding; it only reaches the strategy last, like a slow stream.
    """

    name = "engine-held"

    def __init__(self, inner: EngineBackend, held: str):
        self.inner = inner
        self.held = held
        self.capabilities = inner.capabilities
        self.other_finished = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        held = branch_key(request.request_id) == self.held
        async with contextlib.aclosing(self.inner.generate(request)) as stream:
            async for d in stream:
                if held:
                    await self.other_finished.wait()
                elif d.finished:
                    self.other_finished.set()
                yield d

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from ttscale.backends.engine import EngineConfig
    from ttscale.testing import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-ffs", arch="llama", seed=0)
    be = EngineBackend(EngineConfig(model=str(path), dtype="float32", device="cpu", num_blocks=512,
                                    prefix_cache=False))
    yield be
    be.engine.close()


def engine_ffs(spec: str):
    return make_strategy(spec, n=4, max_tokens=400, temperature=1.0, top_p=1.0, seed=7,
                         stop_token_ids=ENGINE_STOP_IDS)


async def test_sync_ffs_on_the_engine_picks_the_fewest_tokens_whatever_the_stream_speed(tiny_engine):
    async with Context(tiny_engine) as ctx:  # every trace to its natural end: the reference lengths
        full = await engine_ffs("last-finish").run(P, ctx)
    natural = {t.id: t for t in full.traces}
    assert all(t.status is BranchStatus.finished and t.token_ids[-1] in ENGINE_STOP_IDS for t in full.traces)
    shortest = min(natural.values(), key=lambda t: t.num_tokens)
    assert sorted(t.num_tokens for t in full.traces).count(shortest.num_tokens) == 1

    held = HeldBackend(tiny_engine, held=shortest.id)  # the shortest trace streams last
    async with Context(held) as ctx:
        res = await engine_ffs("sync-ffs").run(P, ctx)
    win = next(t for t in res.traces if t.id == res.decision["winner"])
    assert win.id == shortest.id and win.token_ids == natural[shortest.id].token_ids
    others = [t for t in res.traces if t.id != win.id]
    # another trace finished first, yet lost; the rest were stopped once as long as the winner
    assert any(t.status is BranchStatus.finished and t.finish_order < win.finish_order for t in others)
    assert all(t.num_tokens >= win.num_tokens for t in others)
    assert shortest.id in res.decision["waited_for"]

    held = HeldBackend(tiny_engine, held=shortest.id)
    async with Context(held) as ctx:  # async FFS on the same streams: the first to arrive wins
        fast = await engine_ffs("ffs").run(P, ctx)
    assert fast.decision["winner"] != shortest.id
    assert fast.decision["winner_tokens"] > shortest.num_tokens

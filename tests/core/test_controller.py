"""Context semantics on the scripted backend: races, cancellation, budgets, usage, limits, events."""


import pytest

from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.budget import Budget, Limits
from ttscale.controller import Context
from ttscale.types import BranchStatus, SamplingSpec


def words(n, delay=0.0, reason="stop"):
    return Script(text=" ".join(f"w{i}" for i in range(n)), delay_s=delay, finish_reason=reason)


async def test_first_finished_returns_in_finish_order_and_cancel_rest_aborts():
    be = ScriptedBackend([words(40, 0.002), words(5, 0.002), words(20, 0.002), words(10, 0.002)])
    async with Context(be) as ctx:
        bs = ctx.spawn("q", 4, SamplingSpec(max_tokens=100))
        (first,) = await ctx.first_finished(bs)
        assert first is bs[1]
        two = await ctx.first_finished(bs, k=2)
        assert [b.id for b in two] == [bs[1].id, bs[3].id]
        aborted = ctx.cancel_rest(keep=two)
        assert {b.id for b in aborted} == {bs[0].id, bs[2].id}
        await ctx.drain()
        assert bs[0].status is BranchStatus.aborted and bs[0].finish_reason == "abort"
        assert set(be.aborted) >= {bs[0].id, bs[2].id}
        assert {bs[1].id, bs[3].id} <= set(be.completed) and not {bs[1].id, bs[3].id} & set(be.aborted)
        u = ctx.usage
        assert u.aborted == 2
        assert u.unspent_token_cap == (100 - bs[0].num_tokens) + (100 - bs[2].num_tokens)
        # the estimate: each aborted branch would have run as long as the median finisher
        typical = (bs[1].num_tokens + bs[3].num_tokens) / 2
        assert u.saved_tokens == int(sum(max(0.0, typical - b.num_tokens) for b in (bs[0], bs[2])))
        assert u.generated_tokens == sum(b.num_tokens for b in bs)


async def test_cancelled_branch_gets_no_more_tokens():
    be = ScriptedBackend([words(1000, 0.001)])
    async with Context(be) as ctx:
        (b,) = ctx.spawn("q", 1, SamplingSpec(max_tokens=2000))
        async for ev in ctx.watch([b]):
            if ev.kind == "delta" and b.num_tokens >= 5:
                ctx.cancel(b)
        n = b.num_tokens
        await ctx.drain()
        assert b.num_tokens == n
        assert be.tokens_sent[b.id] <= n + 1
        assert b.id in be.aborted


async def test_total_token_budget_aborts_everything():
    be = ScriptedBackend([words(500, 0.0005)])
    budget = 300
    async with Context(be, budget=Budget(total_tokens=budget)) as ctx:
        bs = ctx.spawn("q", 8, SamplingSpec(max_tokens=1000))
        await ctx.wait_all(bs)
        assert ctx.budget_hit == "total_tokens"
        live = 8
        assert ctx.usage.generated_tokens <= budget + live
        assert all(b.done for b in bs)
        with pytest.raises(Exception, match="budget"):
            ctx.spawn("q", 1)


async def test_budget_clamps_max_tokens_of_new_branches():
    be = ScriptedBackend([words(50)])
    async with Context(be, budget=Budget(total_tokens=60)) as ctx:
        (a,) = ctx.spawn("q", 1, SamplingSpec(max_tokens=100))
        await ctx.wait_all([a])
        (b,) = ctx.spawn("q", 1, SamplingSpec(max_tokens=100))
        assert b.request.sampling.max_tokens == 10
        await ctx.wait_all([b])
        assert b.finish_reason == "length" and ctx.usage.generated_tokens == 60


async def test_sequential_budget_and_critical_path():
    be = ScriptedBackend([words(30), words(10), words(20)])
    async with Context(be) as ctx:
        first = ctx.spawn("q", 2, SamplingSpec(max_tokens=100))  # 30 and 10 tokens, in parallel
        await ctx.wait_all(first)
        (second,) = ctx.spawn("q", 1, SamplingSpec(max_tokens=100))  # after both: base 30
        await ctx.wait_all([second])
        assert second.seq_base == 30
        assert ctx.usage.sequential_tokens == 50
        (indep,) = ctx.spawn("q", 1, SamplingSpec(max_tokens=100), after=[])
        assert indep.seq_base == 0
        await ctx.wait_all([indep])
    be = ScriptedBackend([words(100, 0.0005)])
    async with Context(be, budget=Budget(sequential_tokens=25)) as ctx:
        bs = ctx.spawn("q", 3, SamplingSpec(max_tokens=1000))
        await ctx.wait_all(bs)
        assert all(b.num_tokens <= 25 for b in bs)
        assert ctx.usage.sequential_tokens <= 25


async def test_wall_deadline_aborts():
    be = ScriptedBackend([words(10_000, 0.001)])
    async with Context(be, budget=Budget(wall_time_s=0.05)) as ctx:
        bs = ctx.spawn("q", 2, SamplingSpec(max_tokens=20_000))
        await ctx.wait_all(bs)
        assert ctx.budget_hit == "wall_time_s"
        assert all(b.status is BranchStatus.aborted for b in bs)


async def test_concurrency_limit_is_respected():
    running = 0
    peak = 0

    class Counting(ScriptedBackend):
        async def generate(self, request):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                async for d in super().generate(request):
                    yield d
            finally:
                running -= 1

    be = Counting([words(20, 0.001)])
    async with Context(be, limits=Limits(max_concurrency=3)) as ctx:
        bs = ctx.spawn("q", 10, SamplingSpec(max_tokens=100))
        await ctx.wait_all(bs)
    assert peak == 3
    assert all(b.status is BranchStatus.finished for b in bs)


async def test_rate_limit_spaces_requests():
    be = ScriptedBackend([words(1)])
    async with Context(be, limits=Limits(requests_per_s=5)) as ctx:
        bs = ctx.spawn("q", 10, SamplingSpec(max_tokens=10))
        await ctx.wait_all(bs)
    starts = sorted(b.first_token_at for b in bs)
    # 10 requests at 5/s: the last cannot start within the first second's window.
    assert starts[-1] - starts[0] >= 0.9


async def test_failed_request_fails_one_branch_only():
    be = ScriptedBackend([Script(error="boom"), words(3)])
    async with Context(be) as ctx:
        bs = ctx.spawn("q", 2)
        await ctx.wait_all(bs)
    assert bs[0].status is BranchStatus.failed and "boom" in (bs[0].error or "")
    assert bs[1].status is BranchStatus.finished


async def test_events_are_observable_in_order():
    be = ScriptedBackend([words(3)])
    seen = []
    async with Context(be, listeners=[lambda e: seen.append((e.kind, e.branch_id))]) as ctx:
        (b,) = ctx.spawn("q", 1)
        await ctx.wait_all([b])
    kinds = [k for k, _ in seen]
    assert kinds[0] == "spawned" and kinds[-1] == "finished" and kinds.count("delta") == 3


async def test_seeds_are_per_branch_and_reproducible():
    be = ScriptedBackend([words(1)])
    async with Context(be, seed=7) as ctx:
        a = ctx.spawn("q", 3)
    async with Context(be, seed=7) as ctx2:
        b = ctx2.spawn("q", 3)
    sa = [x.request.sampling.seed for x in a]
    assert sa == [x.request.sampling.seed for x in b] and len(set(sa)) == 3
    async with Context(be) as ctx3:
        c = ctx3.spawn("q", 3, SamplingSpec(seed=100))
    assert [x.request.sampling.seed for x in c] == [100, 101, 102]


async def test_spawn_rejects_bad_n():
    async with Context(ScriptedBackend(["a"])) as ctx:
        with pytest.raises(ValueError, match="n >= 1"):
            ctx.spawn("q", 0)


async def test_fork_without_shared_kv_reissues_with_the_parent_text():
    be = ScriptedBackend([words(50, 0.001), words(3), words(3)])
    async with Context(be) as ctx:
        (parent,) = ctx.spawn("q", 1, SamplingSpec(max_tokens=100))
        async for _ in ctx.watch([parent]):
            if parent.num_tokens >= 5:
                break
        kids = ctx.fork(parent, 2)
        await ctx.wait_all(kids)
        for k in kids:
            assert k.parent == parent.id and k.meta["fork"] == "re-prefill"
            assert k.seq_base >= 5
            msgs = k.request.messages
            assert msgs[-1]["role"] == "assistant" and msgs[-1]["content"] == k.meta["prefix_text"]
            assert k.request.continue_final_message
            assert k.request.sampling.max_tokens == 100 - len(k.meta["prefix_text"].split())


async def test_request_ids_are_unique_across_contexts_on_one_backend():
    be = ScriptedBackend([words(2)])
    async with Context(be) as c1, Context(be) as c2:
        a, b = c1.spawn("q", 2), c2.spawn("q", 2)
        await c1.wait_all(a)
        await c2.wait_all(b)
    rids = [x.request.request_id for x in a + b]
    assert len(set(rids)) == 4 and [x.id for x in a] == [x.id for x in b]

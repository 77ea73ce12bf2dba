"""The Context on our engine: fork shares KV and, under greedy decoding, children continue exactly as the
parent does; strategies run unchanged on the engine."""

from ttscale import Pipeline, Problem
from ttscale.controller import Context
from ttscale.types import BranchStatus, SamplingSpec


async def test_greedy_fork_children_continue_like_the_parent(smollm2_backend):
    greedy = SamplingSpec(temperature=0.0, max_tokens=24)
    async with Context(smollm2_backend) as ctx:
        (parent,) = ctx.spawn("Name three primary colours.", 1, greedy)
        async for _ in ctx.watch([parent]):
            if parent.num_tokens >= 6:
                break
        at = parent.num_tokens
        kids = ctx.fork(parent, 2)
        await ctx.wait_all([parent, *kids])
    assert all(k.meta["fork"] == "shared_kv" for k in kids)
    # The engine forks at its own current position, which may be a step or two ahead of what had been
    # streamed to us when we asked; the children then continue exactly like the parent from there.
    for k in kids:
        assert k.status is BranchStatus.finished and k.token_ids
        matches = [d for d in range(at, at + 4)
                   if parent.token_ids[d:d + len(k.token_ids)] == k.token_ids[:len(parent.token_ids) - d]]
        assert matches, (parent.token_ids[at:], k.token_ids)


async def test_self_consistency_on_the_engine(smollm2_backend):
    r = await Pipeline(smollm2_backend, "sc:n=4,max_tokens=32", seed=0).solve(Problem(prompt="What is 2 + 3?"))
    assert len(r.traces) == 4 and r.usage.generated_tokens == sum(t.num_tokens for t in r.traces)

"""ParScale (arXiv 2505.10475): sample from a model that runs P parallel streams and aggregates them.

The parallelism lives in the model: a `qwen2_parscale` checkpoint served by a backend with
`parallel_streams` (`ttscale.backends.engine.parscale_model.ParScaleBackend`: P sequences with their own
prefix-KV segments, aggregation of the final hidden states, sampling from the aggregate). The strategy
draws `n` samples from it (default one) and majority-votes when n > 1.
"""

from __future__ import annotations

from pydantic import Field

from ttscale.answers import vote
from ttscale.controller import Context
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import BranchStatus, Problem, Result


class ParScaleConfig(StrategyConfig):
    n: int = Field(1, ge=1, le=256, description="samples drawn from the aggregated model (vote when > 1)")


@register("parscale")
class ParScale(Strategy):
    """Samples from a ParScale model's aggregate distribution (needs `parallel_streams`)."""

    Config = ParScaleConfig
    needs = ("parallel_streams",)
    needs_why = "serve a qwen2_parscale checkpoint with ParScaleBackend"
    paper = "arXiv 2505.10475"

    async def run(self, problem: Problem, ctx: Context) -> Result:
        self.check(ctx.backend)
        c = self.config
        if ctx.backend.capabilities.chat:
            source = self.messages(problem)
        else:
            msgs = self.messages(problem)
            source_text = "\n\n".join(str(m.get("content", "")) for m in msgs) + "\n"
            from ttscale.types import GenerationRequest

            source = GenerationRequest(request_id="parscale", prompt=source_text)
        branches = ctx.spawn(source, c.n, c.sampling(), after=[])
        await ctx.wait_all(branches)
        traces = [self.trace(b, problem) for b in branches]
        done = [t for t in traces if t.status is BranchStatus.finished]
        v = vote([t.answer for t in done], order=[t.finish_order or 0 for t in done], kind=problem.kind)
        text = done[v.winner_members[0]].text if v.winner_members else (traces[0].text if traces else None)
        return self.result(problem, ctx, answer=v.answer, traces=traces, decision=v.as_dict(), text=text)

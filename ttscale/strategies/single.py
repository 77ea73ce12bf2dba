"""Single sample: one branch, its answer. The floor every strategy is compared with.

Paper: chain-of-thought prompting (Wei et al. 2022, arXiv 2201.11903) is what the step-by-step system
prompt asks for; there is nothing else to follow. Authors' code: none. Deviations: none; the answer is
extracted with the same rules as every other strategy (`ttscale.answers`).
"""

from __future__ import annotations

from ttscale.controller import Context
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import Problem, Result


@register("single", "single-sample", "cot")
class SingleSample(Strategy[StrategyConfig]):
    """Sample once and extract the answer."""

    Config = StrategyConfig

    async def run(self, problem: Problem, ctx: Context) -> Result:
        (b,) = ctx.spawn(self.messages(problem), 1, self.config.sampling())
        await ctx.wait_all([b])
        t = self.trace(b, problem)
        return self.result(problem, ctx, answer=t.answer, traces=[t], text=b.text)

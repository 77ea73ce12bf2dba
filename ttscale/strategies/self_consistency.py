"""Self-consistency (Wang et al. 2022) and weighted vote.

Paper: "Self-Consistency Improves Chain of Thought Reasoning in Language Models", arXiv 2203.11171.
Authors' code: none public. What we follow: sample n traces, extract answers, majority vote. Where we
deviate: answers are grouped by equivalence (math-verify, choices by letter) rather than exact string
match; ties go to the class whose earliest member finished first (`ttscale.answers.vote`; the paper does
not say); n defaults to 8 (the paper samples 40).

Weighted vote weighs each trace by a confidence:
- `mean_logprob`: the length-normalised probability exp(mean token logprob), the paper's "normalized
  weighted sum" variant.
- `self_certainty` (Kang et al. 2025, arXiv 2502.18581): KL from uniform, which the paper computes over the
  whole vocabulary; we only have the top-k logprobs and renormalise over them, an approximation the Result
  lists in `fallbacks`.
- `deepconf` (arXiv 2508.15260, facebookresearch/deepconf): the lowest full-window group confidence, the
  authors' vote weight; `top_logprobs` defaults to 5 here (the authors use 20).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field
from typing_extensions import TypeVar

from ttscale.answers import vote
from ttscale.controller import Context
from ttscale.judges.confidence import lowest_group_confidence, mean_logprob, self_certainty
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import Branch, BranchStatus, Problem, Result

TOP_K_SELF_CERTAINTY = ("self-certainty estimated on the top-k logprobs of each token (renormalised over "
                        "those k), not on the whole vocabulary as in the paper")


class SelfConsistencyConfig(StrategyConfig):
    n: int = Field(8, ge=1, le=4096, description="number of samples")


# The config type of a self-consistency strategy (WeightedVote's extends it).
SC = TypeVar("SC", bound=SelfConsistencyConfig, default=SelfConsistencyConfig)


@register("self-consistency", "sc", "majority", "maj")
class SelfConsistency(Strategy[SC]):
    """Majority vote over n samples."""

    Config = SelfConsistencyConfig
    paper = "arXiv 2203.11171"

    def weights(self, branches: list[Branch]) -> list[float] | None:
        return None

    def logprobs_needed(self) -> int | None:
        return None

    def fallbacks(self) -> list[str]:
        """Deliberate simplifications that apply to this configuration (recorded in the Result)."""
        return []

    async def run(self, problem: Problem, ctx: Context) -> Result:
        branches = ctx.spawn(self.messages(problem), self.config.n,
                             self.config.sampling(logprobs=self.logprobs_needed()))
        await ctx.wait_all(branches)
        done = [b for b in branches if b.status is BranchStatus.finished]
        traces = [self.trace(b, problem) for b in branches]
        by_id = {t.id: t for t in traces}
        answers = [by_id[b.id].answer for b in done]
        w = self.weights(done)
        v = vote(answers, weights=w, order=[b.finish_order or 0 for b in done], kind=problem.kind)
        if w is not None:
            for b, wi in zip(done, w, strict=True):
                by_id[b.id].score = wi
        decision = v.as_dict()
        decision["voters"] = [b.id for b in done]
        text = None
        if v.winner_members:
            text = done[v.winner_members[0]].text
        return self.result(problem, ctx, answer=v.answer, traces=traces, decision=decision, text=text,
                           fallbacks=self.fallbacks())


class WeightedVoteConfig(SelfConsistencyConfig):
    weight: Literal["mean_logprob", "self_certainty", "deepconf"] = "mean_logprob"
    top_logprobs: int = Field(5, ge=1, le=20, description="top-k logprobs for self_certainty / deepconf")
    window: int = Field(2048, ge=1, description="deepconf group window")


@register("weighted-vote", "wv")
class WeightedVote(SelfConsistency[WeightedVoteConfig]):
    """Confidence-weighted majority vote."""

    Config = WeightedVoteConfig
    needs = ("token_ids",)

    def logprobs_needed(self) -> int | None:
        return self.config.top_logprobs

    def fallbacks(self) -> list[str]:
        return [TOP_K_SELF_CERTAINTY] if self.config.weight == "self_certainty" else []

    def weights(self, branches: list[Branch]) -> list[float]:
        c = self.config
        if c.weight == "mean_logprob":
            return [math.exp(mean_logprob(b.logprobs)) if b.logprobs else 0.0 for b in branches]
        if c.weight == "self_certainty":
            return [max(0.0, self_certainty(b.top_logprobs)) for b in branches]
        return [max(0.0, lowest_group_confidence(b.top_logprobs, c.window)) for b in branches]

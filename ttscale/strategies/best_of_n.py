"""Best-of-n: sample n, score each finished trace with a verifier, keep the best.

Paper: no single one; the verifier-reranking baseline of Cobbe et al. 2021 (arXiv 2110.14168) and, for
`self_certainty`, Kang et al. 2025 (arXiv 2502.18581). Authors' code: none used.

What we follow: n samples, one score per finished trace, the highest wins (ties to the earliest finisher).
Verifiers: `loglik` re-scores the trace with `score()` (on the same backend, or a `verifier` backend
given to the strategy: a reward/judge model's log-likelihood of the trace), averaged per token;
`self_certainty` uses the top-k logprobs gathered while generating (no extra calls).
Where we deviate: no trained outcome or process reward model ships with ttscale (`loglik` with a judge
backend stands in for one); self-certainty is estimated on the top-k logprobs instead of the whole
vocabulary, which the Result lists in `fallbacks`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ttscale.backends.base import Backend
from ttscale.controller import Context
from ttscale.judges.confidence import self_certainty
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.strategies.self_consistency import TOP_K_SELF_CERTAINTY
from ttscale.types import BranchStatus, Problem, Result, ScoreRequest


class BestOfNConfig(StrategyConfig):
    n: int = Field(8, ge=1, le=4096)
    verifier: Literal["loglik", "self_certainty"] = "self_certainty"
    top_logprobs: int = Field(5, ge=1, le=20)


@register("best-of-n", "bon")
class BestOfN(Strategy[BestOfNConfig]):
    """Keep the trace the verifier likes best."""

    Config = BestOfNConfig

    def __init__(self, config: Any = None, verifier_backend: Backend | None = None, **kw: Any):
        super().__init__(config, **kw)
        self.verifier_backend = verifier_backend

    def check(self, backend: Backend) -> None:
        if self.config.verifier == "loglik":
            target = self.verifier_backend or backend
            if not target.capabilities.score:
                from ttscale.errors import CapabilityError

                raise CapabilityError(f"best-of-n with verifier=loglik needs `score` (prompt logprobs) on "
                                      f"{target.name!r}; use verifier=self_certainty instead")
        elif backend.capabilities.top_logprobs < 1:
            from ttscale.errors import CapabilityError

            raise CapabilityError(
                f"best-of-n with verifier=self_certainty needs top logprobs from {backend.name!r}")

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        msgs = self.messages(problem)
        logprobs = c.top_logprobs if c.verifier == "self_certainty" else None
        branches = ctx.spawn(msgs, c.n, c.sampling(logprobs=logprobs))
        await ctx.wait_all(branches)
        done = [b for b in branches if b.status is BranchStatus.finished]
        scores: dict[str, float] = {}
        # a separate verifier model's calls are counted in the Result's usage, under its own label
        vctx = ctx.child(backend=self.verifier_backend, label="verifier") if self.verifier_backend else ctx
        for b in done:
            if c.verifier == "self_certainty":
                scores[b.id] = self_certainty(b.top_logprobs)
            else:
                res = await vctx.score(ScoreRequest(messages=msgs, continuation=b.text))
                scores[b.id] = res.mean
        traces = [self.trace(b, problem, score=scores.get(b.id)) for b in branches]
        best = None
        if done:
            best = max(done, key=lambda b: (scores[b.id], -(b.finish_order or 0)))
        by_id = {t.id: t for t in traces}
        return self.result(
            problem, ctx, answer=by_id[best.id].answer if best else None, traces=traces,
            text=best.text if best else None,
            decision={"verifier": c.verifier, "scores": scores, "chosen": best.id if best else None},
            fallbacks=[TOP_K_SELF_CERTAINTY] if c.verifier == "self_certainty" else [],
        )

    @classmethod
    def max_branches(cls, config: BestOfNConfig) -> int:
        """n samples, plus one score call each with the `loglik` verifier."""
        return config.n * (2 if config.verifier == "loglik" else 1)

    @classmethod
    def max_tokens_bound(cls, config: BestOfNConfig) -> int:
        return config.n * config.max_tokens

"""ParScale (arXiv 2505.10475): sample from a model that runs P parallel streams and aggregates them.

Paper: "Parallel Scaling Law for Language Models", Chen et al. 2025. Authors' code: the `qwen2_parscale`
Hugging Face model (modeling_qwen2_parscale.py) and its checkpoints (ParScale-1.8B-P{1,2,4,8}).

What we follow: the parallelism lives in the model. A `qwen2_parscale` checkpoint served by a backend
with `parallel_streams` (`--backend parscale:PATH`, `ttscale.backends.engine.parscale_model.ParScaleBackend`:
P sequences with their own prefix-KV segments, the authors' aggregation of the final hidden states, sampling
from the aggregate). The strategy draws `n` samples from it (default one). No default backend runs it: the
engine's embedded model (and any plain checkpoint) has no streams to aggregate.

What we deviate on: majority-voting over n > 1 samples is ours (the paper samples once), and the engine's
streams use its KV-cache layout, not the authors' `past_key_values` with a P-times batch.

Accounting: every aggregate token costs P stream forwards, so `generated_tokens` and `prompt_tokens` are
P x what the aggregate emitted and read; `decision["aggregate_tokens"]` / `["aggregate_prompt_tokens"]`
hold the counts of the aggregate itself and `decision["streams"]` is P. The streams run in the same
forward, so `sequential_tokens` stays the aggregate's length. A backend that does not say its P (no
`model.P`) is counted as P=1 and the Result lists that in `fallbacks`.

Cancel and budgets: the samples are ordinary Context branches (cancelling one stops the backend's decode
loop at its next token); under a total-token budget each sample's `max_tokens` is cut to its share of
what is left divided by P, since the Context sees only the aggregate tokens.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ttscale.answers import vote
from ttscale.backends.base import Backend
from ttscale.controller import Context
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import BranchStatus, GenerationRequest, Problem, Result, Usage

UNKNOWN_STREAMS = ("parscale: the backend does not say how many streams it runs (no `model.P`); tokens are "
                   "counted once per aggregate token, not P times")


def stream_count(backend: Backend) -> int | None:
    """P of a ParScale backend (its model's stream count), None when the backend does not tell."""
    p = getattr(getattr(backend, "model", None), "P", None)
    return int(p) if isinstance(p, int) and p >= 1 else None


class ParScaleConfig(StrategyConfig):
    n: int = Field(1, ge=1, le=256, description="samples drawn from the aggregated model (vote when > 1)")


@register("parscale")
class ParScale(Strategy[ParScaleConfig]):
    """Samples from a ParScale model's aggregate distribution (needs `parallel_streams`)."""

    Config = ParScaleConfig
    needs = ("parallel_streams",)
    needs_why = ("its P streams come from a qwen2_parscale checkpoint, which the default engine and its embedded "
                 "model are not: pass --backend parscale:PATH, PATH a qwen2_parscale checkpoint folder")
    paper = "arXiv 2505.10475"

    async def run(self, problem: Problem, ctx: Context) -> Result:
        self.check(ctx.backend)
        c = self.config
        source: list[dict[str, Any]] | GenerationRequest
        if ctx.backend.capabilities.chat:
            source = self.messages(problem)
        else:
            msgs = self.messages(problem)
            source_text = "\n\n".join(str(m.get("content", "")) for m in msgs) + "\n"
            source = GenerationRequest(request_id="parscale", prompt=source_text)
        p = stream_count(ctx.backend)
        sampling = c.sampling()
        if p is not None and p > 1 and ctx.budget.total_tokens is not None:
            # the Context counts aggregate tokens; each costs P stream forwards, so the budget allows 1/P
            left = ctx.budget.total_tokens - ctx.usage.generated_tokens
            sampling = c.sampling(max_tokens=max(1, min(c.max_tokens, left // (p * c.n))))
        branches = ctx.spawn(source, c.n, sampling, after=[])
        await ctx.wait_all(branches)
        aggregate = sum(b.num_tokens for b in branches)
        aggregate_prompt = sum(b.prompt_tokens for b in branches)
        if p is not None and p > 1:
            ctx.add_usage(Usage(generated_tokens=(p - 1) * aggregate,
                                prompt_tokens=(p - 1) * aggregate_prompt))
        traces = [self.trace(b, problem) for b in branches]
        done = [t for t in traces if t.status is BranchStatus.finished]
        v = vote([t.answer for t in done], order=[t.finish_order or 0 for t in done], kind=problem.kind)
        text = done[v.winner_members[0]].text if v.winner_members else (traces[0].text if traces else None)
        decision = {**v.as_dict(), "streams": p, "aggregate_tokens": aggregate,
                    "aggregate_prompt_tokens": aggregate_prompt}
        return self.result(problem, ctx, answer=v.answer, traces=traces, decision=decision, text=text,
                           fallbacks=[] if p is not None else [UNKNOWN_STREAMS])

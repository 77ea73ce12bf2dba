"""DeepConf online (arXiv 2508.15260): stop low-confidence traces early, confidence-weighted vote.

Token confidence is minus the mean of the top-k logprobs at a position; group confidence is its mean
over a sliding window; a trace's confidence is its lowest group confidence (ttscale/judges/confidence.py).
Online mode: `warmup` traces run to completion and set the threshold, the `percentile`-th percentile of
their trace confidences (10 = DeepConf-high, keeps ~90%; 90 = DeepConf-low). The remaining
`n - warmup` traces are watched token by token; a trace whose current window's group confidence falls
below the threshold is aborted (its tokens are saved). Finished traces (warm-up included) are filtered to
the `keep_percent` most confident and vote with their confidence as weight.

Paper's knobs (code): top-20 logprobs, window 2048, 16 warm-up traces, the 10th-percentile threshold,
n=512, confidence-weighted vote with filtering. Ours: a window is checked once it has `check_after`
tokens (default: a full window, as the code does).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from ttscale.answers import vote
from ttscale.controller import Context
from ttscale.errors import CapabilityError
from ttscale.judges.confidence import lowest_group_confidence, token_confidence
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import Branch, BranchStatus, Problem, Result


class DeepConfConfig(StrategyConfig):
    n: int = Field(512, ge=1, le=4096, description="traces in all, warm-up included (paper: 512)")
    warmup: int = Field(16, ge=1, description="warm-up traces that set the threshold (paper: 16)")
    top_logprobs: int = Field(20, ge=1, le=20, description="k of the top-k logprobs (paper: 20)")
    window: int = Field(2048, ge=1, description="group-confidence window in tokens (paper: 2048)")
    percentile: float = Field(10.0, ge=0.0, le=100.0, description="threshold percentile of warm-up confidences")
    keep_percent: float = Field(90.0, gt=0.0, le=100.0, description="vote among the most confident x%")
    check_after: int | None = Field(None, ge=1, description="tokens before a trace can be stopped (default: window)")

    @model_validator(mode="after")
    def _warmup_fits(self) -> DeepConfConfig:
        if self.warmup > self.n:
            raise ValueError(f"warmup ({self.warmup}) cannot exceed n ({self.n})")
        return self


class _Monitor:
    """Incremental sliding-window group confidence of one branch."""

    def __init__(self, window: int):
        self.window = window
        self.cum = [0.0]
        self.lowest = float("inf")

    def update(self, b: Branch) -> float | None:
        new = b.top_logprobs[len(self.cum) - 1:]
        for c in token_confidence(new):
            self.cum.append(self.cum[-1] + float(c))
        n = len(self.cum) - 1
        if n == 0:
            return None
        lo = max(0, n - self.window)
        return (self.cum[n] - self.cum[lo]) / (n - lo)


@register("deepconf")
class DeepConf(Strategy):
    """Warm-up threshold, early stop of low-confidence traces, confidence-weighted vote."""

    Config = DeepConfConfig
    paper = "arXiv 2508.15260"
    needs = ("top_logprobs",)
    needs_why = "token confidence is computed from the top-k logprobs of every generated token"

    def check(self, backend) -> None:
        super().check(backend)
        if backend.capabilities.top_logprobs < self.config.top_logprobs:
            raise CapabilityError(
                f"strategy 'deepconf' asks for top-{self.config.top_logprobs} logprobs but {backend.name!r} gives at "
                f"most {backend.capabilities.top_logprobs}; set top_logprobs lower")

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        self.check(ctx.backend)
        msgs = self.messages(problem)
        sampling = c.sampling(logprobs=c.top_logprobs)
        warm = ctx.spawn(msgs, c.warmup, sampling, after=[])
        await ctx.wait_all(warm)
        warm_done = [b for b in warm if b.status is BranchStatus.finished]
        confs = [lowest_group_confidence(b.top_logprobs, c.window) for b in warm_done]
        threshold = float(np.percentile(confs, c.percentile)) if confs else float("-inf")
        ctx.note("threshold", threshold=threshold, warmup=len(warm_done), percentile=c.percentile)
        online: list[Branch] = []
        stopped: list[str] = []
        if c.n > c.warmup:
            online = ctx.spawn(msgs, c.n - c.warmup, sampling, after=[])
            monitors = {b.id: _Monitor(c.window) for b in online}
            check_after = c.check_after or c.window
            async for ev in ctx.watch(online):
                if ev.kind != "delta":
                    continue
                b = ctx.branches[ev.branch_id]
                if b.done:
                    continue
                g = monitors[b.id].update(b)
                if g is not None and b.num_tokens >= check_after and g < threshold:
                    stopped.append(b.id)
                    ctx.cancel(b, reason="deepconf: group confidence below threshold")
                    ctx.note("stopped", branch=b.id, tokens=b.num_tokens, group_confidence=g)
        done = warm_done + [b for b in online if b.status is BranchStatus.finished]
        scores = {b.id: lowest_group_confidence(b.top_logprobs, c.window) for b in done}
        ranked = sorted(done, key=lambda b: -scores[b.id])
        voters = ranked[: max(1, int(np.ceil(len(ranked) * c.keep_percent / 100.0)))] if ranked else []
        voters.sort(key=lambda b: b.finish_order or 0)
        traces = [self.trace(b, problem, score=scores.get(b.id)) for b in warm + online]
        by_id = {t.id: t for t in traces}
        v = vote([by_id[b.id].answer for b in voters], weights=[max(0.0, scores[b.id]) for b in voters],
                 order=[b.finish_order or 0 for b in voters], kind=problem.kind)
        decision = {**v.as_dict(), "threshold": threshold, "stopped": stopped, "voters": [b.id for b in voters],
                    "confidence": scores}
        text = voters[v.winner_members[0]].text if v.winner_members else None
        return self.result(problem, ctx, answer=v.answer, traces=traces, decision=decision, text=text)

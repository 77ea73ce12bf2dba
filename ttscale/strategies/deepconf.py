"""DeepConf online (arXiv 2508.15260): stop low-confidence traces early, confidence-weighted vote.

Paper: "Deep Think with Confidence", Fu et al. 2025. Authors' code: facebookresearch/deepconf
(`deepconf-online.py`, `helper.py`, and the stopping rule in their vLLM fork, branch `conf-stop`).

What we follow (the authors' code):
- Token confidence is minus the mean of the top-k logprobs at a position (k=20). Group confidence is its
  mean over each *full* sliding window of `window` tokens (2048); a trace shorter than a window has one
  group, the mean over all its tokens. A trace's confidence is its lowest group confidence
  (`ttscale/judges/confidence.py`).
- `warmup` traces (16) run to completion; the threshold is a percentile of their trace confidences.
  `variant: low` (the authors' online headline, `CONFIDENCE_PERCENTILE = 90`) puts it at the 90th
  percentile, so about the top 10% pass; `variant: high` at the 10th percentile (top 90% pass).
- The other `n - warmup` traces start once the threshold is known (they are chained after the warm-up:
  sequential tokens = warm-up critical path + the longest online trace). A running trace is stopped as
  soon as the group confidence of its latest full window falls below the threshold.
- Vote: every finished trace, warm-up included, whose trace confidence is at or above the threshold,
  weighted by its trace confidence. A finished online trace shorter than a window is never stopped while
  running, but, as in the authors' code, is left out of the vote when its confidence is below the bar.

Where we deviate:
- Token confidences are kept at full precision (the authors round each to 3 decimals).
- `check_after` (ours) lets a trace be stopped before it has a full window, judged on the mean of all its
  tokens so far; default: a full window, the authors' rule.
- `keep_percent` (ours, off by default) adds the offline variant's top-x% filter to the online vote.
- `percentile` overrides the variant's percentile.
- If no warm-up trace finishes there is no threshold: nothing is stopped or filtered, and the Result
  lists this in `fallbacks`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from ttscale.answers import vote
from ttscale.backends.base import Backend
from ttscale.controller import Context
from ttscale.errors import CapabilityError
from ttscale.judges.confidence import lowest_group_confidence, token_confidence
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import Branch, BranchStatus, Problem, Result

VARIANT_PERCENTILE = {"low": 90.0, "high": 10.0}
NO_THRESHOLD = "deepconf: no warm-up trace finished, so no threshold: nothing was stopped or filtered"


class DeepConfConfig(StrategyConfig):
    n: int = Field(512, ge=1, le=4096, description="traces in all, warm-up included (paper: 512)")
    warmup: int = Field(16, ge=1, description="warm-up traces that set the threshold (paper: 16)")
    top_logprobs: int = Field(20, ge=1, le=20, description="k of the top-k logprobs (paper: 20)")
    window: int = Field(2048, ge=1, description="group-confidence window in tokens (paper: 2048)")
    variant: Literal["low", "high"] = Field(
        "low", description="low: threshold at the 90th percentile of warm-up confidences (top 10% pass, the "
                           "authors' online headline); high: the 10th percentile (top 90% pass)")
    percentile: float | None = Field(None, ge=0.0, le=100.0, description="override the variant's percentile")
    keep_percent: float | None = Field(None, gt=0.0, le=100.0,
                                       description="also vote only among the most confident x% (ours; off)")
    check_after: int | None = Field(None, ge=1,
                                    description="tokens before a trace can be stopped (default: window)")

    @model_validator(mode="after")
    def _warmup_fits(self) -> DeepConfConfig:
        if self.warmup > self.n:
            raise ValueError(f"warmup ({self.warmup}) cannot exceed n ({self.n})")
        return self

    @property
    def threshold_percentile(self) -> float:
        return self.percentile if self.percentile is not None else VARIANT_PERCENTILE[self.variant]


class _Monitor:
    """Confidence of a running branch's latest window, updated incrementally from its new tokens."""

    def __init__(self, window: int):
        self.window = window
        self.seen = 0
        self.cum = [0.0]

    def update(self, b: Branch) -> float | None:
        """Group confidence of the latest full window (of all tokens while fewer than a window)."""
        new = b.top_logprobs[self.seen:]
        self.seen = len(b.top_logprobs)
        for c in token_confidence(new):
            self.cum.append(self.cum[-1] + float(c))
        n = len(self.cum) - 1
        if n == 0:
            return None
        lo = max(0, n - self.window)
        return (self.cum[n] - self.cum[lo]) / (n - lo)


@register("deepconf")
class DeepConf(Strategy[DeepConfConfig]):
    """Warm-up threshold, early stop of low-confidence traces, confidence-weighted vote."""

    Config = DeepConfConfig
    paper = "arXiv 2508.15260"
    needs = ("top_logprobs",)
    needs_why = "token confidence is computed from the top-k logprobs of every generated token"

    def check(self, backend: Backend) -> None:
        super().check(backend)
        if backend.capabilities.top_logprobs < self.config.top_logprobs:
            raise CapabilityError(
                f"strategy 'deepconf' asks for top-{self.config.top_logprobs} logprobs but {backend.name!r} "
                f"gives at most {backend.capabilities.top_logprobs}; set top_logprobs lower")

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        self.check(ctx.backend)
        msgs = self.messages(problem)
        sampling = c.sampling(logprobs=c.top_logprobs)
        warm = ctx.spawn(msgs, c.warmup, sampling, after=[])
        await ctx.wait_all(warm)
        warm_done = [b for b in warm if b.status is BranchStatus.finished]
        confs = [lowest_group_confidence(b.top_logprobs, c.window) for b in warm_done]
        pct = c.threshold_percentile
        threshold = float(np.percentile(confs, pct)) if confs else float("-inf")
        fallbacks = [] if confs else [NO_THRESHOLD]
        ctx.note("threshold", threshold=threshold, warmup=len(warm_done), percentile=pct, variant=c.variant)
        online: list[Branch] = []
        stopped: list[str] = []
        if c.n > c.warmup:
            # The online traces need the threshold: on the critical path they come after the warm-up.
            online = ctx.spawn(msgs, c.n - c.warmup, sampling, after=warm)
            monitors = {b.id: _Monitor(c.window) for b in online}
            check_after = c.check_after or c.window
            async for ev in ctx.watch(online):
                if ev.kind != "delta":
                    continue
                assert ev.branch_id is not None  # watch yields only the watched branches' events
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
        voters = [b for b in done if scores[b.id] >= threshold]
        if c.keep_percent is not None and voters:
            ranked = sorted(voters, key=lambda b: -scores[b.id])
            voters = ranked[: max(1, int(np.ceil(len(ranked) * c.keep_percent / 100.0)))]
        voters.sort(key=lambda b: b.finish_order or 0)
        traces = [self.trace(b, problem, score=scores.get(b.id)) for b in warm + online]
        by_id = {t.id: t for t in traces}
        v = vote([by_id[b.id].answer for b in voters], weights=[max(0.0, scores[b.id]) for b in voters],
                 order=[b.finish_order or 0 for b in voters], kind=problem.kind)
        decision = {**v.as_dict(), "threshold": threshold, "variant": c.variant, "percentile": pct,
                    "stopped": stopped, "voters": [b.id for b in voters], "confidence": scores}
        text = voters[v.winner_members[0]].text if v.winner_members else None
        return self.result(problem, ctx, answer=v.answer, traces=traces, decision=decision, text=text,
                           fallbacks=fallbacks)

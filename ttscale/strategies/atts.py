"""ATTS (arXiv 2509.15148): a small draft model writes, a large target model checks each step.

Each of `samples` chains alternates turns (no barrier between chains: they are the parallel axis, the
turns the sequential one). In a turn the draft model writes one step (up to `step_tokens` tokens at
`temperature` 0.8, ending at a blank line). The target model *scores* the step: `score()` prefills
question + history + step and reads the target's logprobs of the step's tokens; the step's
non-conformity score is its perplexity under the target. First-turn scores form the calibration set,
pooled over the dataset (`calibration: marginal`, kept by this strategy instance across problems) or
per question over its parallel samples (`conditional`). A later step is rejected when its conformal
p-value (ttscale/judges/conformal.py) is at most `alpha`; then the target writes up to `target_tokens`
tokens after the draft step (`on_reject: append`; `replace` drops the draft step instead). A chain stops
at a `\\boxed{}` answer, at the model's end of sequence, or after `turns` turns. The answer is the
majority vote over chains (the paper scores pass@16-like; `decision["chain_answers"]` has every chain).

Two backends: the draft runs on the Context's backend; the target is `target_backend` (constructor
argument) or the `target` spec string (`vllm:PATH`, `openai:URL?model=..`). The target's generations and
score calls run in a child Context whose usage is folded into the Result's Usage; the critical path
follows each chain through both models. A run's budget applies to each model's Context separately.

Paper's knobs (code): samples=16, turns=15, step_tokens=500, temperature 0.8, target_tokens=500, reject
at percentile >= 0.6 (alpha = 0.4), marginal and conditional calibration, stop at \\boxed{}.
Ours: the blank-line step delimiter, `on_reject`, conditional calibration waiting for every chain's
first-turn score before its second turn, the vote, `target_temperature`.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Literal

from pydantic import Field

from ttscale.answers import extract_answer, extract_boxed, vote
from ttscale.backends.base import Backend
from ttscale.controller import Context
from ttscale.errors import CapabilityError, ConfigError
from ttscale.judges.conformal import ConditionalCalibrator, MarginalCalibrator
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import Branch, BranchStatus, Problem, Result, ScoreRequest


class ATTSConfig(StrategyConfig):
    temperature: float = Field(0.8, ge=0.0, description="draft temperature (paper: 0.8)")
    samples: int = Field(16, ge=1, le=4096, description="parallel chains per question (paper: 16)")
    turns: int = Field(15, ge=1, description="most turns per chain (paper: 15)")
    step_tokens: int = Field(500, ge=1, description="draft step limit (paper: 500)")
    target_tokens: int = Field(500, ge=1, description="target continuation on reject (paper: 500)")
    target_temperature: float = Field(0.8, ge=0.0, description="target sampling temperature (ours)")
    alpha: float = Field(0.4, ge=0.0, le=1.0, description="reject when p-value <= alpha (code: percentile 0.6)")
    calibration: Literal["marginal", "conditional"] = "marginal"
    step_stop: list[str] = Field(["\n\n"], description="step delimiter (ours)")
    on_reject: Literal["append", "replace"] = Field("append", description="keep or drop the rejected step (ours)")
    target: str | None = Field(None, description="target backend spec, when no target_backend is given")


@register("atts")
class ATTS(Strategy):
    """Draft steps checked by a target model's perplexity with conformal calibration."""

    Config = ATTSConfig
    paper = "arXiv 2509.15148"
    needs = ("chat",)

    def __init__(self, config: Any = None, target_backend: Backend | None = None, **kw: Any):
        super().__init__(config, **kw)
        self.target_backend = target_backend
        self.marginal = MarginalCalibrator()

    def target(self) -> Backend:
        if self.target_backend is None:
            if self.config.target is None:
                raise ConfigError("atts needs a target model: pass target_backend=... or config target=SPEC")
            from ttscale.backends import make_backend

            self.target_backend = make_backend(self.config.target)
        return self.target_backend

    def check(self, backend: Backend) -> None:
        super().check(backend)
        t = self.target()
        if not t.capabilities.score:
            raise CapabilityError(
                f"strategy 'atts' needs `score` (prompt logprobs) on the target backend {t.name!r}: the target "
                "rates each draft step by the perplexity of its tokens")

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        target = self.target()
        for hook in ("start", "connect"):
            fn = getattr(target, hook, None)
            if fn is not None:
                await fn()
                break
        self.check(ctx.backend)
        tctx = Context(target, seed=ctx.seed, id_prefix="t", budget=ctx.budget, limits=ctx.limits)
        cal = self.marginal if c.calibration == "marginal" else ConditionalCalibrator()
        key = problem.id if c.calibration == "conditional" else None
        first_done = 0
        first_event = asyncio.Event()
        base = self.messages(problem)
        target_sampling = c.sampling(temperature=c.target_temperature, max_tokens=c.target_tokens,
                                     stop=list(c.step_stop), include_stop_str=True)
        chains: list[dict[str, Any]] = [{"index": i, "history": "", "steps": [], "answer": None}
                                        for i in range(c.samples)]

        def first_turn_over() -> None:
            nonlocal first_done
            first_done += 1
            if first_done >= c.samples:
                first_event.set()

        async def chain(st: dict[str, Any]) -> None:
            prev: Branch | None = None
            counted = False
            try:
                for turn in range(1, c.turns + 1):
                    history = st["history"]
                    msgs = base + [{"role": "assistant", "content": history}] if history else base
                    (d,) = ctx.spawn(msgs, 1, c.sampling(max_tokens=c.step_tokens, stop=list(c.step_stop),
                                                         include_stop_str=True),
                                     after=[prev] if prev else [], continue_final_message=bool(history),
                                     group=f"chain{st['index']}", meta={"turn": turn, "model": "draft"})
                    await ctx.wait_all([d])
                    if d.status is not BranchStatus.finished:
                        st["steps"].append({"turn": turn, "draft": d.id, "status": d.status.value})
                        return
                    step = d.text
                    eos = d.finish_reason == "stop" and not any(step.endswith(s) for s in c.step_stop)
                    res = await tctx.score(ScoreRequest(messages=msgs, continue_final_message=bool(history),
                                                        continuation=step or " "))
                    ppl = math.exp(-res.mean) if res.logprobs else 1.0
                    rec: dict[str, Any] = {"turn": turn, "draft": d.id, "ppl": ppl, "tokens": d.num_tokens}
                    if turn == 1:
                        cal.add(ppl, key)
                        counted = True
                        first_turn_over()
                        rejected, pval = False, None
                    else:
                        if c.calibration == "conditional":
                            await first_event.wait()
                        pval = cal.p_value(ppl, key)
                        rejected = cal.reject(ppl, c.alpha, key)
                    rec.update(p_value=pval, rejected=rejected)
                    if rejected:
                        kept = history if c.on_reject == "replace" else history + step
                        tmsgs = base + [{"role": "assistant", "content": kept}] if kept else base
                        (t,) = tctx.spawn(tmsgs, 1, target_sampling, after=[d], continue_final_message=bool(kept),
                                          group=f"chain{st['index']}", meta={"turn": turn, "model": "target"})
                        await tctx.wait_all([t])
                        st["history"] = kept + t.text
                        prev = t
                        rec["target"] = t.id
                        eos = t.status is BranchStatus.finished and t.finish_reason == "stop" and \
                            not any(t.text.endswith(s) for s in c.step_stop)
                    else:
                        st["history"] = history + step
                        prev = d
                    st["steps"].append(rec)
                    ctx.note("step", chain=st["index"], **{k: v for k, v in rec.items() if k != "tokens"})
                    if extract_boxed(st["history"]) is not None or eos:
                        return
            finally:
                if not counted:
                    first_turn_over()
                st["answer"] = extract_answer(st["history"], problem.kind, problem.choices)

        tasks = [asyncio.create_task(chain(st)) for st in chains]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:  # one chain failed: stop its siblings too, then report the failure
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            await tctx.aclose()
            own, tu = ctx.usage, tctx.usage
            ctx.add_usage(tu.model_copy(update={
                "sequential_tokens": max(0, tu.sequential_tokens - own.sequential_tokens), "wall_time_s": 0.0}))
        answers = [st["answer"] for st in chains]
        v = vote(answers, kind=problem.kind)
        traces = [self.trace(b, problem) for b in ctx.branches.values()] + \
                 [self.trace(b, problem) for b in tctx.branches.values()]
        steps = [r for st in chains for r in st["steps"] if "p_value" in r and r["p_value"] is not None]
        decision = {**v.as_dict(), "chain_answers": answers, "chains": [st["steps"] for st in chains],
                    "rejection_rate": (sum(r["rejected"] for r in steps) / len(steps)) if steps else None,
                    "calibration": c.calibration, "calibration_size": cal.count(key)}
        text = chains[v.winner_members[0]]["history"] if v.winner_members else None
        return self.result(problem, ctx, answer=v.answer, traces=traces, decision=decision, text=text)

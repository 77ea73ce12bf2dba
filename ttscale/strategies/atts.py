"""ATTS (arXiv 2509.15148): a small draft model writes, a large target model checks each step.

Paper: "ATTS: Asynchronous Test-Time Scaling via Conformal Prediction". Authors' code:
github.com/menik1126/Asynchronous-Test-Time-Scaling (`ATTS/ref_async.py` runs a question,
`ATTS/ref_conformal.py` computes the calibration array).

What we follow (the code where it is more precise than the paper):
- Each of `samples` chains alternates turns; chains run without a barrier (the parallel axis), turns are
  the sequential axis. In a turn the draft model writes one step: up to `step_tokens` (500) tokens at
  `temperature` 0.8 with **no stop string** (`step_stop` exists for experiments and is empty by default).
- The target model *scores* the step: it prefills question + history + step and reads its logprobs of the
  step's tokens; the step's non-conformity score is their perplexity.
- **Every turn, the first included,** is tested. `calibration: offline` (the authors' way) tests against a
  fixed array of first-turn scores computed once on a calibration split by `ATTS.calibrate` (problems
  disjoint from the eval: a problem whose id is in the array's split is refused). `rule: percentile` is
  the code's test: reject when the share of calibration scores below the step's score is >= 1 - alpha
  (0.6 at alpha = 0.4); `rule: p_value` is the conformal p-value <= alpha (judges/conformal.py).
- On reject the target writes up to `target_tokens` (500) tokens after the draft step, which stays in the
  history (`on_reject: append`). A chain stops at a `\\boxed{}` answer or after `turns` turns.

What we deviate on (each said here, and in `Result.fallbacks` when it applies):
- Online calibration (`marginal`, the default, one pool kept by this strategy instance across problems;
  `conditional`, one pool per question from its parallel samples): a first-turn score joins the pool and
  is then tested against it (conditional waits for every chain's first score). The first problems of a
  marginal run have a small pool and reject little; the Result says so. Use `offline` to match the paper.
- Prompts are chat messages, the history one assistant message that each step continues; the authors
  join turns with a blank line in a raw-text prompt for scoring. A chain also stops at the draft's end
  of sequence. `on_reject: replace`, `target_temperature` and the majority vote over chains are ours
  (the paper scores pass@16-like; `decision["chain_answers"]` has every chain's answer).
- Calibration drafts use the run's first-turn sampling (so their scores are exchangeable with the
  turn-1 scores they calibrate); the authors' calibration script stops them at `\\boxed{`.

Two models: the draft runs on the Context's backend; the target is `target_backend` (constructor
argument) or the `target` spec string. The target's generations and score calls run in
`ctx.child(label="target")`: one budget for both models (a `Budget(total_tokens=B)` caps drafts and target
together), `Result.usage.by_model` splits draft and target tokens, and the critical path follows each chain
through both models.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from ttscale.answers import extract_answer, extract_boxed, vote
from ttscale.backends.base import Backend
from ttscale.controller import Context, model_label
from ttscale.errors import CapabilityError, ConfigError
from ttscale.judges.conformal import ConditionalCalibrator, MarginalCalibrator
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import Branch, BranchStatus, Problem, Result, SamplingSpec, ScoreRequest

ONLINE_FALLBACK = ("atts: calibrated online ({mode}) from this run's first-turn scores ({n} at the end); the "
                   "authors calibrate offline on a calibration split (calibration=offline)")


class ATTSConfig(StrategyConfig):
    width_field: ClassVar[str | None] = "samples"

    temperature: float = Field(0.8, ge=0.0, description="draft temperature (paper: 0.8)")
    samples: int = Field(16, ge=1, le=4096, description="parallel chains per question (paper: 16)")
    turns: int = Field(15, ge=1, description="most turns per chain (paper: 15)")
    step_tokens: int = Field(500, ge=1, description="draft step limit in tokens (code: 500, no stop string)")
    target_tokens: int = Field(500, ge=1, description="target continuation on reject (paper: 500)")
    target_temperature: float = Field(0.8, ge=0.0, description="target sampling temperature (ours)")
    alpha: float = Field(0.4, ge=0.0, le=1.0, description="rejection level (code: percentile 0.6 = 1 - alpha)")
    rule: Literal["percentile", "p_value"] = Field(
        "percentile", description="percentile rank >= 1 - alpha (code) or conformal p-value <= alpha")
    calibration: Literal["offline", "marginal", "conditional"] = Field(
        "marginal", description="offline: a fixed array from `ATTS.calibrate` (the authors'); else online")
    calibration_file: str | None = Field(None, description="JSON written by ATTSCalibration.save (offline)")
    step_stop: list[str] = Field(default_factory=list, description="optional step delimiter (authors: none)")
    on_reject: Literal["append", "replace"] = Field("append", description="keep or drop the rejected step (ours)")
    target: str | None = Field(None, description="target backend spec, when no target_backend is given")

    @model_validator(mode="after")
    def _file_means_offline(self) -> ATTSConfig:
        if self.calibration_file is not None and self.calibration != "offline":
            raise ValueError(f"calibration_file is read only with calibration=offline (got {self.calibration})")
        return self


class ATTSCalibration(BaseModel):
    """First-turn draft-step scores of a calibration split: the offline array the authors test against."""

    scores: list[float]
    problem_ids: list[str]
    draft: str
    target: str
    step_tokens: int
    temperature: float

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: str | Path) -> ATTSCalibration:
        try:
            return cls.model_validate(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"calibration_file {str(path)!r} is not an ATTS calibration: {exc}") from exc


@register("atts")
class ATTS(Strategy[ATTSConfig]):
    """Draft steps checked by a target model's perplexity with conformal calibration."""

    Config = ATTSConfig
    paper = "arXiv 2509.15148"
    needs = ("chat",)
    resource_fields: ClassVar[dict[str, str]] = {"target": "target_backend",
                                                 "calibration_file": "calibration"}

    def __init__(self, config: Any = None, target_backend: Backend | None = None,
                 calibration: ATTSCalibration | None = None, **kw: Any):
        super().__init__(config, **kw)
        self.target_backend = target_backend
        self.marginal = MarginalCalibrator()
        self.offline = calibration
        self._offline_cal: MarginalCalibrator | None = None

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

    async def _start_target(self) -> Backend:
        target = self.target()
        for hook in ("start", "connect"):
            fn = getattr(target, hook, None)
            if fn is not None:
                await fn()
                break
        return target

    def offline_calibrator(self) -> MarginalCalibrator:
        """The fixed calibration array (calibration=offline), loaded once."""
        if self._offline_cal is None:
            if self.offline is None:
                if self.config.calibration_file is None:
                    raise ConfigError("atts with calibration=offline needs calibration_file=PATH (from "
                                      "ATTS.calibrate(...).save(PATH)) or ATTS(calibration=...)")
                self.offline = ATTSCalibration.load(self.config.calibration_file)
            if not self.offline.scores:
                raise ConfigError("atts: the offline calibration array is empty")
            self._offline_cal = MarginalCalibrator(self.offline.scores)
        return self._offline_cal

    def step_sampling(self) -> SamplingSpec:
        c = self.config
        return c.sampling(max_tokens=c.step_tokens, stop=list(c.step_stop), include_stop_str=True)

    @staticmethod
    async def step_score(tctx: Context, base: list[dict[str, Any]], history: str, step: str) -> float:
        """The target's perplexity of `step` after the question and `history` (the non-conformity score)."""
        msgs = base + [{"role": "assistant", "content": history}] if history else base
        res = await tctx.score(ScoreRequest(messages=msgs, continue_final_message=bool(history),
                                            continuation=step or " "))
        return math.exp(-res.mean) if res.logprobs else 1.0

    def rejects(self, cal: Any, score: float, key: Any) -> tuple[bool, float, float]:
        """(rejected, percentile rank, p-value) of one step's score against the calibration pool."""
        c = self.config
        rank, pval = cal.percentile(score, key), cal.p_value(score, key)
        if c.alpha == 0.0 or cal.count(key) == 0:
            return False, rank, pval
        return (rank >= 1.0 - c.alpha if c.rule == "percentile" else pval <= c.alpha), rank, pval

    async def calibrate(self, problems: Sequence[Problem], draft: Backend, *, seed: int | None = 0,
                        samples: int | None = None) -> ATTSCalibration:
        """First-turn scores on a calibration split, computed once (the authors' `ref_conformal.py`).

        Each problem gets `samples` (default the config's) first-turn draft steps, each scored by the
        target. Use problems disjoint from the eval set: `run` refuses a problem of this split.
        """
        target = await self._start_target()
        self.check(draft)
        scores: list[float] = []
        for problem in problems:
            async with Context(draft, seed=seed) as ctx:
                tctx = ctx.child(backend=target, label="target", id_prefix="t")
                base = self.messages(problem)
                drafts = ctx.spawn(base, samples or self.config.samples, self.step_sampling(), after=[])
                await ctx.wait_all(drafts)
                for d in drafts:
                    if d.status is BranchStatus.finished and d.text:
                        scores.append(await self.step_score(tctx, base, "", d.text))
        return ATTSCalibration(scores=scores, problem_ids=[p.id for p in problems], draft=model_label(draft),
                               target=model_label(target), step_tokens=self.config.step_tokens,
                               temperature=self.config.temperature)

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        target = await self._start_target()
        self.check(ctx.backend)
        cal: Any
        if c.calibration == "offline":
            cal = self.offline_calibrator()
            assert self.offline is not None
            if problem.id in set(self.offline.problem_ids):
                raise ConfigError(f"atts: problem {problem.id!r} is in the calibration split; calibrate on "
                                  "problems disjoint from the eval set")
        else:
            cal = self.marginal if c.calibration == "marginal" else ConditionalCalibrator()
        online = c.calibration != "offline"
        key = problem.id if c.calibration == "conditional" else None
        tctx = ctx.child(backend=target, label="target", id_prefix="t")
        first_done = 0
        first_event = asyncio.Event()
        base = self.messages(problem)
        target_sampling = c.sampling(temperature=c.target_temperature, max_tokens=c.target_tokens,
                                     stop=list(c.step_stop), include_stop_str=True)
        chains: list[dict[str, Any]] = [{"index": i, "history": "", "steps": [], "answer": None, "end": None}
                                        for i in range(c.samples)]

        def first_turn_over() -> None:
            nonlocal first_done
            first_done += 1
            if first_done >= c.samples:
                first_event.set()

        def ended_by_eos(b: Branch) -> bool:
            return b.status is BranchStatus.finished and b.finish_reason == "stop" and \
                not any(b.text.endswith(s) for s in c.step_stop)

        async def chain(st: dict[str, Any]) -> None:
            prev: Branch | None = None
            counted = False
            try:
                for turn in range(1, c.turns + 1):
                    if ctx.budget_hit:
                        st["end"] = "budget"
                        return
                    history = st["history"]
                    msgs = base + [{"role": "assistant", "content": history}] if history else base
                    (d,) = ctx.spawn(msgs, 1, self.step_sampling(), after=[prev] if prev else [],
                                     continue_final_message=bool(history), group=f"chain{st['index']}",
                                     meta={"turn": turn, "model": "draft"})
                    await ctx.wait_all([d])
                    if d.status is not BranchStatus.finished or not d.text:
                        st["steps"].append({"turn": turn, "draft": d.id, "status": d.status.value})
                        st["end"] = d.meta.get("abort_reason", d.status.value) if d.text else "empty step"
                        return
                    step = d.text
                    score = await self.step_score(tctx, base, history, step)
                    if turn == 1 and online:
                        cal.add(score, key)
                        counted = True
                        first_turn_over()
                        if c.calibration == "conditional":
                            await first_event.wait()
                    rejected, rank, pval = self.rejects(cal, score, key)
                    rec: dict[str, Any] = {"turn": turn, "draft": d.id, "ppl": score, "tokens": d.num_tokens,
                                           "percentile": rank, "p_value": pval, "rejected": rejected}
                    eos = ended_by_eos(d)
                    if rejected and ctx.budget_hit:
                        rec["target"] = None  # the budget is spent: nothing left for the target to write
                    elif rejected:
                        kept = history if c.on_reject == "replace" else history + step
                        tmsgs = base + [{"role": "assistant", "content": kept}] if kept else base
                        (t,) = tctx.spawn(tmsgs, 1, target_sampling, after=[d], continue_final_message=bool(kept),
                                          group=f"chain{st['index']}", meta={"turn": turn, "model": "target"})
                        await tctx.wait_all([t])
                        st["history"] = kept + t.text
                        prev = t
                        rec["target"] = t.id
                        eos = ended_by_eos(t)
                    if not rejected:
                        st["history"] = history + step
                        prev = d
                    st["steps"].append(rec)
                    ctx.note("step", chain=st["index"], **{k: v for k, v in rec.items() if k != "tokens"})
                    if extract_boxed(st["history"]) is not None:
                        st["end"] = "boxed"
                        return
                    if eos:
                        st["end"] = "eos"
                        return
                st["end"] = "turns"
            finally:
                if not counted:
                    first_turn_over()
                # a chain that did not end by itself (out of turns or budget) was cut mid-reasoning
                st["answer"] = extract_answer(st["history"], problem.kind, problem.choices,
                                              truncated=st["end"] not in ("boxed", "eos"))

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
        answers = [st["answer"] for st in chains]
        v = vote(answers, kind=problem.kind)
        traces = [self.trace(b, problem) for b in ctx.branches.values()] + \
                 [self.trace(b, problem) for b in tctx.branches.values()]
        steps = [r for st in chains for r in st["steps"] if "rejected" in r]
        decision = {**v.as_dict(), "chain_answers": answers, "chains": [st["steps"] for st in chains],
                    "chain_ends": [st["end"] for st in chains],
                    "rejection_rate": (sum(r["rejected"] for r in steps) / len(steps)) if steps else None,
                    "calibration": c.calibration, "calibration_size": cal.count(key), "rule": c.rule,
                    "models": {"draft": ctx.label, "target": model_label(target)}}
        fallbacks = [ONLINE_FALLBACK.format(mode=c.calibration, n=cal.count(key))] if online else []
        text = chains[v.winner_members[0]]["history"] if v.winner_members else None
        return self.result(problem, ctx, answer=v.answer, traces=traces, decision=decision, text=text,
                           fallbacks=fallbacks)

    @classmethod
    def max_branches(cls, config: ATTSConfig) -> int:
        """Every chain's every turn: a draft step, the target's score call, a target continuation."""
        return config.samples * config.turns * 3

    @classmethod
    def max_tokens_bound(cls, config: ATTSConfig) -> int:
        return config.samples * config.turns * (config.step_tokens + config.target_tokens)

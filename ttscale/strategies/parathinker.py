"""ParaThinker (arXiv 2509.04475): P parallel reasoning paths, then one summary that reads them all.

Native mode (our engine, a checkpoint whose tokenizer has `<think1>`..`<thinkP>` and `<summary>`): the
paths share the prompt's KV, each forced to start with its control token, positions restarting after the
prompt, segment embeddings added to K/V when the checkpoint has them; the think stage ends when
`finish_share` of the paths finished; the summary attends to every path's KV with no re-prefill
(`ttscale.backends.engine.native.parathinker_run`).

Text fallback (any backend, or an ordinary checkpoint): P independent samples, then a summary prompt that
quotes them; recorded in `Result.fallbacks`.
"""

from __future__ import annotations

import asyncio
import math
from typing import Literal

from pydantic import Field

from ttscale.answers import extract_answer, vote
from ttscale.controller import Context
from ttscale.errors import CapabilityError
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import BranchStatus, Problem, Result, Trace, Usage

SUMMARY_PROMPT = (
    "{problem}\n\nHere are {n} independent attempts at this problem.\n\n{paths}\n\n"
    "Compare the attempts, resolve any disagreement, and give the final answer within \\boxed{{}}."
)


class ParaThinkerConfig(StrategyConfig):
    paths: int = Field(4, ge=1, le=8, description="parallel paths (control tokens exist for 1..8)")
    finish_share: float = Field(0.1, gt=0.0, le=1.0, description="share of finished paths that ends thinking")
    mode: Literal["auto", "native", "text"] = "auto"
    summary_prefix: str = " The final answer is"
    summary_max_tokens: int = Field(512, ge=1)
    path_chars: int = Field(4000, ge=100, description="text fallback: characters quoted per path (tail kept)")
    summary_prompt: str = SUMMARY_PROMPT


@register("parathinker")
class ParaThinker(Strategy):
    """Native on our engine with a ParaThinker checkpoint; text fallback elsewhere."""

    Config = ParaThinkerConfig
    paper = "arXiv 2509.04475"

    def _native_parts(self, ctx: Context):
        be = ctx.backend
        engine, tok = getattr(be, "engine", None), getattr(be, "tokenizer", None)
        if engine is None or tok is None or be.capabilities.missing("kv_merge"):
            return None, "backend has no kv_merge (not our engine)"
        from ttscale.backends.engine.native import control_token_ids

        ids = control_token_ids(tok, self.config.paths)
        if ids is None:
            return None, "tokenizer lacks <think1>..<thinkP>/<summary> control tokens"
        return (engine, tok, ids), ""

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        parts, why = self._native_parts(ctx) if c.mode != "text" else (None, "mode=text")
        if parts is None:
            if c.mode == "native":
                raise CapabilityError(f"parathinker native mode unavailable: {why}")
            return await self._text(problem, ctx, why)
        return await self._native(problem, ctx, *parts)

    async def _native(self, problem: Problem, ctx: Context, engine, tok, ids) -> Result:
        from ttscale.backends.engine.native import (
            ParaThinkerSpec,
            SamplingRow,
            load_segment_embeddings,
            parathinker_run,
        )

        c = self.config
        model = engine.model
        think, summary = ids
        emb = load_segment_embeddings(model.path, model.cfg.num_layers) if getattr(model, "path", None) else None
        if emb is not None and model.seg_k is None:
            model.set_segment_embeddings(*emb)
        prompt_ids = ctx.backend.chat_ids(self.messages(problem))
        spec = ParaThinkerSpec(
            prompt_ids=prompt_ids, paths=c.paths, path_starts=[[t] for t in think],
            summary_prefix=[summary] + tok.encode(c.summary_prefix, add_special_tokens=False),
            max_think=c.max_tokens, max_summary=c.summary_max_tokens, finish_share=c.finish_share,
            end_ids=list(model.cfg.eos_token_ids),
            sampling=SamplingRow(c.temperature, c.top_p, c.top_k, c.seed or 0), use_segment_ids=emb is not None,
        )
        out = await asyncio.to_thread(parathinker_run, model, spec)
        dec = lambda t: tok.decode(t, skip_special_tokens=True)
        gen = sum(len(p) for p in out.path_tokens) + len(out.summary_tokens)
        ctx.add_usage(Usage(prompt_tokens=len(prompt_ids), generated_tokens=gen,
                            sequential_tokens=out.think_forwards + out.summary_forwards,
                            peak_kv_blocks=out.peak_blocks, calls=1, branches=c.paths + 1))
        traces = [Trace(id=f"path{i + 1}", text=dec(p), token_ids=p, num_tokens=len(p),
                        status=BranchStatus.finished if out.path_finished[i] else BranchStatus.aborted,
                        answer=extract_answer(dec(p), problem.kind, problem.choices)) for i, p in enumerate(out.path_tokens)]
        text = c.summary_prefix + dec(out.summary_tokens)
        answer = extract_answer(text, problem.kind, problem.choices)
        traces.append(Trace(id="summary", text=text, token_ids=out.summary_tokens, num_tokens=len(out.summary_tokens),
                            status=BranchStatus.finished, answer=answer))
        ctx.note("summary over merged path KV", written=out.written)
        return self.result(problem, ctx, answer=answer, traces=traces, text=text,
                           decision={"mode": "native", "written": out.written, "finished_paths": sum(out.path_finished)})

    async def _text(self, problem: Problem, ctx: Context, why: str) -> Result:
        c = self.config
        msgs = self.messages(problem)
        paths = ctx.spawn(msgs, c.paths, c.sampling(), after=[], group="paths")
        need = max(1, math.ceil(c.finish_share * c.paths))
        await ctx.first_finished(paths, need)
        stopped = ctx.cancel_rest(among=paths, reason="think stage over")
        await ctx.wait_all(paths)
        ctx.note("think stage over", finished=need, cut=[b.id for b in stopped])
        quoted = "\n\n".join(f"Attempt {i + 1}:\n{b.text[-c.path_chars:]}" for i, b in enumerate(paths))
        question = problem.prompt or str(problem.chat()[-1].get("content", ""))
        prompt = c.summary_prompt.format(problem=question, n=len(paths), paths=quoted)
        (summ,) = ctx.spawn(problem.model_copy(update={"prompt": prompt, "messages": None}).chat(
            c.system_prompt or None), 1, c.sampling(max_tokens=c.summary_max_tokens), after=paths, group="summary")
        await ctx.wait_all([summ])
        traces = [self.trace(b, problem) for b in paths]
        answer = self.answer_of(summ, problem) if summ.status is BranchStatus.finished else None
        decision = {"mode": "text", "finished_paths": sum(b.status is BranchStatus.finished for b in paths)}
        if answer is None:
            done = [t for t in traces if t.answer is not None]
            v = vote([t.answer for t in done], order=[t.finish_order or 0 for t in done], kind=problem.kind)
            answer = v.answer
            decision["summary_without_answer"] = "majority vote over the paths"
        traces.append(self.trace(summ, problem))
        return self.result(problem, ctx, answer=answer, traces=traces, text=summ.text, decision=decision,
                           fallbacks=[f"parathinker text fallback: {why}"])

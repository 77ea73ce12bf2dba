"""ParaThinker: P parallel reasoning paths, then one summary that reads them all.

Paper: "ParaThinker: Native Parallel Thinking as a New Paradigm to Scale LLM Test-time Compute",
arXiv 2509.04475. Authors' code: `MobileLLM/ParaThinker` (training collator) and `LeslieKid/vllm-parathinker`
(vLLM V0 fork; `examples/parathinker/example.py`, `qwen2.py`, `output_processor/single_step.py`).

Native mode (our engine, `ttscale.backends.engine.native_parathinker`) with a ParaThinker checkpoint
(tokenizer with `<think_i>`/`</think_i>`/`<summary>`/`</summary>`), stepped in the engine's own loop through
the Context (`ctx.run_native`: branches `path1..P` and `summary`, so cancel, budgets, events and streaming
apply; the model is only read, so concurrent runs do not interfere). What we follow:
- the authors' prompt, `PROMPT_TEMPLATE` (DeepSeek-R1 turn markers, the instruction to enclose the summary
  in `<summary> </summary>` and the answer in `\\boxed{}`, opening `<think>`); `prompt_template=None` uses
  the tokenizer's chat template with the same instruction instead;
- paths share the prompt's KV, each forced to start with `<think_i>`, positions restarting after the prompt;
- the thought embeddings: one `self_attn.seg_embeddings.weight` `[max_segments, head_dim]` per layer,
  loaded from the checkpoint (`loader.load_model`) and added to K and V before RoPE, id 0 for the prompt and
  the summary, i for path i;
- a path ends on any stop token (`</think>`, `</think1..8>`, `</summary>`), replaced by its own
  `</think_i>`; EOS does not end a path; the think stage ends when `finish_share` (authors: 0.1) of the
  paths ended;
- the summary attends to every path's KV with no re-prefill, after the forced prefix
  `SUMMARY_PREFIX`, ends on a stop token, and samples like the paths (temperature, top-p) unless
  `summary_temperature` is set.
Deviations: stray `<think_j>`/`<summary>` inside a path are banned rather than replaced by `<think1>`; EOS
also ends the summary (the fork ignores EOS everywhere); no `<vllm_pad>` block padding of prompts and
paths; the template's line-continuation spaces in `example.py` ("monologue     and") are single spaces.
A checkpoint without `seg_embeddings` runs without thought embeddings and says so in `Result.fallbacks`
(`thought_embeddings=required` refuses instead).

Text fallback (any backend, or a checkpoint without the control tokens): P independent samples, then a
summary prompt that quotes them; recorded in `Result.fallbacks`. This is not the method (the paper's point
is the trained model reading all paths' KV), only a stand-in that keeps the strategy usable.

Either way the summary's trace is marked `meta["role"] = "summary"`: it is written over the paths, not one
more sample, so an eval's maj@k and pass@k count the paths only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from ttscale.answers import extract_answer, vote
from ttscale.backends.base import engine_parts
from ttscale.controller import Context
from ttscale.errors import BackendError, CapabilityError
from ttscale.prompts import explicit_system_prompt
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import SUMMARY_ROLE, BranchStatus, Problem, Result, Trace

if TYPE_CHECKING:
    from ttscale.backends.engine.engine import Engine
    from ttscale.backends.engine.native import ControlTokens

SUMMARY_PROMPT = (
    "{problem}\n\nHere are {n} independent attempts at this problem.\n\n{paths}\n\n"
    "Compare the attempts, resolve any disagreement, and give the final answer within \\boxed{{}}."
)

INSTRUCTION = (
    " You FIRST think about the reasoning process as an internal monologue and then summarize the reasoning "
    "process to get the final answer. The summary process MUST BE enclosed within <summary> </summary> tags. "
    "The final answer MUST BE put in \\boxed{}."
)
# The authors' prompt (`examples/parathinker/example.py`), tokenized with the tokenizer's BOS as vLLM does.
PROMPT_TEMPLATE = "<｜User｜>{question}" + INSTRUCTION.replace("{}", "{{}}") + "<｜Assistant｜><think>"
SUMMARY_PREFIX = ("<summary>By analyzing multiple reasoning processes above, I concluded that: "
                  "The final answer is")


class ParaThinkerConfig(StrategyConfig):
    width_field: ClassVar[str | None] = "paths"

    temperature: float = Field(0.5, ge=0.0, description="sampling temperature (the authors' example: 0.5)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    paths: int = Field(4, ge=1, le=8, description="parallel paths (control tokens exist for 1..8)")
    finish_share: float = Field(0.1, gt=0.0, le=1.0, description="share of finished paths that ends thinking")
    mode: Literal["auto", "native", "text"] = "auto"
    thought_embeddings: Literal["optional", "required"] = Field(
        "optional", description="checkpoint without seg_embeddings: a fallback entry, or refuse")
    prompt_template: str | None = Field(PROMPT_TEMPLATE, description="native prompt; None: chat template")
    summary_prefix: str = SUMMARY_PREFIX
    summary_temperature: float | None = Field(None, ge=0.0, description="None: the paths' temperature")
    summary_max_tokens: int = Field(512, ge=1)
    path_chars: int = Field(4000, ge=100, description="text fallback: characters quoted per path (tail kept)")
    summary_prompt: str = SUMMARY_PROMPT


@register("parathinker")
class ParaThinker(Strategy[ParaThinkerConfig]):
    """Native on our engine with a ParaThinker checkpoint; text fallback elsewhere."""

    Config = ParaThinkerConfig
    prefers = ("kv_merge",)  # not a hard need (text fallback); picks the engine as default backend
    paper = "arXiv 2509.04475"

    def _native_parts(self, ctx: Context) -> tuple[tuple[Engine, Any, ControlTokens] | None, str]:
        """(engine, tokenizer, control tokens) for native mode, or None and why it is unavailable."""
        be = ctx.backend
        if be.capabilities.missing("kv_merge", "engine_native"):
            return None, "backend has no kv_merge (not our engine)"
        native = engine_parts(be, "parathinker native mode")
        engine, tok = native.engine, native.tokenizer
        from ttscale.backends.engine.native import control_tokens

        ct, why = control_tokens(tok, self.config.paths)
        return ((engine, tok, ct), "") if ct is not None else (None, why)

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        parts, why = self._native_parts(ctx) if c.mode != "text" else (None, "mode=text")
        if parts is None:
            if c.mode == "native":
                raise CapabilityError(f"parathinker native mode unavailable: {why}")
            return await self._text(problem, ctx, why)
        return await self._native(problem, ctx, *parts)

    def _prompt_ids(self, problem: Problem, ctx: Context, tok: Any) -> list[int]:
        c = self.config
        question = problem.prompt or str(problem.chat()[-1].get("content", ""))
        if c.prompt_template is None:
            extra = explicit_system_prompt(c.system_prompt)
            system = [{"role": "system", "content": extra}] if extra else []
            return ctx.backend.chat_ids([*system, {"role": "user", "content": question + INSTRUCTION}])
        return tok.encode(c.prompt_template.format(question=question))

    async def _native(self, problem: Problem, ctx: Context, engine: Engine, tok: Any, ct: ControlTokens) -> Result:
        from ttscale.backends.engine.native import ParaThinkerRun, ParaThinkerSpec, SamplingRow

        c = self.config
        model = engine.model
        fallbacks = []
        has_emb = getattr(model, "seg_k", None) is not None
        if not has_emb:
            why = "checkpoint has no self_attn.seg_embeddings.weight (thought embeddings)"
            if c.thought_embeddings == "required":
                raise CapabilityError(f"parathinker native mode: {why}")
            fallbacks.append(f"parathinker native without thought embeddings: {why}")
        prompt_ids = self._prompt_ids(problem, ctx, tok)
        sampling = SamplingRow(c.temperature, c.top_p, c.top_k, c.seed or 0)
        summary_sampling = None if c.summary_temperature is None else SamplingRow(
            c.summary_temperature, c.top_p, c.top_k, c.seed or 0)
        spec = ParaThinkerSpec(
            prompt_ids=prompt_ids, paths=c.paths, path_starts=[[t] for t in ct.think], path_ends=ct.think_end,
            summary_prefix=tok.encode(c.summary_prefix, add_special_tokens=False),
            max_think=c.max_tokens, max_summary=c.summary_max_tokens, finish_share=c.finish_share,
            end_ids=ct.stops, summary_end_ids=list(model.cfg.eos_token_ids), path_banned=ct.banned,
            sampling=sampling, summary_sampling=summary_sampling, use_segment_ids=has_emb,
        )
        run = ctx.run_native(ParaThinkerRun(model, spec, cache=engine.cache), group="paths")
        done = await run.finished()
        out = done.outcome
        if out is None:
            raise BackendError(f"parathinker run failed: {done.error}")

        def dec(ids: list[int]) -> str:
            return tok.decode(ids, skip_special_tokens=True)

        traces = [Trace(id=f"path{i + 1}", text=dec(p), token_ids=p, num_tokens=len(p),
                        status=BranchStatus.finished if out.path_finished[i] else BranchStatus.aborted,
                        answer=extract_answer(dec(p), problem.kind, problem.choices,
                                              truncated=not out.path_finished[i]),
                        meta={"branch": run.branches[i].id})
                  for i, p in enumerate(out.path_tokens)]
        text = dec(spec.summary_prefix) + dec(out.summary_tokens)
        answer = extract_answer(text, problem.kind, problem.choices, truncated=not out.summary_finished)
        traces.append(Trace(id="summary", text=text, token_ids=out.summary_tokens,
                            num_tokens=len(out.summary_tokens),
                            status=BranchStatus.finished if done.finish == "done" else BranchStatus.aborted,
                            answer=answer, meta={"branch": run.branches[-1].id, "role": SUMMARY_ROLE}))
        ctx.note("summary over merged path KV", written=out.written)
        decision = {"mode": "native", "run_end": done.finish, "written": out.written,
                    "finished_paths": sum(out.path_finished), "thought_embeddings": has_emb,
                    "summary_finished": out.summary_finished}
        return self.result(problem, ctx, answer=answer, traces=traces, text=text, decision=decision,
                           fallbacks=fallbacks)

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
        summary_sampling = c.sampling(max_tokens=c.summary_max_tokens)
        if c.summary_temperature is not None:
            summary_sampling = c.sampling(max_tokens=c.summary_max_tokens, temperature=c.summary_temperature)
        (summ,) = ctx.spawn(problem.model_copy(update={"prompt": prompt, "messages": None}).chat(
            explicit_system_prompt(c.system_prompt)), 1, summary_sampling, after=paths, group="summary")
        await ctx.wait_all([summ])
        traces = [self.trace(b, problem) for b in paths]
        answer = self.answer_of(summ, problem) if summ.status is BranchStatus.finished else None
        decision = {"mode": "text", "finished_paths": sum(b.status is BranchStatus.finished for b in paths)}
        if answer is None:
            done = [t for t in traces if t.answer is not None]
            v = vote([t.answer for t in done], order=[t.finish_order or 0 for t in done], kind=problem.kind)
            answer = v.answer
            decision["summary_without_answer"] = "majority vote over the paths"
        summary = self.trace(summ, problem)
        summary.meta["role"] = SUMMARY_ROLE
        traces.append(summary)
        return self.result(problem, ctx, answer=answer, traces=traces, text=summ.text, decision=decision,
                           fallbacks=[f"parathinker text fallback: {why}"])

    @classmethod
    def max_branches(cls, config: ParaThinkerConfig) -> int:
        """The paths and the summary."""
        return config.paths + 1

    @classmethod
    def max_tokens_bound(cls, config: ParaThinkerConfig) -> int:
        return config.paths * config.max_tokens + config.summary_max_tokens

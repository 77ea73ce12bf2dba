"""Hogwild! Inference (arXiv 2504.06261): W workers writing into one shared KV cache, each seeing the
others' tokens as they are generated. The loop lives in `ttscale.backends.engine.native.HogwildRun`
(layouts, step moves, quick checks, forced final answer); this class builds the prompts, runs it on the
engine's model with a cache of its own, and turns the outcome into a Result with Usage
(sequential tokens = forward passes per worker; generated = all workers).
"""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import Field

from ttscale.answers import extract_answer, extract_boxed
from ttscale.controller import Context
from ttscale.errors import CapabilityError
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import BranchStatus, Problem, Result, Trace, Usage

NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi"]

COLLAB_PROMPT = (
    "You are one of {n} assistants ({names}) solving the same problem together, in parallel. You can see "
    "each other's work as it is written: finished steps are shared above, and everyone's current step is "
    "shown under \"work in progress\". Split the work, do not repeat what a collaborator is already doing, "
    "and build on their results. Write in short steps separated by blank lines. When the answer is found, "
    "any of you may write it as \\boxed{{answer}}."
)


class HogwildConfig(StrategyConfig):
    workers: int = Field(2, ge=1, le=len(NAMES))
    layout: Literal["combined", "contiguous"] = "combined"
    check_every: int = Field(256, ge=1, description="tokens between 'Quick check' lines of a worker")
    check_prompt: str = "Quick check: am I doing redundant work? (yes/no): "
    final_prompt: str = "\n\n... Time is up. The final answer is \\boxed{"
    final_tokens: int = Field(16, ge=1)
    collab_prompt: str = COLLAB_PROMPT


@register("hogwild")
class Hogwild(Strategy):
    """W workers on one shared cache (needs our engine: `concurrent_views`)."""

    Config = HogwildConfig
    needs = ("concurrent_views",)
    needs_why = "Hogwild lays out a shared KV cache itself; use the engine backend"
    paper = "arXiv 2504.06261"

    async def run(self, problem: Problem, ctx: Context) -> Result:
        from ttscale.backends.engine.native import (
            HogwildRun,
            HogwildSpec,
            SamplingRow,
            Workspaces,
            hogwild_blocks,
        )

        self.check(ctx.backend)
        engine = getattr(ctx.backend, "engine", None)
        if engine is None or getattr(ctx.backend, "tokenizer", None) is None:
            raise CapabilityError(f"hogwild needs the engine backend's model and tokenizer ({ctx.backend.name!r})")
        c = self.config
        tok = ctx.backend.tokenizer
        names = NAMES[: c.workers]
        system = c.collab_prompt.format(n=c.workers, names=", ".join(names)) + " " + (
            c.system_prompt or "Put your final answer within \\boxed{}.")
        msgs = problem.chat(system)
        prompt_ids = ctx.backend.chat_ids(msgs)

        def enc(t: str) -> list[int]:
            return tok.encode(t, add_special_tokens=False)

        spec = HogwildSpec(
            prompt_ids=prompt_ids, workers=c.workers, layout=c.layout, max_steps=c.max_tokens,
            others_header=enc("\n\n# Work in progress (others)\n"), own_header=enc("\n\n# Work in progress (own)\n"),
            step_prefix=[enc(f"{n}: ") for n in names], check_ids=enc(c.check_prompt), check_every=c.check_every,
            final_ids=enc(c.final_prompt), final_tokens=c.final_tokens,
            sampling=SamplingRow(c.temperature, c.top_p, c.top_k, c.seed if c.seed is not None else 0),
            eos_ids=list(engine.model.cfg.eos_token_ids),
        )

        def decode(ids: list[int]) -> str:
            return tok.decode(ids, skip_special_tokens=True)

        def work():
            with Workspaces.for_model(engine.model).take(hogwild_blocks(spec)) as (cache, graphs):
                return HogwildRun(engine.model, spec, decode=decode, cache=cache, graphs=graphs).run()

        out = await asyncio.to_thread(work)
        ctx.add_usage(Usage(prompt_tokens=out.prompt_tokens, generated_tokens=out.generated,
                            sequential_tokens=out.forwards, peak_kv_blocks=out.peak_blocks, calls=1,
                            branches=c.workers))
        transcript = "".join(decode(t) for _, t in out.transcript[1:])
        traces = [Trace(id=f"hogwild-{n}", text=decode(out.worker_tokens[i]), token_ids=out.worker_tokens[i],
                        num_tokens=len(out.worker_tokens[i]), status=BranchStatus.finished,
                        finish_reason=out.finish, meta={"worker": n}) for i, n in enumerate(names)]
        if out.answer_worker is not None:
            i = out.answer_worker
            answer = extract_answer(traces[i].text, problem.kind, problem.choices)
            traces[i].answer = answer
            how = f"{names[i]} wrote \\boxed{{}}"
        else:
            answer = extract_boxed("\\boxed{" + decode(out.final_tokens)) if out.final_tokens else None
            answer = answer if answer is not None else (decode(out.final_tokens).split("}")[0].strip() or None)
            how = "forced final answer at the budget limit"
            transcript += c.final_prompt + decode(out.final_tokens)
        ctx.note(how, forwards=out.forwards, finish=out.finish)
        decision = {"finish": out.finish, "answer_worker": out.answer_worker, "forwards": out.forwards,
                    "steps_in_common": sum(1 for w, _ in out.transcript if w >= 0), "layout": c.layout,
                    "final_tokens": len(out.final_tokens), "forced_tokens": out.forced}
        return self.result(problem, ctx, answer=answer, traces=traces, decision=decision, text=transcript)

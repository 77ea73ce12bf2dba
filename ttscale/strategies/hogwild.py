"""Hogwild! Inference: W workers writing into one shared KV cache, each seeing the others' tokens as they
are generated.

Paper: "Hogwild! Inference: Parallel LLM Generation via Concurrent Attention", arXiv 2504.06261.
Authors' code: `eqimp/hogwild_llm` (`formatting.py` for prompts, markers and banned tokens; `generation.py`
and `full_example.ipynb` for the loop). The loop lives in `ttscale.backends.engine.native_hogwild`
(layouts, step moves, quick checks, forced final answer); this class builds the prompts, runs it in the
engine's own loop through the Context (`ctx.run_native`: one branch per worker, so cancel, budgets, events
and streaming apply), and turns the outcome into a Result. Usage comes from the branches: generated = all
workers' kept tokens (the forced final answer is worker 0's), sequential = forward passes.

What we follow (the authors' `MathFormatting`):
- the collaboration prompt's structure: "# Collaborative Reasoning" rules, few-shot examples (each wrapped in
  the tokenizer's chat template), "# How to collaborate", "# Solve the following problem"; the whole of it
  sent as the user message before the problem (`prompt_as_user_message`);
- step headers with step indices, `**Alice [5]:** `; the first steps "Hi, I'm Alice. Here's how we can" /
  "Hi, I'm Bob.";
- the "combined" layout's markers: `\\n\\n### Work in progress (others)\\n\\n` before the others' current
  steps, the `<...>` pivot after each of them, `### Work in progress (own)` before the worker's own step;
  "### Past steps" names the common block in the prompt and the examples;
- a step ends on a token completing a blank line after sentence-ending punctuation (the authors'
  characters; we also accept a blank line split over two tokens, as SmolLM2 writes it);
- banned tokens while workers generate: EOS, BOS, `#` and `</think>` (those the tokenizer has as single
  tokens; SmolLM2 has no `</think>`), so EOS never stops a worker;
- the quick check "Quick check: am I doing redundant work? (yes/no): " every 256 tokens; at the budget limit
  the authors' s1-style finisher ("Wait, given the limited time, ... the final answer is \\boxed{") and 16
  greedy tokens.
Deviations: the prompt's wording and few-shot examples are ours (same sections, markers and step format;
`collab_prompt` takes any other text, e.g. the authors' own); the quick check counts tokens per worker (the
authors count all workers together); a worker's answer in `\\boxed{}` ends the run as soon as it closes (the
authors check at step ends); the boundary token stays in the finished step and the token sampled with it
is dropped (the authors feed it first in the next step); headers are prefilled after the prompt (the authors
prefill them alone); the finisher writes after the first worker's own step, not after all current steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from ttscale.answers import extract_answer, extract_boxed
from ttscale.backends.base import EngineNative, engine_parts
from ttscale.controller import Context
from ttscale.errors import BackendError
from ttscale.prompts import explicit_system_prompt
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import BranchStatus, Problem, Result, Trace

if TYPE_CHECKING:
    from ttscale.backends.engine.native import HogwildSpec

NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi"]

SEP = "\n\n"
PAST = "### Past steps"
OTHERS = "### Work in progress (others)"
OWN = "### Work in progress (own)"
PIVOT = "<...>"
THINK = "<think>"
FINISHER = ("\n\nWait, given the limited time, I have to give an answer right now. Considering all my "
            "previous attempts, I have to conclude that the final answer is \\boxed{")
BANNED_NAMES = ("#", "</think>")  # plus the tokenizer's BOS and EOS


def step_prefix(name: str, index: int | str) -> str:
    """The authors' step header: `**Alice [5]:** `."""
    return f"**{name} [{index}]:** "


def first_steps(names: list[str]) -> list[str]:
    """Each worker's forced start of step 1 (the authors': the first worker proposes how to collaborate)."""
    return [step_prefix(names[0], 1) + f"Hi, I'm {names[0]}. Here's how we can"] + [
        step_prefix(n, 1) + f"Hi, I'm {n}." for n in names[1:]]


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def rules(names: list[str]) -> str:
    a, b = names[0], names[1 % len(names)]
    return f"""\
You are one of {len(names)} assistants, {_listing(names)}, solving one problem together. All of you write at \
the same time, and each of you sees what the others have written so far, down to the last token.

Finished steps of everyone are collected under '{PAST}', each headed like \
'{step_prefix('Name', 'step').strip()}'. Under '{OTHERS}' you see the steps the others are writing right \
now; each breaks off at {PIVOT} because it is still being written. Under '{OWN}' comes your own current \
step, which you continue.

Use what the others write: take a part of the problem nobody has taken, check a result instead of computing \
it twice, answer a question addressed to you. If you find you are doing what someone else already did or is \
doing (e.g. {b}: 'Wait, {a} is already on this, I will do something else'), stop and switch to other work \
at once.

When the problem is solved, any one of you writes the final answer as \\boxed{{answer}}; it cannot be \
changed afterwards."""


def how_to_collaborate(names: list[str]) -> str:
    a, b = names[0], names[1 % len(names)]
    return f"""\
- **Plan:** agree early on who does what (e.g. '{b}, please take the second equation'). When plans \
conflict, follow {a}'s.
- **Split:** give each of you a different subtask, case or range; leave small checks until the main work is \
covered.
- **Diversify:** try different methods for the same quantity and keep the one that finishes first.
- **Talk:** ask ('{a}, which case should I take?'), suggest, and correct each other ('{b}, step 3 has a \
sign error').
- **Announce:** say what you will do next so that nobody else does it too.
- **Pivot:** drop a line of work mid-sentence when it is no longer needed.

Every few steps ask yourself whether you are contributing or repeating someone; if repeating, change task."""


# A question in the workers' chat template (the tokenizer's), or None for plain text.
ChatFormat = Callable[[str], str] | None


def _example(question: str, answer: str, chat: ChatFormat) -> str:
    shown = chat(question) if chat is not None else question + SEP
    return f"<example>{SEP}{shown}{answer}{SEP}</example>"


def examples(names: list[str], chat: ChatFormat = None) -> str:
    """Two worked examples in the layout the workers will see (ours; the authors use five)."""
    a, b = names[0], names[1 % len(names)]
    first = _example("Tom has 3 pencils and gets 4 more. How many pencils does he have? Also find x if "
                     "2x = 10. Give both answers separated by a comma.", f"""\
{THINK}{SEP}{PAST}{SEP}{OTHERS}

{step_prefix(a, 1)}I will do the pencils. Tom has 3 pencils and gets 4, so {PIVOT}

{OWN}

{step_prefix(b, 1)}Tom has 3 pencils... Wait, {a} is already doing the pencils. I will solve 2x = 10 \
instead: dividing by 2 gives x =""", chat)
    full = _example("Find the sum of the squares of 1 to 6.", f"""\
{THINK}{SEP}{PAST}

{step_prefix(a, 1)}Hi, I'm {a}. Here's how we can split it: I add the squares of 1, 2, 3 and {b} adds \
4, 5, 6, then we add the two parts.

{step_prefix(b, 1)}Hi, I'm {b}. Agreed, I take 4, 5, 6.

{step_prefix(a, 2)}1 + 4 + 9 = 14. My part is 14.

{step_prefix(b, 2)}16 + 25 + 36 = 77. My part is 77.

{step_prefix(a, 3)}Adding the parts: 14 + 77 = 91. Check with n(n+1)(2n+1)/6 = 6*7*13/6 = 91. \
The answer is \\boxed{{91}}.""", chat)
    return f"## 1. Collaborating within one step{SEP}{first}{SEP}## 2. Full example{SEP}{full}"


def collaboration_prompt(names: list[str], chat: ChatFormat = None, add_examples: bool = True) -> str:
    """The system prompt, in the authors' sections: rules, examples, how to collaborate, the task."""
    parts = ["# Collaborative Reasoning", rules(names)]
    if add_examples:
        parts += ["# Examples", examples(names, chat)]
    parts += ["# How to collaborate", how_to_collaborate(names), "# Solve the following problem",
              (f"{_listing(names)}, you will now solve the next problem together. Keep track of who does "
               "what and talk to each other so that no work is done twice.")]
    return SEP.join(parts)


class HogwildConfig(StrategyConfig):
    width_field: ClassVar[str | None] = "workers"

    workers: int = Field(2, ge=1, le=len(NAMES))
    layout: Literal["combined", "contiguous"] = "combined"
    check_every: int = Field(256, ge=1, description="tokens between 'Quick check' lines of a worker")
    check_prompt: str = "Quick check: am I doing redundant work? (yes/no): "
    final_prompt: str = FINISHER
    final_tokens: int = Field(16, ge=1)
    collab_prompt: str | None = Field(None, description="None: ours, in the authors' format; {names} filled")
    add_examples: bool = Field(True, description="few-shot examples in the collaboration prompt")
    prompt_as_user_message: bool = Field(True, description="collaboration prompt + problem in one user turn")
    ban_tokens: bool = Field(True, description="ban EOS, BOS, '#', '</think>' while workers generate")


def has_boxed_answer(text: str) -> bool:
    """The completion predicate the engine applies to a worker's step: a closed `\\boxed{...}`."""
    return "boxed" in text and extract_boxed(text) is not None


def banned_token_ids(tokenizer: Any, eos_ids: list[int]) -> tuple[list[int], list[str]]:
    """The authors' banned tokens that this tokenizer has as single tokens, and the names it lacks."""
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    missing: list[str] = []
    for name in (*BANNED_NAMES, tokenizer.bos_token, tokenizer.eos_token):
        if name is None:
            continue
        if name in vocab:
            ids.append(vocab[name])
        else:
            missing.append(name)
    ids += [e for e in eos_ids if e not in ids]
    return sorted(set(ids)), missing


@register("hogwild")
class Hogwild(Strategy[HogwildConfig]):
    """W workers on one shared cache (needs our engine: `concurrent_views`)."""

    Config = HogwildConfig
    needs = ("concurrent_views",)
    needs_why = "Hogwild lays out a shared KV cache itself; use the engine backend"
    paper = "arXiv 2504.06261"

    def prompt_messages(self, problem: Problem, tok: Any) -> list[dict[str, str]]:
        """The chat the common block starts with (the authors' `get_full_prompt`)."""
        c = self.config
        names = NAMES[: c.workers]

        def chat(question: str) -> str:
            return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)

        has_template = getattr(tok, "chat_template", None) is not None
        system = (c.collab_prompt.format(names=_listing(names)) if c.collab_prompt is not None
                  else collaboration_prompt(names, chat if has_template else None, c.add_examples))
        extra = explicit_system_prompt(c.system_prompt)
        if extra:
            system += SEP + extra
        question = problem.prompt or str(problem.chat()[-1].get("content", ""))
        if c.prompt_as_user_message:
            return [{"role": "user", "content": system + SEP + question}]
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]

    def build_spec(self, problem: Problem, backend: EngineNative) -> tuple[HogwildSpec, list[str]]:
        """The run's inputs as token ids for `backend` (the engine backend: its tokenizer, chat template and
        model's EOS), and the banned-token names its tokenizer lacks."""
        from ttscale.backends.engine.native import HogwildSpec, SamplingRow

        c = self.config
        tok = backend.tokenizer
        names = NAMES[: c.workers]
        prompt_ids = backend.chat_ids(self.prompt_messages(problem, tok))

        def enc(t: str) -> list[int]:
            return tok.encode(t, add_special_tokens=False)

        eos = list(backend.engine.model.cfg.eos_token_ids)
        banned, missing = banned_token_ids(tok, eos) if c.ban_tokens else ([], [])
        headers: dict[tuple[int, int], list[int]] = {}

        def step_header(i: int, index: int) -> list[int]:
            if (i, index) not in headers:
                headers[(i, index)] = enc(step_prefix(names[i], index))
            return headers[(i, index)]

        spec = HogwildSpec(
            prompt_ids=prompt_ids, workers=c.workers, layout=c.layout, max_steps=c.max_tokens,
            others_header=enc(SEP + OTHERS + SEP), own_header=enc(PIVOT + SEP + OWN + SEP),
            pivot=enc(PIVOT + SEP), step_header=step_header, first_step=[enc(t) for t in first_steps(names)],
            check_ids=enc(c.check_prompt), check_every=c.check_every,
            final_ids=enc(c.final_prompt), final_tokens=c.final_tokens,
            sampling=SamplingRow(c.temperature, c.top_p, c.top_k, c.seed if c.seed is not None else 0),
            eos_ids=eos, banned_ids=banned, answered=has_boxed_answer,
        )
        return spec, missing

    async def run(self, problem: Problem, ctx: Context) -> Result:
        from ttscale.backends.engine.native import HogwildRun

        self.check(ctx.backend)
        backend = engine_parts(ctx.backend, "hogwild")
        engine, tok = backend.engine, backend.tokenizer
        c = self.config
        names = NAMES[: c.workers]
        spec, missing = self.build_spec(problem, backend)

        def decode(ids: list[int]) -> str:
            return tok.decode(ids, skip_special_tokens=True)

        runners = engine.native_runners
        graphs = runners.take()
        job = HogwildRun(engine.model, spec, decode=decode, cache=engine.cache, graphs=graphs,
                         on_release=lambda: runners.give_back(graphs))
        try:
            run = ctx.run_native(job, group="workers")
        except BaseException:
            job.release()
            raise
        done = await run.finished()
        out = done.outcome
        if out is None:
            raise BackendError(f"hogwild run failed: {done.error}")
        status = BranchStatus.aborted if done.finish == "abort" else BranchStatus.finished
        transcript = "".join(decode(t) for _, t in out.transcript[1:])
        traces = [Trace(id=f"hogwild-{n}", text=decode(out.worker_tokens[i]), token_ids=out.worker_tokens[i],
                        num_tokens=len(out.worker_tokens[i]), status=status,
                        finish_reason=out.finish, meta={"worker": n, "branch": run.branches[i].id})
                  for i, n in enumerate(names)]
        if out.answer_worker is not None:
            i = out.answer_worker
            answer = extract_answer(traces[i].text, problem.kind, problem.choices)
            traces[i].answer = answer
            how = f"{names[i]} wrote \\boxed{{}}"
        else:
            answer = extract_boxed("\\boxed{" + decode(out.final_tokens)) if out.final_tokens else None
            if answer is None:
                answer = decode(out.final_tokens).split("}")[0].strip() or None
            how = "forced final answer at the step limit"
            if out.final_tokens:
                transcript += c.final_prompt + decode(out.final_tokens)
            else:
                how = f"stopped without an answer ({done.finish})"
        ctx.note(how, forwards=out.forwards, finish=out.finish)
        decision = {"finish": out.finish, "run_end": done.finish, "answer_worker": out.answer_worker,
                    "forwards": out.forwards,
                    "steps_in_common": sum(1 for w, _ in out.transcript if w >= 0), "layout": c.layout,
                    "final_tokens": len(out.final_tokens), "forced_tokens": out.forced,
                    "banned_tokens": spec.banned_ids, "banned_missing": missing}
        return self.result(problem, ctx, answer=answer, traces=traces, decision=decision, text=transcript)

    @classmethod
    def max_branches(cls, config: HogwildConfig) -> int:
        return config.workers

    @classmethod
    def max_tokens_bound(cls, config: HogwildConfig) -> int:
        """`max_tokens` decode steps, each one token per worker, then the forced final answer."""
        return config.workers * config.max_tokens + config.final_tokens

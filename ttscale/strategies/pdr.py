"""Parallel-Distill-Refine and Sequential Refinement (arXiv 2510.01123).

Paper: "Rethinking Thinking Tokens: LLMs as Improvement Operators" (PDR and SR). Authors' code: none
public that we found (searched 2026-12); we follow the paper and STRATEGIES.md.

What we follow. PDR runs rounds r = 1..R. Round r samples M_r drafts in parallel, each conditioned on the
question and the workspace C^(r-1) (empty for r = 1); the drafts are distilled into a new workspace C^(r)
of at most `kappa` tokens, rebuilt from scratch each round. The last round has M_R = 1 and its draft is
the answer. SR (Sequential Refinement) is PDR with M_r = 1 every round: one candidate refined repeatedly,
its workspace the previous candidate (topk with k = 1). The paper's three distill operators:
- `summary`: the model reads every draft and writes a bounded summary (agreements, contradictions,
  derived facts, open sub-goals, next steps), generated with max_tokens = kappa (ours: or the drafts' own
  total when that is less: a summary never needs more room than what it condenses);
- `topk`: the k best drafts verbatim, chosen by a selector, kappa split evenly among them;
- `randomk`: k random drafts, drawn anew for every next-round generation.

Workspace bound and what is cut. The workspace is measured with the backend's tokenizer (`tokenize`), so
no prompt carries more than kappa workspace tokens. A draft longer than its share keeps its **end** (its
conclusion) and its final answer, after a line saying its beginning was cut and how long it was; a
summary cut at the bound says so. Without `tokenize` the UTF-8 byte count bounds the token count of
byte-level BPE tokenizers (the Result's `fallbacks` says so).

Budgets (the paper reports both): *sequential* = input + output tokens along the accepted path,
*total* = every call. `Usage.sequential_tokens` counts generated tokens on the critical path and
`Usage.sequential_prompt_tokens` the prompt tokens its calls read, the summary call's prompt (all the
drafts) included; `Budget(sequential_io_tokens=...)` limits their sum. `decision["budgets"]` has both.

What we deviate on (ours, not in the paper): the default schedule [8, 4, 1], kappa=2048,
distill=summary, k=2, the topk selectors (`mean_logprob`, `vote`) and the prompts. The paper keeps top-k
drafts "verbatim"; with a bound we keep their ends, not their beginnings, so the answer survives.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ttscale.answers import extract_answer, vote
from ttscale.controller import Context
from ttscale.judges.confidence import mean_logprob
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import Branch, BranchStatus, Problem, Result

REFINE_PROMPT = (
    "{question}\n\nBelow is a workspace distilled from earlier attempts at this problem. Use what is right in "
    "it, fix what is wrong, and write a complete solution.\n\n<workspace>\n{workspace}\n</workspace>"
)
SUMMARY_PROMPT = (
    "{question}\n\nHere are {m} attempts at this problem.\n\n{drafts}\n\nWrite a short summary for a "
    "solver who will try again: where the attempts agree, where they contradict each other, facts that were "
    "derived, open sub-goals and the next steps. Do not write a full solution."
)
BYTES_FALLBACK = "pdr: backend cannot tokenize; the workspace bound kappa is measured in UTF-8 bytes (>= tokens)"


class PDRConfig(StrategyConfig):
    schedule: list[int] = Field([8, 4, 1],
                                description="M_r, drafts per round; the last must be 1")
    kappa: int = Field(2048, ge=1, description="workspace bound in tokens")
    distill: Literal["summary", "topk", "randomk"] = "summary"
    k: int = Field(2, ge=1, description="drafts kept by topk / randomk")
    selector: Literal["mean_logprob", "vote"] = Field("mean_logprob", description="topk's selector (ours)")

    width_field: ClassVar[str | None] = "schedule"

    @classmethod
    def width_values(cls, width: int) -> dict[str, Any] | None:
        """`pdr-N`: the default schedule scaled so its first round drafts N (pdr-4 = [4, 2, 1]); the last stays 1."""
        if cls.width_field is None:
            return None
        default = cls.model_fields["schedule"].get_default(call_default_factory=True)
        scaled = [max(1, round(m * width / default[0])) for m in default[:-1]]
        return {"schedule": [*scaled, 1]}

    @field_validator("schedule")
    @classmethod
    def _ends_in_one(cls, v: list[int]) -> list[int]:
        if not v or any(m < 1 for m in v):
            raise ValueError("schedule needs at least one round, every M_r >= 1")
        if v[-1] != 1:
            raise ValueError(f"the last round must have M_R = 1 (got {v})")
        return v


class TokenCounter:
    """Counts tokens with the backend's tokenizer, or UTF-8 bytes as an upper bound without one."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.exact = bool(backend.capabilities.tokenize)

    async def count(self, text: str) -> int:
        if self.exact:
            return len(await self.backend.tokenize(text))
        return len(text.encode("utf-8"))

    async def cut(self, text: str, limit: int, *, tail: bool = False) -> str:
        """Longest prefix (with `tail`: suffix) of `text` with at most `limit` tokens (checked, never over)."""
        def piece(k: int) -> str:
            return text[len(text) - k:] if tail else text[:k]

        if limit <= 0:
            return ""
        if await self.count(text) <= limit:
            return text
        lo, hi = 0, len(text)  # the longest piece that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if await self.count(piece(mid)) <= limit:
                lo = mid
            else:
                hi = mid - 1
        while lo and await self.count(piece(lo)) > limit:  # non-monotone tokenizers: shrink until it fits
            lo -= 1
        return piece(lo)


@register("pdr", "parallel-distill-refine")
class ParallelDistillRefine(Strategy[PDRConfig]):
    """Rounds of parallel drafts distilled into a bounded workspace."""

    Config = PDRConfig
    paper = "arXiv 2510.01123"

    def question(self, problem: Problem) -> str:
        if problem.prompt is not None:
            return problem.prompt
        return "\n\n".join(str(m.get("content", "")) for m in problem.messages or [] if m.get("role") == "user")

    def refine_messages(self, problem: Problem, workspace: str) -> list[dict[str, Any]]:
        """The question alone (first round), or the question with the workspace."""
        if not workspace:
            return self.messages(problem)
        q = self.question(problem)
        prompt = REFINE_PROMPT.format(question=q, workspace=workspace)
        return Problem(id=problem.id, prompt=prompt).chat(self.system_prompt(problem))

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        counter = TokenCounter(ctx.backend)
        fallbacks = [] if counter.exact else [BYTES_FALLBACK]
        rng = random.Random(c.seed if c.seed is not None else ctx.seed)
        workspaces: list[str] = [""]  # per next-round generation (randomk gives each its own)
        rounds: list[dict[str, Any]] = []
        done_rounds: list[list[Branch]] = []
        for r, m in enumerate(c.schedule, 1):
            if ctx.budget_hit:
                ctx.note("budget spent: no further round", round=r, budget=ctx.budget_hit)
                break
            ws_tokens = [await counter.count(w) if w else 0 for w in workspaces]
            drafts: list[Branch] = []
            before = [b for b in ctx.branches.values() if b.done]  # a round's drafts never depend on each other
            for i in range(m):
                j = i % len(workspaces)
                drafts += ctx.spawn(self.refine_messages(problem, workspaces[j]), 1, c.sampling(),
                                    group=f"round{r}", after=before,
                                    meta={"round": r, "workspace_tokens": ws_tokens[j]})
            await ctx.wait_all(drafts)
            ok = [b for b in drafts if b.status is BranchStatus.finished]
            rounds.append({"round": r, "drafts": [b.id for b in drafts],
                           "workspace_tokens": [b.meta["workspace_tokens"] for b in drafts]})
            done_rounds.append(ok)
            if r == len(c.schedule) or ctx.budget_hit:
                continue
            if not ok:
                ctx.note("no draft finished; the workspace stays as it was", round=r)
                continue
            workspaces = await self.distill(problem, ctx, ok, counter, rng, r, c.schedule[r])
            ctx.note("distilled", round=r, operator=c.distill,
                     workspace_tokens=[await counter.count(w) for w in workspaces])
        traces = [self.trace(b, problem) for b in ctx.branches.values()
                  if b.group is None or b.group.startswith("round")]
        final = done_rounds[-1] if len(done_rounds) == len(c.schedule) else []
        if not final and ctx.budget_hit:
            earlier = next((ok for ok in reversed(done_rounds) if ok), [])
            final = sorted(earlier, key=lambda b: b.finish_order or 0)[:1]
            if final:  # with no draft at all, `result` notes the budget
                fallbacks.append(f"pdr: the {ctx.budget_hit} budget ran out before the final round finished; the "
                                 "answer is the first finished draft of the latest round that had one")
        by_id = {t.id: t for t in traces}
        answer = by_id[final[0].id].answer if final else None
        u = ctx.usage
        decision = {"rounds": rounds, "kappa": c.kappa, "operator": c.distill, "final": final[0].id if final else None,
                    "budgets": {"sequential": u.sequential_tokens + u.sequential_prompt_tokens,
                                "total": u.generated_tokens + u.prompt_tokens}}
        return self.result(problem, ctx, answer=answer, traces=traces, decision=decision,
                           text=final[0].text if final else None, fallbacks=fallbacks)

    async def distill(self, problem: Problem, ctx: Context, drafts: list[Branch], counter: TokenCounter,
                      rng: random.Random, r: int, next_m: int) -> list[str]:
        """The next round's workspace(s). A summary call runs after every draft of the round, so its prompt
        (all the drafts) is on the critical path: the Context counts it in `sequential_prompt_tokens`."""
        c = self.config
        if c.distill == "summary":
            body = "\n\n".join(f"### Attempt {i + 1}\n{b.text}" for i, b in enumerate(drafts))
            prompt = SUMMARY_PROMPT.format(question=self.question(problem), m=len(drafts), drafts=body)
            # at most kappa, and no longer than the drafts it condenses (short drafts, e.g. a request's small
            # max_tokens, get a summary of their size, not a 2,048-token generation)
            bound = max(1, min(c.kappa, sum(b.num_tokens for b in drafts)))
            (s,) = ctx.spawn([{"role": "user", "content": prompt}], 1,
                             c.sampling(max_tokens=bound), group=f"distill{r}")
            await ctx.wait_all([s])
            summary = await counter.cut(s.text, c.kappa)
            if summary != s.text:
                note = "\n[summary cut at the workspace bound]"
                summary = await counter.cut(s.text, c.kappa - await counter.count(note)) + note
            return [summary]
        if c.distill == "topk":
            chosen = self.select(problem, drafts)[: c.k]
            return [await self.pack(chosen, counter, problem)]
        outs = []
        for _ in range(max(1, next_m)):
            chosen = rng.sample(drafts, min(c.k, len(drafts)))
            outs.append(await self.pack(chosen, counter, problem))
        return outs

    def select(self, problem: Problem, drafts: list[Branch]) -> list[Branch]:
        """Drafts best first, by the selector."""
        if self.config.selector == "mean_logprob":
            return sorted(drafts, key=lambda b: (-mean_logprob(b.logprobs) if b.logprobs else float("inf"),
                                                 b.finish_order or 0))
        answers = [self.answer_of(b, problem) for b in drafts]
        v = vote(answers, order=[b.finish_order or 0 for b in drafts], kind=problem.kind)
        winners = set(v.winner_members)
        return [drafts[i] for i in winners] + [b for i, b in enumerate(drafts) if i not in winners]

    async def pack(self, chosen: list[Branch], counter: TokenCounter, problem: Problem) -> str:
        """Drafts verbatim, each within its share of kappa, so the whole stays within kappa tokens.

        A draft longer than its share keeps its *end* (the conclusion) and its final answer; the
        workspace says that the beginning was cut and how long the attempt was.
        """
        sep = "\n\n"
        share = max(1, (self.config.kappa - (len(chosen) - 1) * await counter.count(sep)) // max(1, len(chosen)))
        parts = [await self.excerpt(i, b, share, counter, problem) for i, b in enumerate(chosen)]
        ws = sep.join(parts)
        return await counter.cut(ws, self.config.kappa)

    async def excerpt(self, i: int, draft: Branch, limit: int, counter: TokenCounter, problem: Problem) -> str:
        """Attempt `i` in at most `limit` tokens: whole, or its end and final answer after a note of the cut."""
        whole = f"### Attempt {i + 1}\n{draft.text}"
        if await counter.count(whole) <= limit:
            return whole
        answer = self.answer_of(draft, problem)
        head = (f"### Attempt {i + 1} (its beginning is cut: {draft.num_tokens} tokens in all; its end and "
                f"final answer follow)\n...")
        answer_line = f"\n[final answer of this attempt: {answer}]" if answer is not None else ""
        room = limit - await counter.count(head)
        tail = await counter.cut(draft.text, room, tail=True)
        if answer is not None and self.answer_of_text(tail, problem) == answer:
            answer_line = ""  # the kept end states the answer itself
        else:
            tail = await counter.cut(draft.text, room - await counter.count(answer_line), tail=True)
        out = head + tail + answer_line
        while tail and await counter.count(out) > limit:  # tokenizers that do not add up: drop more
            tail = tail[max(1, len(tail) // 16):]
            out = head + tail + answer_line
        return out if await counter.count(out) <= limit else await counter.cut(out, limit)

    @staticmethod
    def answer_of_text(text: str, problem: Problem) -> str | None:
        return extract_answer(text, problem.kind, problem.choices)

    @classmethod
    def max_branches(cls, config: PDRConfig) -> int:
        """Every round's drafts, plus one summary call between rounds with `distill: summary`."""
        distills = len(config.schedule) - 1 if config.distill == "summary" else 0
        return sum(config.schedule) + distills

    @classmethod
    def max_tokens_bound(cls, config: PDRConfig) -> int:
        distills = len(config.schedule) - 1 if config.distill == "summary" else 0
        return sum(config.schedule) * config.max_tokens + distills * config.kappa


class SRConfig(PDRConfig):
    width_field: ClassVar[str | None] = None  # one draft per round: rounds are depth, not width

    rounds: int = Field(3, ge=1, description="SR rounds (sets schedule to [1] * rounds)")
    schedule: list[int] = Field([1, 1, 1], description="SR: M_r = 1 every round")
    distill: Literal["summary", "topk", "randomk"] = "topk"
    k: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _all_one(self) -> SRConfig:
        if "schedule" in self.model_fields_set and "rounds" not in self.model_fields_set:
            self.rounds = len(self.schedule)
        if any(m != 1 for m in self.schedule) or len(self.schedule) != self.rounds:
            if "schedule" in self.model_fields_set:
                raise ValueError(f"sequential refinement has M_r = 1 in each of its {self.rounds} rounds "
                                 f"(got schedule {self.schedule}); use pdr otherwise")
            self.schedule = [1] * self.rounds
        return self


@register("sr", "sequential-refinement")
class SequentialRefinement(ParallelDistillRefine):
    """SR: PDR with one draft per round, refined from the previous one (verbatim, cut to kappa)."""

    Config = SRConfig

"""Parallel-Distill-Refine and Sequential Refinement (arXiv 2510.01123).

PDR runs rounds r = 1..R. Round r samples M_r drafts in parallel, each conditioned on the question and
the workspace C^(r-1) (empty for r = 1); the drafts are then distilled into a new workspace C^(r) of at
most `kappa` tokens, rebuilt from scratch each round. The last round has M_R = 1 and its draft is the
answer. SR (Sequential Refinement) is PDR with M_r = 1 every round: one candidate refined repeatedly
(its workspace is the previous candidate, verbatim, cut to kappa tokens).

Distill operators (the paper's three):
- `summary`: the model writes a bounded summary of the drafts (agreements, contradictions, derived facts,
  open sub-goals, next steps), generated with max_tokens = kappa;
- `topk`: the k best drafts verbatim, chosen by a selector (`mean_logprob`: the drafts' length-normalised
  likelihood; `vote`: drafts whose answer agrees with the majority first), kappa split evenly among them;
- `randomk`: k random drafts, drawn anew for every next-round generation.

Workspace bound: the workspace is measured with the backend's tokenizer (`tokenize`); text is cut to the
longest prefix that fits (binary search, then checked), so no prompt ever carries more than kappa
workspace tokens. Without `tokenize` the UTF-8 byte count is used, which is an upper bound on the token
count of byte-level BPE tokenizers (the Result's `fallbacks` says so).

Budgets (the paper reports both): *sequential* = tokens along the accepted path (one draft per round
plus the distill call), *total* = every call. `Usage.sequential_tokens` counts generated tokens on the
critical path, `Usage.sequential_prompt_tokens` the prompt tokens of the calls on it (the largest prompt
of each stage); `decision["budgets"]` has both sums.

Paper's knobs: rounds with an M_r schedule ending in 1, the three distill operators, kappa.
Ours (the numbers are not in STRATEGIES.md): the default schedule [8, 4, 1], kappa=2048,
distill=summary, k=2, the topk selectors and the prompts.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ttscale.answers import vote
from ttscale.controller import Context
from ttscale.judges.confidence import mean_logprob
from ttscale.prompts import system_prompt_for
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import Branch, BranchStatus, Problem, Result, Usage

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

    async def cut(self, text: str, limit: int) -> str:
        """Longest prefix of `text` with at most `limit` tokens (checked, never over)."""
        if limit <= 0:
            return ""
        if await self.count(text) <= limit:
            return text
        lo, hi = 0, len(text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if await self.count(text[:mid]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        out = text[:lo]
        while out and await self.count(out) > limit:  # non-monotone tokenizers: shrink until it fits
            out = out[:-1]
        return out


@register("pdr", "parallel-distill-refine")
class ParallelDistillRefine(Strategy):
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
        return Problem(id=problem.id, prompt=prompt).chat(self.config.system_prompt or system_prompt_for(problem.kind))

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        counter = TokenCounter(ctx.backend)
        fallbacks = [] if counter.exact else [BYTES_FALLBACK]
        rng = random.Random(c.seed if c.seed is not None else ctx.seed)
        workspaces: list[str] = [""]  # per next-round generation (randomk gives each its own)
        seq_prompt = 0
        rounds: list[dict[str, Any]] = []
        last: list[Branch] = []
        for r, m in enumerate(c.schedule, 1):
            drafts: list[Branch] = []
            for i in range(m):
                ws = workspaces[i % len(workspaces)]
                drafts += ctx.spawn(self.refine_messages(problem, ws), 1, c.sampling(), group=f"round{r}",
                                    meta={"round": r, "workspace_tokens": await counter.count(ws) if ws else 0})
            await ctx.wait_all(drafts)
            seq_prompt += max((b.prompt_tokens for b in drafts), default=0)
            ok = [b for b in drafts if b.status is BranchStatus.finished]
            rounds.append({"round": r, "drafts": [b.id for b in drafts],
                           "workspace_tokens": [b.meta["workspace_tokens"] for b in drafts]})
            last = drafts
            if r == len(c.schedule):
                break
            if not ok:
                ctx.note("no draft finished; the workspace stays as it was", round=r)
                continue
            workspaces, distill_prompt = await self.distill(problem, ctx, ok, counter, rng, r, c.schedule[r])
            seq_prompt += distill_prompt
            ctx.note("distilled", round=r, operator=c.distill,
                     workspace_tokens=[await counter.count(w) for w in workspaces])
        ctx.add_usage(Usage(sequential_prompt_tokens=seq_prompt))
        traces = [self.trace(b, problem) for b in ctx.branches.values() if b.group is None or b.group.startswith("round")]
        final = [b for b in last if b.status is BranchStatus.finished]
        by_id = {t.id: t for t in traces}
        answer = by_id[final[0].id].answer if final else None
        u = ctx.usage
        decision = {"rounds": rounds, "kappa": c.kappa, "operator": c.distill, "final": final[0].id if final else None,
                    "budgets": {"sequential": u.sequential_tokens + u.sequential_prompt_tokens,
                                "total": u.generated_tokens + u.prompt_tokens}}
        return self.result(problem, ctx, answer=answer, traces=traces, decision=decision,
                           text=final[0].text if final else None, fallbacks=fallbacks)

    async def distill(self, problem: Problem, ctx: Context, drafts: list[Branch], counter: TokenCounter,
                      rng: random.Random, r: int, next_m: int) -> tuple[list[str], int]:
        """The next round's workspace(s) and the prompt tokens the distill step put on the critical path."""
        c = self.config
        if c.distill == "summary":
            body = "\n\n".join(f"### Attempt {i + 1}\n{b.text}" for i, b in enumerate(drafts))
            prompt = SUMMARY_PROMPT.format(question=self.question(problem), m=len(drafts), drafts=body)
            (s,) = ctx.spawn([{"role": "user", "content": prompt}], 1,
                             c.sampling(max_tokens=c.kappa), group=f"distill{r}")
            await ctx.wait_all([s])
            return [await counter.cut(s.text, c.kappa)], s.prompt_tokens
        if c.distill == "topk":
            chosen = self.select(problem, drafts)[: c.k]
            return [await self.pack(chosen, counter)], 0
        outs = []
        for _ in range(max(1, next_m)):
            chosen = rng.sample(drafts, min(c.k, len(drafts)))
            outs.append(await self.pack(chosen, counter))
        return outs, 0

    def select(self, problem: Problem, drafts: list[Branch]) -> list[Branch]:
        """Drafts best first, by the selector."""
        if self.config.selector == "mean_logprob":
            return sorted(drafts, key=lambda b: (-mean_logprob(b.logprobs) if b.logprobs else float("inf"),
                                                 b.finish_order or 0))
        answers = [self.answer_of(b, problem) for b in drafts]
        v = vote(answers, order=[b.finish_order or 0 for b in drafts], kind=problem.kind)
        winners = set(v.winner_members)
        return [drafts[i] for i in winners] + [b for i, b in enumerate(drafts) if i not in winners]

    async def pack(self, chosen: list[Branch], counter: TokenCounter) -> str:
        """Drafts verbatim, each cut to its share of kappa, so the whole stays within kappa tokens."""
        sep = "\n\n"
        share = max(1, self.config.kappa // max(1, len(chosen)))
        parts = [await counter.cut(f"### Attempt {i + 1}\n{b.text}", share) for i, b in enumerate(chosen)]
        ws = sep.join(parts)
        return await counter.cut(ws, self.config.kappa)


class SRConfig(PDRConfig):
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

"""DeepPrune (arXiv 2510.08483): prune redundant parallel traces by clustering their prefixes.

n traces run in parallel. When a trace reaches its prefix (the first `prefix_words` reasoning words, or
the first `prefix_tokens` tokens when set, or its end if it finishes earlier), it is placed by online
greedy clustering (ttscale/judges/clustering.py): scored against up to `p` members of each cluster with
a pair judge (mean P(same)), it joins the best cluster above `tau`, else opens a new one (at most
`max_clusters`). Once every trace is placed, only the largest cluster's traces (at most `k2`) run to
completion; all others are aborted. If every cluster is a singleton the judge found no redundancy and
`k3` random traces run on instead. Majority vote over the finished survivors.

Paper's knobs: tau=0.5, prefix = first 25 reasoning words, the judge interface, largest-cluster
survival, the singleton fallback, majority vote; n=512 (the cons@512 comparison). Marked unverified in
STRATEGIES.md and exposed as config: max_clusters (K), p, k2=20, k3. Ours: traces keep generating while
the others reach their prefixes (no barrier); a trace that matches no cluster once K are open stays
unassigned; the default judge is `embedding` (the paper's fine-tuned Qwen3-4B judge is not bundled;
`judge: llm` asks the backend itself, `classifier:PATH` loads a trained `ttscale judge train` model).
Every placement is logged with `ctx.note` and ends up in `Result.decision["log"]`.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field

from ttscale.answers import vote
from ttscale.controller import Context
from ttscale.judges.clustering import OnlineClustering, select_survivors
from ttscale.judges.pairwise import JudgeBase, make_judge, reasoning_prefix
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import Branch, BranchStatus, Problem, Result, Usage


class DeepPruneConfig(StrategyConfig):
    n: int = Field(512, ge=1, le=4096, description="parallel traces (paper: 512)")
    tau: float = Field(0.5, ge=0.0, le=1.0, description="join a cluster when mean P(same) > tau (paper: 0.5)")
    prefix_words: int = Field(25, ge=1, description="prefix = text up to the k-th reasoning word (paper: 25)")
    prefix_tokens: int | None = Field(None, ge=1, description="use the first T tokens instead (paper's "
                                      "embedding baseline: 500)")
    max_clusters: int = Field(32, ge=1, description="K: most clusters opened (unverified)")
    p: int = Field(5, ge=1, description="members of a cluster a trace is compared with (unverified)")
    k2: int = Field(20, ge=1, description="most traces of the largest cluster that run on (unverified)")
    k3: int = Field(8, ge=1, description="random traces kept when every cluster is a singleton (unverified)")
    judge: str = Field("embedding", description="lexical | embedding | llm | classifier:PATH (ours)")


@register("deepprune")
class DeepPrune(Strategy):
    """Cluster live traces by prefix, keep only the largest cluster, vote."""

    Config = DeepPruneConfig
    paper = "arXiv 2510.08483"

    def __init__(self, config: Any = None, judge: JudgeBase | None = None, **kw: Any):
        super().__init__(config, **kw)
        self._judge = judge

    def check(self, backend) -> None:
        super().check(backend)
        if self._judge is None and self.config.judge == "embedding":
            from ttscale.judges.pairwise import minilm_dir

            minilm_dir()  # raises BackendUnavailable naming the package to install
        if self._judge is None and self.config.judge == "llm" and backend.capabilities.top_logprobs < 1:
            from ttscale.errors import CapabilityError

            raise CapabilityError(f"deepprune with judge=llm needs top_logprobs from {backend.name!r} "
                                  "(the judge reads P(yes) from the first token's top logprobs)")

    def judge_for(self, ctx: Context) -> JudgeBase:
        if self._judge is None:
            self._judge = make_judge(self.config.judge, backend=ctx.backend)
        return self._judge

    def prefix_of(self, b: Branch) -> str | None:
        """The judged prefix once the branch has reached it (its whole text when it ended earlier)."""
        c = self.config
        if c.prefix_tokens is not None:
            if b.num_tokens >= c.prefix_tokens and b.token_ids:
                return _text_of_first_tokens(b, c.prefix_tokens)
            return b.text if b.done else None
        pre = reasoning_prefix(b.text, c.prefix_words)
        if pre is not None:
            return pre
        return b.text if b.done else None

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        judge = self.judge_for(ctx)
        usage_before = getattr(judge, "usage", Usage())
        branches = ctx.spawn(self.messages(problem), c.n, c.sampling(), after=[])
        order = [b.id for b in branches]
        clustering = OnlineClustering(tau=c.tau, max_clusters=c.max_clusters, p=c.p)
        prefixes: dict[str, str] = {}
        pending = {b.id: b for b in branches}

        async def place(b: Branch) -> None:
            text = self.prefix_of(b)
            if text is None:
                return
            del pending[b.id]
            prefixes[b.id] = text
            members = {m for ms in clustering.compare_with().values() for m in ms}
            scores = {m: float(await judge.ap_same(text, prefixes[m])) for m in sorted(members)}
            a = clustering.add(b.id, scores)
            ctx.note("placed", branch=b.id, cluster=a.cluster, opened=a.opened,
                     scores={str(k): round(v, 4) for k, v in a.scores.items()},
                     prefix_tokens=b.num_tokens, judge=judge.name)

        for b in branches:
            if b.id in pending:
                await place(b)
        if pending:
            async for ev in ctx.watch(list(pending.values())):
                b = ctx.branches[ev.branch_id]
                if b.id in pending and ev.kind in ("delta", "finished", "aborted", "failed"):
                    if b.done and b.status is not BranchStatus.finished:
                        del pending[b.id]  # failed/aborted before its prefix: nothing to judge
                    else:
                        await place(b)
                if not pending:
                    break
        rng = random.Random(c.seed if c.seed is not None else ctx.seed)
        placed = [k for k in order if k in prefixes]
        keep_ids, rule = select_survivors(clustering, placed, c.k2, c.k3, rng)
        keep = [ctx.branches[k] for k in keep_ids]
        aborted = ctx.cancel_rest(keep=keep, among=branches, reason=f"deepprune: pruned ({rule})")
        ctx.note("survivors", rule=rule, keep=keep_ids, aborted=[b.id for b in aborted],
                 clusters=[list(cl.members) for cl in clustering.clusters], unassigned=list(clustering.unassigned))
        await ctx.wait_all(keep)
        done = [b for b in keep if b.status is BranchStatus.finished]
        traces = [self.trace(b, problem) for b in branches]
        by_id = {t.id: t for t in traces}
        v = vote([by_id[b.id].answer for b in done], order=[b.finish_order or 0 for b in done], kind=problem.kind)
        if hasattr(judge, "usage"):
            spent = judge.usage.model_copy(update={
                k: getattr(judge.usage, k) - getattr(usage_before, k)
                for k in ("prompt_tokens", "generated_tokens", "calls")})
            ctx.add_usage(Usage(prompt_tokens=spent.prompt_tokens, generated_tokens=spent.generated_tokens,
                                calls=spent.calls))
        decision = {**v.as_dict(), "rule": rule, "survivors": keep_ids, "voters": [b.id for b in done],
                    "clusters": [list(cl.members) for cl in clustering.clusters],
                    "unassigned": list(clustering.unassigned), "judge": judge.name}
        text = done[v.winner_members[0]].text if v.winner_members else None
        fallbacks = ["deepprune: every cluster was a singleton; kept k3 random traces"] if rule == "fallback-k3" else []
        return self.result(problem, ctx, answer=v.answer, traces=traces, decision=decision, text=text,
                           fallbacks=fallbacks)


def _text_of_first_tokens(b: Branch, n: int) -> str:
    """Text of the first n tokens: cut the branch text in proportion when no detokenizer is at hand."""
    if b.num_tokens <= n:
        return b.text
    return b.text[: max(1, int(len(b.text) * n / b.num_tokens))]

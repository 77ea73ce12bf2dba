"""DeepPrune (arXiv 2510.08483, Tu et al., "DeepPrune: Parallel Scaling without Inter-trace Redundancy").

Authors' code: github.com/THU-KEG/DeepPrune (judge fine-tuning with a focal-loss LLaMA-Factory fork, data
on the Hub as THU-KEG/DeepPrune); we could not read its online-pruning code here, so the rule below
follows the paper's text as summarised in ../shared/STRATEGIES.md.

What we follow. n traces run in parallel. When a trace reaches its prefix (the first `prefix_words`
reasoning words, or the first `prefix_tokens` tokens; its whole text if it finishes earlier), online greedy
clustering places it (ttscale/judges/clustering.py): scored against up to `p` members of each cluster
with a pair judge (mean P(same answer)), it joins the best cluster above `tau`, else opens a new one
(at most `max_clusters`, K). A trace that joins a cluster is redundant: it is pruned. If every cluster is a
singleton the judge found no redundancy and `k3` random traces run on (the paper's fallback). The judge is
a trained one: the paper fine-tunes Qwen3-4B with focal loss and 2x oversampling of "different" pairs on
truncated prefixes labelled by rule-based answer equivalence; ours (`judge: trained`, the default) is the
same recipe on a small feature classifier (ttscale/judges/pairwise.py), trained on recorded SmolLM2
traces of problems disjoint from the ones it is tested on (scripts/train_deepprune_judge.sh). Its
held-out AUROC, and its error rates at tau, go into every `Result.decision`.

Survivors keep answer diversity (the paper's stated aim): by default (`survivors: representatives`) the
first `per_cluster` members of every cluster run to completion and the vote weights each by its
cluster's size, so every answer the judge tells apart stays a candidate and the majority still counts
the traces that were pruned as redundant. `survivors: largest` keeps only the largest cluster (first
`k2` members), the reading in STRATEGIES.md; it drops every other cluster's answer.

Deviations (ours). Traces keep generating while the others reach their prefixes (no barrier); a trace
that matches no cluster once K are open stays unassigned and is pruned; K, p, k2, k3 are unverified
knobs; the judge is a feature classifier, not an LLM (`judge: llm` asks the backend zero-shot,
`classifier:PATH` loads another trained model). `embedding` (MiniLM cosine, the paper's weak baseline:
AUROC 0.58 there, about 0.50 on SmolLM2 traces) and `lexical` are baselines only: choosing one logs a
warning and a `Result.fallbacks` entry. When neither prefix knob is set, the prefix is the one the trained
judge was trained on (its report says which; the shipped judge: the first 48 tokens, since SmolLM2's short
traces seldom reach 25 reasoning words), else the paper's 25 reasoning words. tau: the paper's 0.5 suits
its judge on traces where 80% of pairs agree; the shipped judge carries a tau calibrated on its training
problems (the lowest that joins at most 10% of their different-answer pairs); a tau in the config wins.
Every placement is logged with `ctx.note` and ends up in `Result.decision["log"]`.
"""

from __future__ import annotations

import logging
import random
from typing import Any, ClassVar, Literal

from pydantic import Field

from ttscale.answers import vote
from ttscale.backends.base import Backend
from ttscale.controller import Context
from ttscale.judges.clustering import OnlineClustering, select_survivors
from ttscale.judges.pairwise import JudgeBase, judged_prefix, make_judge, parse_judge_spec
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import Branch, BranchStatus, Problem, Result, Usage

log = logging.getLogger(__name__)

# Judges that are not trained for the task: allowed when chosen by name, with a warning.
BASELINE_JUDGES = {
    "embedding": "MiniLM cosine similarity, the paper's weak baseline (AUROC 0.58 in the paper, about 0.50 on "
                 "SmolLM2 traces: it merges traces with different answers)",
    "lexical": "n-gram overlap, an untrained floor",
}
PAPER_PREFIX_WORDS = 25
PAPER_TAU = 0.5


class DeepPruneConfig(StrategyConfig):
    n: int = Field(512, ge=1, le=4096, description="parallel traces (paper: 512)")
    tau: float | None = Field(None, ge=0.0, le=1.0, description="join a cluster when mean P(same) > tau "
                              "(paper: 0.5; default: the trained judge's calibrated tau, else 0.5)")
    prefix_words: int | None = Field(None, ge=1, description="prefix = text up to the k-th reasoning word "
                                     "(paper: 25; default: the trained judge's prefix, else 25)")
    prefix_tokens: int | None = Field(None, ge=1, description="use the first T tokens instead (paper's "
                                      "embedding baseline: 500)")
    max_clusters: int = Field(32, ge=1, description="K: most clusters opened (unverified)")
    p: int = Field(5, ge=1, description="members of a cluster a trace is compared with (unverified)")
    survivors: Literal["representatives", "largest"] = Field(
        "representatives", description="representatives: per_cluster traces of every cluster run on, vote "
        "weighted by cluster size (keeps answer diversity); largest: only the largest cluster")
    per_cluster: int = Field(1, ge=1, description="traces of each cluster that run on (representatives)")
    k2: int = Field(20, ge=1, description="most traces of the largest cluster that run on (survivors=largest)")
    k3: int = Field(8, ge=1, description="random traces kept when every cluster is a singleton (unverified)")
    judge: str = Field("trained", description="trained | classifier:PATH | llm | embedding, lexical "
                       "(untrained baselines, warned)")


@register("deepprune")
class DeepPrune(Strategy[DeepPruneConfig]):
    """Cluster live traces by prefix with a trained judge, prune the redundant ones, weighted vote."""

    Config = DeepPruneConfig
    paper = "arXiv 2510.08483"
    resource_fields: ClassVar[dict[str, str]] = {"judge": "judge"}

    def __init__(self, config: Any = None, judge: JudgeBase | None = None, **kw: Any):
        super().__init__(config, **kw)
        self._judge = judge

    def check(self, backend: Backend) -> None:
        super().check(backend)
        kind = None if self._judge is not None else parse_judge_spec(self.config.judge).name  # bad spec: fail now
        if kind == "embedding":
            from ttscale.judges.pairwise import minilm_dir

            minilm_dir()  # raises BackendUnavailable naming the package to install
        if kind == "trained":
            make_judge("trained")  # raises ConfigError naming the script that builds it
        if kind == "llm" and backend.capabilities.top_logprobs < 1:
            from ttscale.errors import CapabilityError

            raise CapabilityError(f"deepprune with judge=llm needs top_logprobs from {backend.name!r} "
                                  "(the judge reads P(yes) from the first token's top logprobs)")

    def judge_for(self, ctx: Context) -> JudgeBase:
        if self._judge is None:
            self._judge = make_judge(self.config.judge, backend=ctx.backend)
        return self._judge

    def prefix_rule(self, judge: JudgeBase) -> dict[str, int]:
        """{"tokens": T} or {"words": k}: the config's, else the trained judge's, else the paper's 25 words."""
        c = self.config
        if c.prefix_tokens is not None:
            return {"tokens": c.prefix_tokens}
        if c.prefix_words is not None:
            return {"words": c.prefix_words}
        trained = getattr(judge, "report", {}).get("prefix") or {}
        if trained.get("tokens"):
            return {"tokens": int(trained["tokens"])}
        return {"words": int(trained.get("words") or PAPER_PREFIX_WORDS)}

    def eval_note(self) -> str:
        """One line for the eval CLI: which judge, and its held-out AUROC as measured when it was trained."""
        spec = self.config.judge
        if self._judge is not None:
            report, name = getattr(self._judge, "report", {}) or {}, self._judge.name
        elif spec == "trained" or spec.startswith("classifier:"):
            report, name = getattr(make_judge(spec), "report", {}) or {}, spec
        else:
            report, name = {}, spec
        held = report.get("heldout")
        if not held:
            why = " (untrained baseline)" if name in BASELINE_JUDGES else ""
            return f"deepprune judge {name!r}{why}: no held-out AUROC measured"
        return (f"deepprune judge {name!r}: held-out AUROC {held['auroc']:.3f}, TNR@0.2FNR "
                f"{held['tnr_at_0.2_fnr']:.3f}, FPR {held['fpr']:.3f} at its tau {held['tau']:.3f} "
                f"({held['pairs']} pairs of held-out problems)")

    def tau_for(self, judge: JudgeBase) -> float:
        """The config's tau, else the one the trained judge was calibrated for, else the paper's 0.5."""
        if self.config.tau is not None:
            return self.config.tau
        return float((getattr(judge, "report", {}) or {}).get("tau", PAPER_TAU))

    @staticmethod
    def prefix_of(b: Branch, rule: dict[str, int]) -> str | None:
        """The judged prefix once the branch has reached it (its whole text when it ended earlier)."""
        return judged_prefix(b.text, done=b.done, num_tokens=b.num_tokens,
                             prefix_words=rule.get("words", PAPER_PREFIX_WORDS), prefix_tokens=rule.get("tokens"))

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        judge = self.judge_for(ctx)
        rule = self.prefix_rule(judge)
        fallbacks: list[str] = []
        if judge.name in BASELINE_JUDGES and c.judge == judge.name:
            msg = (f"deepprune: judge {judge.name!r} is an untrained baseline ({BASELINE_JUDGES[judge.name]}); "
                   "the default is the trained judge")
            log.warning(msg)
            fallbacks.append(msg)
        usage_before = getattr(judge, "usage", Usage())
        branches = ctx.spawn(self.messages(problem), c.n, c.sampling(), after=[])
        order = [b.id for b in branches]
        tau = self.tau_for(judge)
        clustering = OnlineClustering(tau=tau, max_clusters=c.max_clusters, p=c.p)
        prefixes: dict[str, str] = {}
        pending = {b.id: b for b in branches}

        async def place(b: Branch) -> None:
            text = self.prefix_of(b, rule)
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
                assert ev.branch_id is not None  # watch yields only the watched branches' events
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
        surv = select_survivors(clustering, placed, rng, rule=c.survivors, per_cluster=c.per_cluster,
                                k2=c.k2, k3=c.k3)
        keep = [ctx.branches[k] for k in surv.keep]
        aborted = ctx.cancel_rest(keep=keep, among=branches, reason=f"deepprune: pruned ({surv.rule})")
        ctx.note("survivors", rule=surv.rule, keep=surv.keep, aborted=[b.id for b in aborted],
                 clusters=[list(cl.members) for cl in clustering.clusters], unassigned=list(clustering.unassigned))
        await ctx.wait_all(keep)
        done = [b for b in keep if b.status is BranchStatus.finished]
        traces = [self.trace(b, problem) for b in branches]
        by_id = {t.id: t for t in traces}
        weights = vote_weights(clustering, surv.rule, [b.id for b in done])
        v = vote([by_id[b.id].answer for b in done], weights=[weights[b.id] for b in done],
                 order=[b.finish_order or 0 for b in done], kind=problem.kind)
        if hasattr(judge, "usage"):
            spent = judge.usage.model_copy(update={
                k: getattr(judge.usage, k) - getattr(usage_before, k)
                for k in ("prompt_tokens", "generated_tokens", "calls")})
            ctx.add_usage(Usage(prompt_tokens=spent.prompt_tokens, generated_tokens=spent.generated_tokens,
                                calls=spent.calls))
        decision = {**v.as_dict(), "rule": surv.rule, "survivors": surv.keep, "voters": [b.id for b in done],
                    "weights": {b.id: weights[b.id] for b in done},
                    "clusters": [list(cl.members) for cl in clustering.clusters],
                    "unassigned": list(clustering.unassigned), "judge": judge.name, "prefix": rule, "tau": tau,
                    **judge_measurement(judge)}
        text = done[v.winner_members[0]].text if v.winner_members else None
        if surv.rule == "fallback-k3":
            fallbacks.append("deepprune: every cluster was a singleton; kept k3 random traces")
        return self.result(problem, ctx, answer=v.answer, traces=traces, decision=decision, text=text,
                           fallbacks=fallbacks)

    @classmethod
    def max_branches(cls, config: DeepPruneConfig) -> int:
        """n traces, plus, with the `llm` judge, one call per comparison: a placed trace is compared with at
        most `p` members of each of at most `max_clusters` clusters."""
        n = config.n
        if config.judge != "llm":
            return n
        return n + n * min(n - 1, config.p * config.max_clusters)

    @classmethod
    def max_tokens_bound(cls, config: DeepPruneConfig) -> int:
        """n traces at `max_tokens`; an `llm` judge's call generates one token."""
        return config.n * config.max_tokens + (cls.max_branches(config) - config.n)


def vote_weights(clustering: OnlineClustering, rule: str, finished: list[str]) -> dict[str, float]:
    """Vote weight of each finished survivor: with `representatives`, its cluster's size shared among the
    cluster's representatives that finished (a failed representative's share goes to the others); else 1."""
    if rule != "representatives":
        return {k: 1.0 for k in finished}
    out: dict[str, float] = {}
    for k in finished:
        cl = clustering.cluster_of(k)
        reps_done = [m for m in finished if cl is not None and m in cl.members]
        out[k] = len(cl.members) / len(reps_done) if cl is not None else 1.0
    return out


def judge_measurement(judge: JudgeBase) -> dict[str, Any]:
    """The judge's held-out AUROC and error rates at tau as measured when it was trained (None if never)."""
    report = getattr(judge, "report", {}) or {}
    held = report.get("heldout", {})
    return {"judge_auroc": held.get("auroc"), "judge_tnr_at_0.2_fnr": held.get("tnr_at_0.2_fnr"),
            "judge_fpr_at_tau": held.get("fpr"), "judge_heldout_pairs": held.get("pairs")}

"""First Finish Search (arXiv 2505.18149) and its relatives: FFS-k@n, short-m@k, Last-Finish Search.

FFS samples n traces in parallel; the first trace to finish (EOS, or the length limit) wins and the rest
are aborted on the backend. No answer parsing, no vote: the winner's answer is the answer.

- Async-FFS (`ffs`, the default `mode: async`): n independent requests, the first to finish wins.
- Sync-FFS (`sync-ffs`, or `mode: sync`): the paper decodes all n in lockstep in one batch and stops
  the batch at the first EOS. No backend here exposes a lockstep batch, so it is emulated: all n are
  started together (continuous-batching engines decode them in the same steps) and every branch is
  stopped the moment the first EOS arrives — the same stopping rule. The Result lists this in
  `fallbacks`. The winner is the branch with the fewest tokens among those finished at that moment.
- FFS-k@n (`ffs-k`): keep running until the k first traces finished (= the k shortest under lockstep
  decoding), abort the rest, majority-vote over those k (ties go to the earliest finisher).
- short-m@k (`short-m`, Hassid et al. 2025, arXiv 2505.17813): k samples, stop once m finished, vote
  among the m (ties to the shortest = earliest finisher).
- Last-Finish Search (`last-finish`): the paper's ablation, wait for all and take the longest.

Knobs: n=4, temperature 0.6, top-p 0.95 are the paper's (unverified defaults in STRATEGIES.md); the paper
allows 32K tokens on AIME (16K on GPQA); `max_tokens` keeps the library default and is set per dataset.
`stop`/`stop_token_ids` (extra finish conditions) are ours.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ttscale.answers import vote
from ttscale.controller import Context
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import Branch, BranchStatus, Problem, Result

SYNC_EMULATION = ("sync-ffs: the backend has no lockstep batching; emulated by starting all n together and "
                  "stopping every branch when the first EOS arrives (the same stopping rule)")


class FFSConfig(StrategyConfig):
    n: int = Field(4, ge=1, le=4096, description="parallel traces (paper: 4)")
    mode: Literal["async", "sync"] = Field("async", description="async: independent requests; sync: lockstep")
    stop: list[str] = Field([], description="extra stop strings (ours)")
    stop_token_ids: list[int] = Field([], description="extra stop token ids (ours)")

    def branch_sampling(self):
        return self.sampling(stop=list(self.stop), stop_token_ids=list(self.stop_token_ids))


NO_ABORT = ("the backend reports no abort: losers' streams were closed, but the server may keep generating "
            "them, so the saved tokens are saved for the client only")


class _FFSBase(Strategy):
    paper = "arXiv 2505.18149"

    @staticmethod
    def abort_fallbacks(ctx: Context) -> list[str]:
        """FFS's savings come from aborting losers on the server; say so when the backend cannot."""
        return [] if ctx.backend.capabilities.abort else [NO_ABORT]

    def _vote_result(self, problem: Problem, ctx: Context, branches: list[Branch], voters: list[Branch],
                     decision: dict, fallbacks: list[str]) -> Result:
        traces = [self.trace(b, problem) for b in branches]
        by_id = {t.id: t for t in traces}
        answers = [by_id[b.id].answer for b in voters]
        v = vote(answers, order=[b.finish_order or 0 for b in voters], kind=problem.kind)
        decision = {**decision, **v.as_dict(), "voters": [b.id for b in voters]}
        text = voters[v.winner_members[0]].text if v.winner_members else None
        return self.result(problem, ctx, answer=v.answer, traces=traces, decision=decision, text=text,
                           fallbacks=fallbacks)


@register("ffs", "first-finish", "async-ffs")
class FirstFinishSearch(_FFSBase):
    """The first trace to finish wins; the others are aborted."""

    Config = FFSConfig

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        branches = ctx.spawn(self.messages(problem), c.n, c.branch_sampling(), after=[])
        won = await ctx.first_finished(branches, 1)
        fallbacks = self.abort_fallbacks(ctx)
        if c.mode == "sync" and won:
            fallbacks.append(SYNC_EMULATION)
            # Everything that finished in the same instant as the first EOS competes; fewest tokens wins.
            same_time = [b for b in branches if b.status is BranchStatus.finished]
            won = [min(same_time, key=lambda b: (b.num_tokens, b.finish_order or 0))]
        aborted = ctx.cancel_rest(keep=won, among=branches, reason="ffs: another trace finished first")
        traces = [self.trace(b, problem) for b in branches]
        winner = won[0] if won else None
        if won:
            ctx.note("first finished", winner=winner.id, tokens=winner.num_tokens,
                     aborted=[b.id for b in aborted])
        else:
            ctx.note("no trace finished", statuses={b.id: b.status.value for b in branches})
        answer = next((t.answer for t in traces if winner is not None and t.id == winner.id), None)
        decision = {"winner": winner.id if winner else None, "mode": c.mode,
                    "winner_tokens": winner.num_tokens if winner else None,
                    "aborted": [b.id for b in aborted]}
        return self.result(problem, ctx, answer=answer, traces=traces, decision=decision,
                           text=winner.text if winner else None, fallbacks=fallbacks)


class SyncFFSConfig(FFSConfig):
    mode: Literal["async", "sync"] = "sync"


@register("sync-ffs")
class SyncFirstFinishSearch(FirstFinishSearch):
    """Sync-FFS: lockstep decoding, emulated (see module docstring)."""

    Config = SyncFFSConfig


class FFSkConfig(FFSConfig):
    n: int = Field(8, ge=1, le=4096, description="traces sampled (ours)")
    k: int = Field(3, ge=1, description="vote over the k first finished (ours)")


@register("ffs-k", "ffs-k@n")
class FFSk(_FFSBase):
    """FFS-k@n: vote over the k first (shortest) of n traces; abort the others."""

    Config = FFSkConfig

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        if c.k > c.n:
            from ttscale.errors import ConfigError

            raise ConfigError(f"ffs-k needs k <= n, got k={c.k}, n={c.n}")
        branches = ctx.spawn(self.messages(problem), c.n, c.branch_sampling(), after=[])
        won = await ctx.first_finished(branches, c.k)
        aborted = ctx.cancel_rest(keep=won, among=branches, reason=f"ffs-k: {c.k} traces finished first")
        ctx.note(f"first {len(won)} finished", voters=[b.id for b in won], aborted=[b.id for b in aborted])
        return self._vote_result(problem, ctx, branches, won, {"k": c.k, "aborted": [b.id for b in aborted]},
                                 self.abort_fallbacks(ctx))


class ShortMConfig(StrategyConfig):
    k: int = Field(8, ge=1, le=4096, description="samples (short-m@k's k)")
    m: int = Field(3, ge=1, description="stop once m finished; vote among them (paper's best: m=3)")
    stop: list[str] = Field([], description="extra stop strings (ours)")
    stop_token_ids: list[int] = Field([], description="extra stop token ids (ours)")


@register("short-m", "short-m@k")
class ShortM(_FFSBase):
    """short-m@k: k samples, stop when m finished, vote among the m."""

    Config = ShortMConfig
    paper = "arXiv 2505.17813"

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        if c.m > c.k:
            from ttscale.errors import ConfigError

            raise ConfigError(f"short-m needs m <= k, got m={c.m}, k={c.k}")
        sampling = c.sampling(stop=list(c.stop), stop_token_ids=list(c.stop_token_ids))
        branches = ctx.spawn(self.messages(problem), c.k, sampling, after=[])
        won = await ctx.first_finished(branches, c.m)
        aborted = ctx.cancel_rest(keep=won, among=branches, reason=f"short-m: {c.m} traces finished")
        ctx.note(f"first {len(won)} of {c.k} finished", voters=[b.id for b in won])
        return self._vote_result(problem, ctx, branches, won, {"m": c.m, "aborted": [b.id for b in aborted]},
                                 self.abort_fallbacks(ctx))


@register("last-finish", "lfs")
class LastFinishSearch(_FFSBase):
    """Last-Finish Search (the FFS paper's ablation): wait for all n, take the longest trace."""

    Config = FFSConfig

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        branches = ctx.spawn(self.messages(problem), c.n, c.branch_sampling(), after=[])
        await ctx.wait_all(branches)
        done = [b for b in branches if b.status is BranchStatus.finished]
        traces = [self.trace(b, problem) for b in branches]
        longest = max(done, key=lambda b: (b.num_tokens, b.finish_order or 0), default=None)
        answer = next((t.answer for t in traces if longest is not None and t.id == longest.id), None)
        ctx.note("last finished", chosen=longest.id if longest else None)
        return self.result(problem, ctx, answer=answer, traces=traces, text=longest.text if longest else None,
                           decision={"chosen": longest.id if longest else None,
                                     "chosen_tokens": longest.num_tokens if longest else None})

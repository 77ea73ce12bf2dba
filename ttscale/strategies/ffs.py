"""First Finish Search (arXiv 2505.18149) and its relatives: FFS-k@n, short-m@k, Last-Finish Search.

Paper: "First Finish Search: Efficient Test-Time Scaling in Large Language Models", Agarwal et al. 2025.
Authors' code: none public that we know of; every rule below is from the paper's text.

FFS samples n traces in parallel; the first trace to finish (EOS, or the length limit) wins and the rest
are aborted on the backend. No answer parsing, no vote: the winner's answer is the answer.

- Async-FFS (`ffs`, the default `mode: async`): n independent requests, the first to finish wins. We
  follow the paper.
- Sync-FFS (`sync-ffs`, or `mode: sync`): the paper decodes all n in lockstep in one batch and stops at
  the first EOS, so the winner is the trace with the fewest tokens. We give that result on every backend:
  once a trace finishes with L tokens, every live trace with at least L tokens is aborted (it cannot
  finish shorter) and the others are waited for until they finish (a shorter finisher becomes the winner)
  or reach the best length. On our engine, which decodes every running branch one token per step, the
  first to finish already is the shortest and the wait is at most a step; on a backend whose streams
  run at different speeds it waits for slow streams, so a fast long trace never beats a slow short one.
  Ties (same length) go to the earliest finisher. `decision["waited_for"]` lists the traces that had
  fewer tokens than the first finisher when it ended.
- FFS-k@n (`ffs-k`, from later work, not the paper): keep running until the k first traces finished,
  abort the rest, majority-vote over those k (ties to the earliest finisher). It takes the first k to
  finish, not the k shortest: on a backend with uneven stream speeds they can differ.
- short-m@k (`short-m`, Hassid et al. 2025, arXiv 2505.17813, no authors' code used): k samples, stop
  once m finished, vote among the m (ties to the earliest finisher, which is the shortest under lockstep
  decoding; the paper's tie rule favours short chains, unverified). Same caveat on stream speeds as FFS-k.
- Last-Finish Search (`last-finish`): the paper's ablation, wait for all and take the longest.

Knobs: n=4, temperature 0.6, top-p 0.95 are the paper's (unverified defaults in STRATEGIES.md); the paper
allows 32K tokens on AIME (16K on GPQA); `max_tokens` keeps the library default and is set per dataset.
`stop`/`stop_token_ids` (extra finish conditions) are ours. Deviation: when the backend cannot abort, the
losers' streams are closed but the server may keep generating; the Result says so in `fallbacks`.
"""

from __future__ import annotations

from typing import ClassVar, Literal, TypeVar

from pydantic import Field

from ttscale.answers import vote
from ttscale.controller import Context
from ttscale.strategies.base import Strategy, StrategyConfig
from ttscale.strategies.registry import register
from ttscale.types import Branch, BranchStatus, Problem, Result, SamplingSpec


class FFSConfig(StrategyConfig):
    n: int = Field(4, ge=1, le=4096, description="parallel traces (paper: 4)")
    mode: Literal["async", "sync"] = Field("async", description="async: independent requests; sync: lockstep")
    stop: list[str] = Field([], description="extra stop strings (ours)")
    stop_token_ids: list[int] = Field([], description="extra stop token ids (ours)")

    def branch_sampling(self) -> SamplingSpec:
        return self.sampling(stop=list(self.stop), stop_token_ids=list(self.stop_token_ids))


NO_ABORT = ("the backend reports no abort: losers' streams were closed, but the server may keep generating "
            "them, so the saved tokens are saved for the client only")


FC = TypeVar("FC", bound=StrategyConfig)


class _FFSBase(Strategy[FC]):
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
class FirstFinishSearch(_FFSBase[FFSConfig]):
    """The first trace to finish wins; the others are aborted."""

    Config = FFSConfig

    async def run(self, problem: Problem, ctx: Context) -> Result:
        c = self.config
        branches = ctx.spawn(self.messages(problem), c.n, c.branch_sampling(), after=[])
        waited: list[str] = []
        if c.mode == "sync":
            winner = await fewest_tokens_finisher(ctx, branches)
            won = [winner] if winner is not None else []
            waited = behind_first_finisher(branches)
        else:
            won = await ctx.first_finished(branches, 1)
        fallbacks = self.abort_fallbacks(ctx)
        ctx.cancel_rest(keep=won, among=branches, reason="ffs: another trace finished first")
        aborted = [b for b in branches if b.status is BranchStatus.aborted]
        traces = [self.trace(b, problem) for b in branches]
        winner = won[0] if won else None
        if winner is not None:
            ctx.note("first finished", winner=winner.id, tokens=winner.num_tokens,
                     aborted=[b.id for b in aborted])
        else:
            ctx.note("no trace finished", statuses={b.id: b.status.value for b in branches})
        answer = next((t.answer for t in traces if winner is not None and t.id == winner.id), None)
        decision = {"winner": winner.id if winner else None, "mode": c.mode,
                    "winner_tokens": winner.num_tokens if winner else None,
                    "aborted": [b.id for b in aborted]}
        if c.mode == "sync":
            decision["waited_for"] = waited
        return self.result(problem, ctx, answer=answer, traces=traces, decision=decision,
                           text=winner.text if winner else None, fallbacks=fallbacks)


def cannot_finish_shorter(tokens: int, best_tokens: int) -> bool:
    """A live trace with `tokens` so far can no longer finish with fewer than `best_tokens` (ties lose)."""
    return tokens >= best_tokens


async def fewest_tokens_finisher(ctx: Context, branches: list[Branch]) -> Branch | None:
    """Sync-FFS on any backend: the finished branch with the fewest tokens, as lockstep decoding picks it.

    Live branches are aborted as soon as they have as many tokens as the best finisher so far; branches
    still shorter are waited for. Returns None when no branch finished.
    """
    best: Branch | None = None
    async for ev in ctx.watch(branches):
        assert ev.branch_id is not None  # watch yields only the watched branches' events
        b = ctx.branches[ev.branch_id]
        if ev.kind == "finished" and (best is None or b.num_tokens < best.num_tokens):
            best = b
        if best is None:
            continue
        for o in branches:
            if not o.done and cannot_finish_shorter(o.num_tokens, best.num_tokens):
                ctx.cancel(o, reason="sync-ffs: a trace with no more tokens finished first")
    return best


def behind_first_finisher(branches: list[Branch]) -> list[str]:
    """Ids of the branches that had fewer tokens than the first finisher at the moment it finished
    (read off their token timestamps): the ones a first-EOS rule would have stopped too early."""
    done = [b for b in branches if b.status is BranchStatus.finished and b.finished_at is not None]
    if not done:
        return []
    first = min(done, key=lambda b: b.finish_order or 0)
    first_at = first.finished_at
    assert first_at is not None  # `done` holds only branches with a finish time
    return [b.id for b in branches if b is not first
            and sum(t <= first_at for t in b.token_times) < first.num_tokens]


class SyncFFSConfig(FFSConfig):
    mode: Literal["async", "sync"] = "sync"


@register("sync-ffs")
class SyncFirstFinishSearch(FirstFinishSearch):
    """Sync-FFS: the fewest-tokens finisher wins, as under lockstep decoding (see module docstring)."""

    Config = SyncFFSConfig


class FFSkConfig(FFSConfig):
    n: int = Field(8, ge=1, le=4096, description="traces sampled (ours)")
    k: int = Field(3, ge=1, description="vote over the k first finished (ours)")


@register("ffs-k", "ffs-k@n")
class FFSk(_FFSBase[FFSkConfig]):
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
    width_field: ClassVar[str | None] = "k"  # short-m@k: k samples run side by side, m of them are waited for

    k: int = Field(8, ge=1, le=4096, description="samples (short-m@k's k)")
    m: int = Field(3, ge=1, description="stop once m finished; vote among them (paper's best: m=3)")
    stop: list[str] = Field([], description="extra stop strings (ours)")
    stop_token_ids: list[int] = Field([], description="extra stop token ids (ours)")


@register("short-m", "short-m@k")
class ShortM(_FFSBase[ShortMConfig]):
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

    @classmethod
    def max_branches(cls, config: ShortMConfig) -> int:
        """short-m@k samples k."""
        return config.k


@register("last-finish", "lfs")
class LastFinishSearch(_FFSBase[FFSConfig]):
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

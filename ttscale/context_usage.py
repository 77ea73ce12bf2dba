"""Accounting of a Context: one Context's branches summed into a Usage, child Contexts folded in, the
per-model split (`Usage.by_model`), and what a Budget leaves or has spent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ttscale.accounting import estimated_saved_tokens, unspent_token_cap
from ttscale.backends.base import Backend
from ttscale.budget import Budget
from ttscale.types import Branch, BranchStatus, ModelUsage, Usage


@dataclass(frozen=True)
class CallCounts:
    """Backend calls a Context made besides its branches' token counts."""

    calls: int = 0
    score_calls: int = 0
    scored_tokens: int = 0


def ends_by_itself(b: Branch) -> bool:
    """A branch at exactly its own `max_tokens` (counted, not estimated) is ending by itself: a spent
    budget lets it finish instead of marking it aborted."""
    return (b.request is not None and not b.meta.get("estimated_tokens")
            and b.num_tokens == b.request.sampling.max_tokens)


def model_label(backend: Backend) -> str:
    """The per-model usage key of a backend: its model name when it has one, else its backend name."""
    return str(getattr(backend, "model", None) or backend.name)


def model_counts(u: Usage) -> ModelUsage:
    """The per-model part of a Usage (the counts `Usage.by_model` keeps per model)."""
    return ModelUsage(**{k: getattr(u, k) for k in ModelUsage.model_fields})


def branch_usage(branches: list[Branch], generated: int, wall_time_s: float, counts: CallCounts,
                 label: str) -> Usage:
    """Exact usage of one Context's own branches, all of it under the model `label`.

    The critical path is the chain of branches (`spawn(after=...)`) with the most generated tokens;
    `sequential_prompt_tokens` are the prompt tokens its calls read.
    """
    aborted = [b for b in branches if b.status is BranchStatus.aborted]
    finished = [b.num_tokens for b in branches if b.status is BranchStatus.finished]
    crit = max(branches, key=lambda b: (b.seq_end, b.seq_prompt_end), default=None)
    own = Usage(
        prompt_tokens=sum(b.prompt_tokens for b in branches),
        cached_prompt_tokens=sum(b.cached_prompt_tokens for b in branches),
        generated_tokens=generated,
        sequential_tokens=crit.seq_end if crit is not None else 0,
        sequential_prompt_tokens=crit.seq_prompt_end if crit is not None else 0,
        saved_tokens=estimated_saved_tokens([b.num_tokens for b in aborted], finished),
        unspent_token_cap=unspent_token_cap(
            [(b.num_tokens, b.request.sampling.max_tokens) for b in aborted if b.request is not None]),
        wall_time_s=wall_time_s,
        calls=counts.calls,
        score_calls=counts.score_calls,
        scored_tokens=counts.scored_tokens,
        branches=len(branches),
        aborted=len(aborted),
    )
    return own.model_copy(update={"by_model": {label: model_counts(own)}})


def fold_children(total: Usage, children: list[Usage]) -> Usage:
    """`total` with child Contexts' usage added by `Usage.__add__`, except two things a child shares with
    its parent: its wall time runs on the parent's clock and its branches continue the parent's critical
    path (their `seq_base` already counts the parent's tokens), so both are the larger, not the sum."""
    for u in children:
        path = max((total.sequential_tokens, total.sequential_prompt_tokens),
                   (u.sequential_tokens, u.sequential_prompt_tokens))
        total = (total + u).model_copy(update={
            "wall_time_s": max(total.wall_time_s, u.wall_time_s),
            "sequential_tokens": path[0], "sequential_prompt_tokens": path[1]})
    return total


def tokens_left(budget: Budget, max_tokens: int, tree_generated: int, seq_base: int, seq_prompt_base: int) -> int:
    """`max_tokens` clamped to what `budget` leaves a new branch whose critical path so far holds `seq_base`
    generated and `seq_prompt_base` prompt tokens (at least 1: the budget check stops it after one step)."""
    left = max_tokens
    if budget.total_tokens is not None:
        left = min(left, max(1, budget.total_tokens - tree_generated))
    if budget.sequential_tokens is not None:
        left = min(left, max(1, budget.sequential_tokens - seq_base))
    if budget.sequential_io_tokens is not None:  # the new call's own prompt is known only later
        left = min(left, max(1, budget.sequential_io_tokens - seq_base - seq_prompt_base))
    return left


def spent_budget(budget: Budget, tree_generated: Callable[[], int], branch: Branch) -> str | None:
    """Which of `budget`'s token limits is spent now that `branch` has grown, if any (`tree_generated` is
    called only when a total-token limit is set: it walks the Context tree)."""
    if budget.total_tokens is not None and tree_generated() >= budget.total_tokens:
        return "total_tokens"
    if budget.sequential_tokens is not None and branch.seq_end >= budget.sequential_tokens:
        return "sequential_tokens"
    if (budget.sequential_io_tokens is not None
            and branch.seq_end + branch.seq_prompt_end >= budget.sequential_io_tokens):
        return "sequential_io_tokens"
    return None

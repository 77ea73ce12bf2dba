"""The eval runner: strategies over a dataset on one backend, resumable, with live progress.

For each strategy the runner finds (or creates) its run in the store, skips the problems already stored,
and solves the rest through `ttscale.pipeline.Pipeline` with bounded concurrency. Problem i of the
dataset always gets seed `seed + i`, whether or not earlier problems were skipped, so a resumed run gives
what an uninterrupted one would. Each finished problem is committed to SQLite at once (and, when
recording, its traces to the bank first), so killing the process never loses a finished problem and
never makes one run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ttscale.backends.base import Backend, WrappingBackend
from ttscale.budget import Budget, Limits
from ttscale.evals.bank import CURRENT_PROBLEM, RecordingBackend
from ttscale.evals.datasets import Dataset
from ttscale.evals.store import ResultStore, RunInfo
from ttscale.pipeline import Pipeline
from ttscale.strategies.base import Strategy
from ttscale.strategies.registry import make_strategy
from ttscale.types import Delta, Event, GenerationRequest, Problem, Result


def make_progress(console: Any = None) -> Progress:
    """The live bar: done/total, accuracy so far, generated tokens per second, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("acc {task.fields[acc]}"), TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(),
        console=console, transient=False, refresh_per_second=4,
    )


def run_config(strategy: Strategy, dataset: Dataset, backend_spec: str, budget: Budget, limits: Limits,
               seed: int) -> dict[str, Any]:
    """Everything that decides a run's results; its hash keys the stored rows."""
    return {
        "strategy": strategy.name, "config": strategy.config.model_dump(mode="json"), "backend": backend_spec,
        "budget": budget.model_dump(), "limits": limits.model_dump(), "seed": seed, "dataset": dataset.key,
        "dataset_options": dataset.options,
    }


@dataclass
class RunOutcome:
    run: RunInfo
    skipped: int
    solved: int
    interrupted: bool = False


_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("ttscale_eval_scope", default=None)


class ScopedIds(WrappingBackend):
    """Makes request ids unique across the problems solved at once on one backend.

    Every Context names its branches b0, b1, ...; problems running concurrently would send the same
    request ids to the backend (engines reject duplicates). The branch ids stay as they are (they appear
    in decisions); only the id the backend sees is prefixed with the problem's scope.
    """

    def _rid(self, rid: str) -> str:
        scope = _SCOPE.get()
        return f"{scope}/{rid}" if scope else rid

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        stream = self.inner.generate(request.model_copy(update={"request_id": self._rid(request.request_id)}))
        async with contextlib.aclosing(stream):
            async for d in stream:
                yield d.model_copy(update={"request_id": request.request_id})

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(self._rid(request_id))


class _Meter:
    """Counts generated tokens from Context events (cheap: called for every delta)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.t0 = time.monotonic()

    def __call__(self, ev: Event) -> None:
        if ev.kind == "delta":
            self.tokens += ev.n_tokens

    @property
    def rate(self) -> float:
        return self.tokens / max(1e-9, time.monotonic() - self.t0)


async def evaluate(
    dataset: Dataset,
    strategies: Sequence[Strategy | str],
    backend: Backend,
    store: ResultStore,
    *,
    backend_spec: str,
    concurrency: int = 4,
    seed: int = 0,
    budget: Budget | None = None,
    limits: Limits | None = None,
    progress: Progress | None = None,
    recorder: RecordingBackend | None = None,
) -> list[RunOutcome]:
    """Run each strategy over the dataset, storing one row per finished problem. See the module docstring."""
    budget = budget or Budget()
    limits = limits or Limits()
    outcomes: list[RunOutcome] = []
    if recorder is not None:
        recorder.register(dataset.problems)
    for spec in strategies:
        strat = make_strategy(spec)
        cfg = run_config(strat, dataset, backend_spec, budget, limits, seed)
        run = store.ensure_run(dataset=dataset.key, strategy=strat.name, spec=strat.spec, config=cfg,
                               backend=backend_spec, total=len(dataset))
        outcome = RunOutcome(run=run, skipped=0, solved=0)
        outcomes.append(outcome)
        try:
            await _run_one(dataset, strat, run, backend, store, outcome, seed=seed, budget=budget, limits=limits,
                           concurrency=concurrency, progress=progress, recorder=recorder)
        except BaseException:
            outcome.interrupted = True
            store.set_status(run.run_id, "interrupted")
            raise
        store.set_status(run.run_id, "done")
    return outcomes


async def _run_one(dataset: Dataset, strat: Strategy, run: RunInfo, backend: Backend, store: ResultStore,
                   outcome: RunOutcome, *, seed: int, budget: Budget, limits: Limits, concurrency: int,
                   progress: Progress | None, recorder: RecordingBackend | None) -> None:
    done = store.done_ids(run)
    pending = [(i, p) for i, p in enumerate(dataset.problems) if p.id not in done]
    outcome.skipped = len(dataset) - len(pending)
    graded = [r.correct for r in store.rows(run.run_id) if r.correct is not None]
    right, n_graded = sum(graded), len(graded)
    reset = getattr(backend, "reset", None)
    if callable(reset):
        reset()
    meter = _Meter()
    task_id = None
    if progress is not None:
        task_id = progress.add_task(f"{strat.spec} · {dataset.name}", total=len(dataset), completed=outcome.skipped,
                                    acc=_acc(right, n_graded), tps="0")
    if not pending:
        return
    pipe = Pipeline(ScopedIds(backend), strat, budget=budget, limits=limits, concurrency=concurrency, seed=seed,
                    listeners=[meter])

    async def one(i: int, p: Problem) -> tuple[int, Problem, Result, int]:
        CURRENT_PROBLEM.set(p.id)
        _SCOPE.set(f"{p.id}#{uuid.uuid4().hex[:8]}")
        if recorder is not None:
            recorder.begin(p.id)
        s = seed + i
        result = await pipe.solve(p, seed=s)
        result.correct = dataset.grade(p, result.answer)
        return i, p, result, s

    tasks = [asyncio.create_task(one(i, p), name=f"ttscale-eval-{p.id}") for i, p in pending]
    try:
        for fut in asyncio.as_completed(tasks):
            i, p, result, s = await fut
            if recorder is not None:
                recorder.commit(p)
            store.add(run, i, s, result, p.answer)
            outcome.solved += 1
            if result.correct is not None:
                n_graded += 1
                right += int(result.correct)
            if progress is not None and task_id is not None:
                progress.update(task_id, advance=1, acc=_acc(right, n_graded), tps=f"{meter.rate:.0f}")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _acc(right: int, n: int) -> str:
    return f"{right / n:.3f} ({right}/{n})" if n else "-"

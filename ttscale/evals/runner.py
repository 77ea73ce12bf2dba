"""The eval runner: strategies over a dataset on one backend, resumable, with live progress.

For each strategy the runner finds (or creates) its run in the store, skips the problems already answered,
and solves the rest through `ttscale.pipeline.Pipeline` with bounded concurrency. Problem i of the
dataset always gets seed `seed + i`, whether or not earlier problems were skipped, so a resumed run gives
what an uninterrupted one would. Each finished problem is committed to SQLite at once (and, when
recording, its traces to the bank first), so killing the process never loses a finished problem and
never makes one run twice.

A problem that could not be solved (every branch failed, the backend raised) is stored as an error with
its reason, not as a wrong answer: it is left out of accuracy, counted apart, and retried by the next run.
Workers take problems through claims in the store (see `ttscale.evals.store`), so several runners on one
database split a run between them without computing any problem twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sqlite3
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
from ttscale.errors import ConfigError
from ttscale.evals.bank import CURRENT_PROBLEM, RecordingBackend
from ttscale.evals.datasets import Dataset
from ttscale.evals.store import ResultStore, RunInfo, new_owner_id
from ttscale.pipeline import Pipeline, failed_result
from ttscale.strategies.base import Strategy
from ttscale.strategies.registry import make_strategy
from ttscale.types import Delta, Event, GenerationRequest, Problem, Result


def make_progress(console: Any = None) -> Progress:
    """The live bar: done/total, accuracy over answered problems, errors, generated tokens per second, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("acc {task.fields[acc]}"), TextColumn("errors {task.fields[errors]}"),
        TextColumn("{task.fields[tps]} tok/s"), TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(),
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
    """What one runner did on one run: problems found stored, answered now, failed now; why it stopped."""

    run: RunInfo
    skipped: int
    solved: int
    errors: int = 0
    interrupted: bool = False
    stopped_on_failures: bool = False


DEFAULT_LEASE_S = 60.0
_CLAIM_POLL_S = 0.25  # how often a runner with nothing to claim looks again while other runners hold problems


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
    max_failures: int | None = None,
    lease_s: float = DEFAULT_LEASE_S,
) -> list[RunOutcome]:
    """Run each strategy over the dataset, storing one row per finished problem. See the module docstring.

    `max_failures`: stop (this strategy and the ones after it) once that many problems failed in this
    call; the run is then marked `error` and a rerun retries them. `lease_s`: how long a claim of this
    runner outlives it when it is killed (claims are renewed while it runs).
    """
    if max_failures is not None and max_failures < 1:
        raise ConfigError(f"max_failures must be >= 1 (got {max_failures})")
    if lease_s <= 0:
        raise ConfigError(f"lease_s must be > 0 (got {lease_s})")
    budget = budget or Budget()
    limits = limits or Limits()
    outcomes: list[RunOutcome] = []
    if recorder is not None:
        recorder.register(dataset.problems)
    failures_left = max_failures
    for spec in strategies:
        strat = make_strategy(spec)
        cfg = run_config(strat, dataset, backend_spec, budget, limits, seed)
        run = store.ensure_run(dataset=dataset.key, strategy=strat.name, spec=strat.spec, config=cfg,
                               backend=backend_spec, total=len(dataset))
        outcome = RunOutcome(run=run, skipped=0, solved=0)
        outcomes.append(outcome)
        try:
            await _run_one(dataset, strat, run, backend, store, outcome, seed=seed, budget=budget, limits=limits,
                           concurrency=concurrency, progress=progress, recorder=recorder,
                           max_failures=failures_left, lease_s=lease_s)
        except BaseException:
            outcome.interrupted = True
            with contextlib.suppress(sqlite3.Error):  # the database itself may be what failed
                store.set_status(run.run_id, "interrupted")
            raise
        store.set_status(run.run_id, "error" if store.count(run.run_id, "error") else "done")
        if failures_left is not None:
            failures_left -= outcome.errors
            if outcome.stopped_on_failures:
                break
    return outcomes


@dataclass
class _Tally:
    """Live counts for the progress bar: right answers, graded answers, errors."""

    right: int = 0
    graded: int = 0
    errors: int = 0

    def add(self, result: Result) -> None:
        if result.error:
            self.errors += 1
        elif result.correct is not None:
            self.graded += 1
            self.right += int(result.correct)


async def _run_one(dataset: Dataset, strat: Strategy, run: RunInfo, backend: Backend, store: ResultStore,
                   outcome: RunOutcome, *, seed: int, budget: Budget, limits: Limits, concurrency: int,
                   progress: Progress | None, recorder: RecordingBackend | None, max_failures: int | None,
                   lease_s: float) -> None:
    since = time.time()
    owner = new_owner_id()
    done = store.done_ids(run)
    pending = {p.id: (i, p) for i, p in enumerate(dataset.problems) if p.id not in done}
    outcome.skipped = len(dataset) - len(pending)
    tally = _Tally()
    for row in store.rows(run.run_id, errors=False):
        tally.add(row.result)
    reset = getattr(backend, "reset", None)
    if callable(reset):
        reset()
    meter = _Meter()
    task_id = None
    if progress is not None:
        task_id = progress.add_task(f"{strat.spec} · {dataset.name}", total=len(dataset), completed=outcome.skipped,
                                    acc=_acc(tally.right, tally.graded), errors=0, tps="0")
    if not pending:
        return
    pipe = Pipeline(ScopedIds(backend), strat, budget=budget, limits=limits, concurrency=concurrency, seed=seed,
                    listeners=[meter])
    await pipe.prepare()  # a bad setup fails here, before any problem is claimed
    order = list(pending)
    stop = asyncio.Event()

    async def solve(i: int, p: Problem) -> Result:
        CURRENT_PROBLEM.set(p.id)
        _SCOPE.set(f"{p.id}#{uuid.uuid4().hex[:8]}")
        if recorder is not None:
            recorder.begin(p.id)
        try:
            result = await pipe.solve(p, seed=seed + i)
        except Exception as exc:  # noqa: BLE001 - stored as this problem's error; the run goes on
            return failed_result(p, strat, exc)
        if not result.error:
            result.correct = dataset.grade(p, result.answer)
            for trace in result.traces:  # each trace graded too: maj@k and pass@k are read off these
                trace.meta["correct"] = dataset.grade(p, trace.answer)
        return result

    async def worker() -> None:
        while not stop.is_set():
            claim = store.claim(run, order, owner, lease_s=lease_s, since=since)
            if claim.problem_id is None:
                if not claim.held_by_others:
                    return
                await asyncio.sleep(_CLAIM_POLL_S)  # others hold the rest: wait for them or their leases
                continue
            i, p = pending[claim.problem_id]
            result = await solve(i, p)
            if recorder is not None and not result.error:
                recorder.commit(p)
            store.add(run, i, seed + i, result, p.answer, owner=owner)
            if result.error:
                outcome.errors += 1
            else:
                outcome.solved += 1
            tally.add(result)
            if progress is not None and task_id is not None:
                progress.update(task_id, advance=1, acc=_acc(tally.right, tally.graded),
                                errors=tally.errors, tps=f"{meter.rate:.0f}")
            if max_failures is not None and outcome.errors >= max_failures:
                outcome.stopped_on_failures = True
                stop.set()

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(lease_s / 3)
            store.heartbeat(owner, lease_s)

    beat = asyncio.create_task(heartbeat(), name="ttscale-eval-heartbeat")
    workers = [asyncio.create_task(worker(), name=f"ttscale-eval-worker-{k}")
               for k in range(min(concurrency, len(pending)))]
    stopped = asyncio.create_task(stop.wait())
    try:
        running = set(workers)
        while running and not stop.is_set():
            finished, _ = await asyncio.wait([stopped, *running], return_when=asyncio.FIRST_COMPLETED)
            for w in finished - {stopped}:
                running.discard(w)
                w.result()  # a worker's error (the database failed) ends the run
    finally:
        for t in (beat, stopped, *workers):
            t.cancel()
        await asyncio.gather(beat, stopped, *workers, return_exceptions=True)
        with contextlib.suppress(sqlite3.Error):
            store.release(owner)


def _acc(right: int, n: int) -> str:
    return f"{right / n:.3f} ({right}/{n})" if n else "-"

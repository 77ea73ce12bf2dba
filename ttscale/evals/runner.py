"""The eval runner: strategies over a dataset on one backend, resumable, with live progress.

For each strategy the runner finds (or creates) its run in the store, skips the problems already answered,
and solves the rest through `ttscale.pipeline.Pipeline` with bounded concurrency. Problem i of the
dataset always gets seed `seed + i`, whether or not earlier problems were skipped, so a resumed run gives
what an uninterrupted one would. Each finished problem is committed to SQLite at once (and, when
recording, its traces to the bank first), so killing the process never loses a finished problem and
never makes one run twice.

A problem that could not be solved (every branch failed, the backend raised, it ran past
`problem_timeout_s`) is stored as an error with its reason, not as a wrong answer: it is left out of
accuracy, counted apart, and retried by the next run.

The progress bar's tok/s and ETA are recomputed every half second from the tokens streaming in, not only
when a problem finishes: the ETA is the tokens the unfinished problems still need (at the mean cost of a
finished problem) over the recent token rate.

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
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from ttscale.backends.base import Backend, DeltaStream, ForkedStream, WrappingBackend
from ttscale.budget import Budget, Limits
from ttscale.errors import ConfigError, TTScaleError
from ttscale.evals.bank import CURRENT_PROBLEM, RecordingBackend
from ttscale.evals.datasets import Dataset
from ttscale.evals.store import ResultStore, RunInfo, new_owner_id
from ttscale.evals.tracking import Tracker
from ttscale.pipeline import Pipeline, failed_result
from ttscale.prompts import DEFAULT_SYSTEM_PROMPT, dataset_system_prompt
from ttscale.strategies.base import Strategy, out_of_budget
from ttscale.strategies.registry import make_strategy
from ttscale.types import Event, GenerationRequest, Problem, Result, SamplingSpec


def make_progress(console: Any = None) -> Progress:
    """The live bar: done/total, accuracy over answered problems, errors, generated tokens per second, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("acc {task.fields[acc]}"), TextColumn("errors {task.fields[errors]}"),
        TextColumn("{task.fields[tps]} tok/s"), TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn(),
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


def with_dataset_prompt(strategy: Strategy, dataset: Dataset) -> Strategy:
    """The strategy as it runs on `dataset`: left at "default", its system prompt is the dataset's declared one."""
    if strategy.config.system_prompt != DEFAULT_SYSTEM_PROMPT:
        return strategy
    declared = dataset_system_prompt(dataset.name, getattr(dataset, "system_prompt", DEFAULT_SYSTEM_PROMPT))
    return strategy if declared == DEFAULT_SYSTEM_PROMPT else strategy.with_system_prompt(declared)


def sweep_meta(strategy: Strategy, width: int) -> dict[str, Any]:
    """Run metadata marking `strategy` as the point `width` of a width sweep (docs/outputs.md, "Width sweeps").

    Every run of the same strategy and config except the width gets the same `sweep.key` (its spec with the
    width field as `*`), so runs from several commands join one curve; `sweep.value` is this run's width
    (for PDR the first round's drafts, its schedule scaled: `StrategyConfig.width_values`).
    """
    from ttscale.specs import Spec, format_spec

    width_name = type(strategy.config).width_field
    values = type(strategy.config).width_values(width)
    if width_name is None or values is None:
        raise ConfigError(f"strategy {strategy.name!r} has no width to sweep")
    rest = {k: v for k, v in strategy.config.model_dump(exclude_defaults=True).items() if k not in values}
    options = {width_name: "*", **dict(sorted(rest.items()))}
    key = format_spec(Spec(name=strategy.name, options=options), also_quote="/")
    return {"sweep": {"key": key, "field": width_name, "value": width}}


@dataclass
class RunOutcome:
    """What one runner did on one run: problems found stored, answered now, failed now; why it stopped.

    `refused`: of the failed, those a replayed trace bank could not serve as recorded (a rerun fails them
    again: the bank, not luck, decides). `out_of_budget`: of the solved, those with no answer because the
    budget ran out first (stored as wrong answers, not errors: a rerun spends the same budget)."""

    run: RunInfo
    skipped: int
    solved: int
    errors: int = 0
    refused: int = 0
    out_of_budget: int = 0
    interrupted: bool = False
    stopped_on_failures: bool = False


DEFAULT_LEASE_S = 60.0
_PROGRESS_TICK_S = 0.5  # how often the progress bar's tok/s and ETA are recomputed
_CLAIM_POLL_S = 0.25  # how often a runner with nothing to claim looks again while other runners hold problems


_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("ttscale_eval_scope", default=None)


class ScopedIds(WrappingBackend):
    """Makes request ids unique across the problems solved at once on one backend.

    Every Context names its branches b0, b1, ...; problems running concurrently would send the same
    request ids to the backend (engines reject duplicates). The branch ids stay as they are (they appear
    in decisions); only the id the backend sees is prefixed with the problem's scope. The streams are the
    inner backend's own, so their deltas carry that scoped id: nothing reads a delta's id (the Context
    knows which branch a stream feeds), and renaming every delta on its way cost ~8 % of an eval's
    event-loop time (a generator layer and a pydantic copy per delta; py-spy, host-only run).
    """

    def _rid(self, rid: str) -> str:
        scope = _SCOPE.get()
        return f"{scope}/{rid}" if scope else rid

    def generate(self, request: GenerationRequest) -> DeltaStream:
        return self.inner.generate(request.model_copy(update={"request_id": self._rid(request.request_id)}))

    def fork(self, request_id: str, n: int, sampling: SamplingSpec | None = None) -> list[ForkedStream]:
        """Fork the parent by the id the backend knows; the children's ids come back without the scope."""
        scope = _SCOPE.get()
        return [(cid.removeprefix(f"{scope}/") if scope else cid, stream)
                for cid, stream in self.inner.fork(self._rid(request_id), n, sampling)]

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(self._rid(request_id))


class ProblemTimeout(TTScaleError):
    """A problem ran past `problem_timeout_s`; it is stored as an error and its branches are cancelled."""


class TokenMeter:
    """Generated tokens from Context events (cheap: called for every delta), and their recent rate."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.tokens = 0
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])

    def __call__(self, ev: Event) -> None:
        if ev.kind == "delta":
            self.tokens += ev.n_tokens

    def rate(self, now: float | None = None) -> float:
        """Tokens per second over about the last `window_s` seconds (since the start before that)."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, self.tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        return (self.tokens - n0) / max(1e-9, now - t0)


def eta_seconds(*, not_started: int, running_tokens: Sequence[int], tokens_per_problem: float | None,
                token_rate: float) -> float | None:
    """Seconds until the unfinished problems are done, from tokens: what they still need at
    `tokens_per_problem` each (a running problem has already generated `running_tokens[i]`, and needs at
    least nothing more) over `token_rate`. None when there is no estimate (no cost known, no tokens flowing)."""
    if not_started <= 0 and not running_tokens:
        return 0.0
    if tokens_per_problem is None or tokens_per_problem <= 0 or token_rate <= 0:
        return None
    left = not_started * tokens_per_problem + sum(max(0.0, tokens_per_problem - t) for t in running_tokens)
    return left / token_rate


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


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
    problem_timeout_s: float | None = None,
    tracker: Tracker | None = None,
    run_meta: Sequence[dict[str, Any] | None] | None = None,
) -> list[RunOutcome]:
    """Run each strategy over the dataset, storing one row per finished problem. See the module docstring.

    `max_failures`: stop (this strategy and the ones after it) once that many problems failed in this
    call; the run is then marked `error` and a rerun retries them. `lease_s`: how long a claim of this
    runner outlives it when it is killed (claims are renewed while it runs). `problem_timeout_s`: a
    problem still running after that long is cancelled and stored as an error (counted as a failure).
    `tracker`: also log each problem's metrics there. `run_meta`: per strategy, metadata stored with its
    run outside the config hash (the width sweep it belongs to: `sweep_meta`). A replayed trace bank
    recorded on another dataset is refused before anything runs (`ReplayBackend.check_dataset`).
    A strategy whose `system_prompt` is "default" uses the dataset's declared one (`Dataset.system_prompt`,
    `ttscale.prompts.DATASET_SYSTEM_PROMPTS`) when there is one; the prompt used is part of the run config.
    """
    if max_failures is not None and max_failures < 1:
        raise ConfigError(f"max_failures must be >= 1 (got {max_failures})")
    if lease_s <= 0:
        raise ConfigError(f"lease_s must be > 0 (got {lease_s})")
    if problem_timeout_s is not None and problem_timeout_s <= 0:
        raise ConfigError(f"problem_timeout_s must be > 0 seconds (got {problem_timeout_s})")
    if run_meta is not None and len(run_meta) != len(strategies):
        raise ConfigError(f"run_meta has {len(run_meta)} entries for {len(strategies)} strategies")
    check_dataset = getattr(backend, "check_dataset", None)  # a replay: its bank's dataset is this one
    if callable(check_dataset):
        check_dataset(dataset.key)
    budget = budget or Budget()
    limits = limits or Limits()
    outcomes: list[RunOutcome] = []
    if recorder is not None:
        recorder.register(dataset.problems)
    failures_left = max_failures
    for k, spec in enumerate(strategies):
        strat = with_dataset_prompt(make_strategy(spec), dataset)
        cfg = run_config(strat, dataset, backend_spec, budget, limits, seed)
        run = store.ensure_run(dataset=dataset.key, strategy=strat.name, spec=strat.spec, config=cfg,
                               backend=backend_spec, total=len(dataset))
        meta = dict(run_meta[k] or {}) if run_meta is not None else {}
        if Path(dataset.source).is_file():  # a file's key is its name and hash: where it was, for reloads
            meta["dataset_file"] = str(Path(dataset.source).resolve())
        if meta:
            store.update_meta(run.run_id, **meta)
            run = store.run(run.run_id)
        outcome = RunOutcome(run=run, skipped=0, solved=0)
        outcomes.append(outcome)
        if tracker is not None:
            tracker.start_run(run)
        try:
            await _run_one(dataset, strat, run, backend, store, outcome, seed=seed, budget=budget, limits=limits,
                           concurrency=concurrency, progress=progress, recorder=recorder,
                           max_failures=failures_left, lease_s=lease_s, problem_timeout_s=problem_timeout_s,
                           tracker=tracker)
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
    """Live counts for the progress bar: right answers, graded answers, errors, tokens of answered problems."""

    right: int = 0
    graded: int = 0
    errors: int = 0
    answered: int = 0
    tokens: int = 0

    def add(self, result: Result) -> None:
        if result.error:
            self.errors += 1
            return
        self.answered += 1
        self.tokens += result.usage.generated_tokens
        if result.correct is not None:
            self.graded += 1
            self.right += int(result.correct)

    @property
    def tokens_per_problem(self) -> float | None:
        return self.tokens / self.answered if self.answered and self.tokens else None


@dataclass
class _Live:
    """What is running now, for the ETA: generated tokens per running problem, and problems not yet started."""

    not_started: int
    running: dict[str, TokenMeter] = field(default_factory=dict)

    def running_tokens(self) -> list[int]:
        return [m.tokens for m in self.running.values()]


async def _solve_within(pipe: Pipeline, p: Problem, seed: int, timeout_s: float | None,
                        meter: TokenMeter) -> Result:
    """`pipe.solve`, cancelled (with its branches) after `timeout_s`; then a failed Result naming the timeout."""
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            return await pipe.solve(p, seed=seed, listeners=[meter])
    except TimeoutError:
        if not deadline.expired():
            raise
        why = ProblemTimeout(f"no result within {timeout_s:g}s (--problem-timeout); its branches were cancelled")
        return failed_result(p, pipe.strategy, why)


async def _run_one(dataset: Dataset, strat: Strategy, run: RunInfo, backend: Backend, store: ResultStore,
                   outcome: RunOutcome, *, seed: int, budget: Budget, limits: Limits, concurrency: int,
                   progress: Progress | None, recorder: RecordingBackend | None, max_failures: int | None,
                   lease_s: float, problem_timeout_s: float | None = None, tracker: Tracker | None = None) -> None:
    since = time.time()
    owner = new_owner_id()
    done = store.done_ids(run)
    pending = {p.id: (i, p) for i, p in enumerate(dataset.problems) if p.id not in done}
    outcome.skipped = len(dataset) - len(pending)
    tally = _Tally()
    for row in store.rows(run.run_id, errors=False, problems={p.id for p in dataset.problems}):
        tally.add(row.result)
    reset = getattr(backend, "reset", None)
    if callable(reset):
        reset()
    meter = TokenMeter()
    started = time.monotonic()
    live = _Live(not_started=len(pending))
    prior = strat.max_tokens_bound(strat.config)  # cost guess until a problem is answered: its upper bound
    task_id = None
    if progress is not None:
        task_id = progress.add_task(f"{strat.spec} · {dataset.name}", total=len(dataset), completed=outcome.skipped,
                                    acc=_acc(tally.right, tally.graded), errors=0, tps="0",
                                    eta=format_eta(0.0 if not pending else None))
    if not pending:
        return
    pipe = Pipeline(ScopedIds(backend), strat, budget=budget, limits=limits, concurrency=concurrency, seed=seed,
                    listeners=[meter])
    await pipe.prepare()  # a bad setup fails here, before any problem is claimed
    open_ids = dict.fromkeys(pending)  # in dataset order, less what this runner knows is settled or its own
    stop = asyncio.Event()

    def refresh() -> None:
        if progress is None or task_id is None:
            return
        rate = meter.rate()
        eta = eta_seconds(not_started=live.not_started, running_tokens=live.running_tokens(),
                          tokens_per_problem=tally.tokens_per_problem or prior, token_rate=rate)
        done_now = outcome.solved + outcome.errors
        if eta is None and done_now:  # no token stream to go by (engine-native runs): problems per second
            eta = (time.monotonic() - started) / done_now * (live.not_started + len(live.running))
        progress.update(task_id, acc=_acc(tally.right, tally.graded), errors=tally.errors, tps=f"{rate:.0f}",
                        eta=format_eta(eta))

    refusal = getattr(backend, "refusal", None)  # a replay: why it could not serve a request as recorded

    async def solve(i: int, p: Problem) -> tuple[Result, bool]:
        """The problem's Result, and whether a replayed bank refused it."""
        CURRENT_PROBLEM.set(p.id)
        _SCOPE.set(f"{p.id}#{uuid.uuid4().hex[:8]}")
        if recorder is not None:
            recorder.begin(p.id)
        live.not_started -= 1
        live.running[p.id] = problem_meter = TokenMeter()
        try:
            result = await _solve_within(pipe, p, seed + i, problem_timeout_s, problem_meter)
        except Exception as exc:  # noqa: BLE001 - stored as this problem's error; the run goes on
            result = failed_result(p, strat, exc)
        finally:
            live.running.pop(p.id, None)
        if callable(refusal) and (refused := refusal(p.id)) is not None:
            return failed_result(p, strat, refused), True
        if result.error:
            return result, False
        recorded = getattr(backend, "recorded_wall_time", None)  # a replay: its time on the recorded timeline
        if callable(recorded):
            result.usage.recorded_wall_time_s = recorded(p.id)
        result.correct = dataset.grade(p, result.answer)
        for trace in result.traces:  # each trace graded too: maj@k and pass@k are read off these
            trace.meta["correct"] = dataset.grade(p, trace.answer)
        return result, False

    async def worker() -> None:
        while not stop.is_set():
            claim = store.claim(run, open_ids, owner, lease_s=lease_s, since=since)
            for pid in claim.settled:
                open_ids.pop(pid, None)
            if claim.problem_id is None:
                if not claim.held_by_others:
                    return
                await asyncio.sleep(_CLAIM_POLL_S)  # others hold the rest: wait for them or their leases
                continue
            open_ids.pop(claim.problem_id, None)  # ours now: it ends settled (an ok or error row)
            i, p = pending[claim.problem_id]
            result, refused = await solve(i, p)
            if recorder is not None and not result.error:
                recorder.commit(p)
            store.add(run, i, seed + i, result, p.answer, owner=owner)
            if result.error:
                outcome.errors += 1
                outcome.refused += int(refused)
            else:
                outcome.solved += 1
                outcome.out_of_budget += int(out_of_budget(result))
            tally.add(result)
            if progress is not None and task_id is not None:
                progress.update(task_id, advance=1)
            refresh()
            if tracker is not None:
                tracker.log_problem(run, outcome.skipped + outcome.solved + outcome.errors, {
                    "accuracy": tally.right / tally.graded if tally.graded else float("nan"),
                    "errors": float(tally.errors), "correct": float(bool(result.correct)),
                    "generated_tokens": float(result.usage.generated_tokens),
                    "sequential_tokens": float(result.usage.sequential_tokens),
                    "wall_time_s": float(result.usage.wall_time_s)})
            if max_failures is not None and outcome.errors >= max_failures:
                outcome.stopped_on_failures = True
                stop.set()

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(lease_s / 3)
            store.heartbeat(owner, lease_s)

    async def ticker() -> None:  # tok/s and ETA move while problems run, not only when one finishes
        while True:
            await asyncio.sleep(_PROGRESS_TICK_S)
            refresh()

    beat = asyncio.create_task(heartbeat(), name="ttscale-eval-heartbeat")
    tick = asyncio.create_task(ticker(), name="ttscale-eval-progress")
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
        for t in (beat, tick, stopped, *workers):
            t.cancel()
        await asyncio.gather(beat, tick, stopped, *workers, return_exceptions=True)
        with contextlib.suppress(sqlite3.Error):
            store.release(owner)


def _acc(right: int, n: int) -> str:
    return f"{right / n:.3f} ({right}/{n})" if n else "-"

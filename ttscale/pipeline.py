"""The Python pipeline API: `solve` / `asolve` for one problem, `Pipeline` for many.

    from ttscale import solve
    result = solve("What is 17 * 23?", strategy="self-consistency:n=8", backend="vllm:/models/qwen")
    print(result.answer, result.usage.generated_tokens)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Self

from ttscale.answers import is_correct
from ttscale.backends import make_backend
from ttscale.backends.base import Backend
from ttscale.backends.default import BackendChoice, resolve_backend_spec
from ttscale.budget import Budget, Limits
from ttscale.controller import Context, Listener
from ttscale.errors import BackendError, BackendUnavailable, ConfigError
from ttscale.prompts import DEFAULT_SYSTEM_PROMPT
from ttscale.shared_backends import SHARED
from ttscale.strategies.base import Strategy
from ttscale.strategies.registry import make_strategy
from ttscale.types import BranchStatus, Problem, Result

ProblemLike = Problem | str | dict[str, Any]


def branch_failure(ctx: Context) -> str | None:
    """Why a problem failed when no branch of its Context tree finished and at least one failed; else None.

    Branches aborted by the strategy or a budget alongside the failed ones do not make it a success.
    """
    branches = ctx._tree_branches()
    failed = [b for b in branches if b.status == BranchStatus.failed]
    if not failed or any(b.status == BranchStatus.finished for b in branches):
        return None
    reasons = sorted({b.error or "unknown error" for b in failed})
    return f"all {len(failed)} branch(es) failed: " + "; ".join(reasons[:3])


def failed_result(problem: Problem, strategy: Strategy, exc: BaseException) -> Result:
    """The Result of a problem whose solve raised: no answer, the exception as the reason."""
    return Result(problem_id=problem.id, answer=None, strategy=strategy.name,
                  config=strategy.config.model_dump(mode="json"), error=f"{type(exc).__name__}: {exc}")


def as_problem(p: ProblemLike, index: int = 0) -> Problem:
    """A Problem from a Problem, a question string, or a dict in the dataset schema (a number as answer is
    its text, as in a dataset file). A multiple-choice problem comes with its options lettered in the prompt
    (`with_choices_shown`)."""
    if isinstance(p, str):
        return Problem(id=f"q{index}", prompt=p)
    if isinstance(p, dict):
        from ttscale.evals.problem_files import problem_from_record

        p = problem_from_record({"id": f"q{index}", **p}, f"problem {index}")
    if isinstance(p, Problem):
        return with_choices_shown(p)
    raise TypeError(f"cannot make a Problem from {type(p).__name__}")


def with_choices_shown(problem: Problem) -> Problem:
    """A choice problem as the model must see it: its options lettered (A, B, ...) after the question, in the
    order given (`metadata.shuffle: true` shuffles them), and its answer as a letter (given as a letter or as
    an option's text). Problems from a dataset have been already (`evals.datasets.shuffle_choices`)."""
    if problem.kind != "choice" or not problem.choices or "choice_order" in problem.metadata:
        return problem
    from ttscale.evals.datasets import shuffle_choices

    return shuffle_choices(problem.model_copy(update={"metadata": {"shuffle": False, **problem.metadata}}), seed=0)


class Pipeline:
    """A backend and a strategy, reused over many problems with bounded concurrency.

    Each problem runs in its own Context (its own budget, seed and usage); `seed` + problem index gives
    per-problem seeds so runs are reproducible on backends that honour seeds. `system_prompt`: "default"
    keeps the strategy's own setting, None sends no system prompt, other text is sent as it.
    """

    def __init__(
        self,
        backend: Backend | str,
        strategy: Strategy | str | dict[str, Any] = "self-consistency",
        *,
        budget: Budget | dict[str, Any] | None = None,
        limits: Limits | dict[str, Any] | None = None,
        concurrency: int = 4,
        seed: int | None = 0,
        listeners: Iterable[Listener] = (),
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    ):
        self._owns_backend = isinstance(backend, str)
        self.strategy = make_strategy(strategy)
        if system_prompt != DEFAULT_SYSTEM_PROMPT:  # None: no system prompt; text: that prompt
            self.strategy = self.strategy.with_system_prompt(system_prompt)
        # "auto": the default backend for this strategy on this machine (ttscale/backends/default.py)
        self.backend_choice: BackendChoice | None = None
        if isinstance(backend, str):
            backend, self.backend_choice = resolve_backend_spec(backend, [self.strategy])
        self.backend: Backend = make_backend(backend) if isinstance(backend, str) else backend
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self.budget = Budget(**budget) if isinstance(budget, dict) else (budget or Budget())
        self.limits = Limits(**limits) if isinstance(limits, dict) else (limits or Limits())
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.concurrency = concurrency
        self.seed = seed
        self.listeners = list(listeners)
        self._sem = asyncio.Semaphore(concurrency)

    async def prepare(self) -> None:
        """Start / connect the backend (capabilities are known after that), then check the strategy's needs.

        Runs once, before the first request is sent, so a missing capability fails before anything runs.
        """
        async with self._ready_lock:
            if self._ready:
                return
            await self.backend.start()
            self.strategy.check(self.backend)
            self._ready = True

    def context(self, seed: int | None = None, listeners: Iterable[Listener] = ()) -> Context:
        return Context(self.backend, budget=self.budget, limits=self.limits, seed=seed,
                       listeners=[*self.listeners, *listeners])

    async def solve(self, problem: ProblemLike, *, seed: int | None = None,
                    listeners: Iterable[Listener] = ()) -> Result:
        """Run the strategy on one problem and grade it when the problem has a reference answer.

        A problem that could not be solved (every branch failed, or the backend raised mid-run) comes back
        as a Result with `error` set and `correct` None rather than as an exception: over many problems
        (`run`, `stream`, evals) one failed problem must not throw away the others, and a failure must not
        look like a wrong answer. Errors in the setup (`prepare`: bad config, missing capability, backend
        unreachable at start) still raise, since no problem can run.
        """
        prob = as_problem(problem)
        await self.prepare()
        async with self._sem:
            ctx = self.context(seed if seed is not None else self.seed, listeners)
            try:
                result = await self.strategy.run(prob, ctx)
            except (BackendError, BackendUnavailable, OSError) as exc:
                result = failed_result(prob, self.strategy, exc)
            finally:
                await ctx.aclose()
            result.usage = result.usage.model_copy(update={"wall_time_s": ctx.usage.wall_time_s}) \
                if result.usage.wall_time_s == 0 else result.usage
            if result.error is None and result.answer is None:
                result.error = branch_failure(ctx)
        result.correct = None if result.error else is_correct(result.answer, prob.answer, prob.kind)
        return result

    async def stream(self, problems: Sequence[ProblemLike]) -> AsyncIterator[tuple[int, Result]]:
        """Yield (index, result) as problems finish."""
        probs = [as_problem(p, i) for i, p in enumerate(problems)]

        async def one(i: int, p: Problem) -> tuple[int, Result]:
            seed = None if self.seed is None else self.seed + i
            return i, await self.solve(p, seed=seed)

        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(probs)]
        try:
            for fut in asyncio.as_completed(tasks):
                yield await fut
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self, problems: Sequence[ProblemLike]) -> list[Result]:
        """Solve all problems concurrently; results in input order, a failed problem's with `error` set."""
        out: list[Result | None] = [None] * len(problems)
        async for i, r in self.stream(problems):
            out[i] = r
        return [r for r in out if r is not None]

    async def aclose(self) -> None:
        if self._owns_backend:
            await self.backend.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def asolve(problem: ProblemLike, strategy: Strategy | str | dict[str, Any] = "self-consistency",
                 backend: Backend | str = "auto", **kwargs: Any) -> Result:
    """Solve one problem (async). Keyword arguments go to `Pipeline`.

    A backend spec (`"auto"`, `"vllm:/models/m"`, ...) is built once and kept for later calls with the same
    spec, on the event loop of `ttscale.shared_backends` (where this call's Pipeline runs too);
    `close_shared_backends()` frees them. A Backend object is used as it is, here, and left open."""
    if isinstance(backend, str):
        strat = make_strategy(strategy)
        spec, _ = resolve_backend_spec(backend, [strat])
        return await SHARED.arun(_solve_on_shared(problem, strat, spec, kwargs))
    pipe = Pipeline(backend, strategy, **kwargs)
    try:
        return await pipe.solve(problem)
    finally:
        await pipe.aclose()


async def _solve_on_shared(problem: ProblemLike, strategy: Strategy, spec: str, kwargs: dict[str, Any]) -> Result:
    """`asolve` on the shared loop with the kept backend of `spec` (the Pipeline does not own it)."""
    return await Pipeline(await SHARED.get(spec), strategy, **kwargs).solve(problem)


def solve(problem: ProblemLike, strategy: Strategy | str | dict[str, Any] = "self-consistency",
          backend: Backend | str = "auto", **kwargs: Any) -> Result:
    """Solve one problem (blocking). See `asolve` (a backend spec is built once and kept for later calls);
    inside a running event loop (a notebook, an async app) use `await asolve(...)` instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        if isinstance(backend, str):
            strat = make_strategy(strategy)
            spec, _ = resolve_backend_spec(backend, [strat])
            return SHARED.run(_solve_on_shared(problem, strat, spec, kwargs))
        return asyncio.run(asolve(problem, strategy, backend, **kwargs))
    raise ConfigError("solve() blocks, so it cannot run inside a running event loop (a notebook cell, an "
                      "async function): use `await ttscale.asolve(...)` there, or build a Pipeline once")

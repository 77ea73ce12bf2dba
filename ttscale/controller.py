"""The Context: what a strategy uses to run branches on a backend.

A strategy never talks to a backend directly. It asks the Context to `spawn` branches, waits for them
(`first_finished`, `wait_all`, `watch`), cancels the ones no longer worth finishing (`cancel`,
`cancel_rest`), and reads `usage`. The Context turns backend deltas into Branch updates and Events,
enforces budgets by aborting, applies concurrency and request-rate limits, and keeps exact Usage.

Request building and delta folding live in `branch_updates`, usage and budget sums in `context_usage`,
waiting on branches in `context_branch_waits`.

Cancellation contract: cancelling a branch cancels the task that consumes the backend's stream and
closes the stream, which makes the backend abort the request on its server (see backends/base.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Self

from asyncio_throttle import Throttler

from ttscale.backends.base import Backend, DeltaStream
from ttscale.branch_updates import After, Source, apply_delta, continuation_request, request_for, seed_for
from ttscale.budget import Budget, Limits
from ttscale.context_branch_waits import BranchWaits
from ttscale.context_usage import (
    CallCounts,
    branch_usage,
    ends_by_itself,
    fold_children,
    model_counts,
    model_label,
    spent_budget,
    tokens_left,
)
from ttscale.errors import CapabilityError, TTScaleError
from ttscale.types import (
    Branch,
    BranchStatus,
    Delta,
    Event,
    EventKind,
    SamplingSpec,
    ScoreRequest,
    ScoreResult,
    Usage,
)

if TYPE_CHECKING:
    from ttscale.backends.engine.native_common import NativeJob
    from ttscale.native_runs import NativeRun

Listener = Callable[[Event], None]
_EVENT_OF_STATUS: dict[BranchStatus, EventKind] = {
    BranchStatus.finished: "finished", BranchStatus.aborted: "aborted", BranchStatus.failed: "failed"}


class Context(BranchWaits):
    """One run of one strategy on one problem (or one sub-stage of it; see `child`)."""

    def __init__(
        self,
        backend: Backend,
        *,
        budget: Budget | None = None,
        limits: Limits | None = None,
        seed: int | None = None,
        system_prompt: str | None = None,
        listeners: Iterable[Listener] = (),
        id_prefix: str = "b",
        label: str | None = None,
    ):
        self.backend = backend
        self.label = label or model_label(backend)
        self._parent: Context | None = None
        self._children: list[Context] = []
        self.budget = budget or Budget()
        self.limits = limits or Limits()
        self.seed = seed
        self.system_prompt = system_prompt
        self.branches: dict[str, Branch] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._listeners: list[Listener] = list(listeners)
        self._watchers: list[tuple[set[str], asyncio.Queue[Event]]] = []
        self._ids = itertools.count()
        self._finish_counter = itertools.count()
        self._id_prefix = id_prefix
        # Backend request ids are unique across Contexts sharing one backend; branch ids stay short.
        self._uid = uuid.uuid4().hex[:12]
        self._semaphore = asyncio.Semaphore(self.limits.max_concurrency) if self.limits.max_concurrency else None
        self._throttler = (
            Throttler(rate_limit=max(1, round(self.limits.requests_per_s)), period=1.0)
            if self.limits.requests_per_s
            else None
        )
        self._generated = 0
        self._calls = 0
        self._score_calls = 0
        self._scored_tokens = 0
        self._start = time.monotonic()
        self._end: float | None = None
        self._budget_hit: str | None = None
        self._deadline_task: asyncio.Task | None = None
        self._extra_usage = Usage()
        self.log: list[dict[str, Any]] = []

    # ----------------------------------------------------------------- observability
    def add_listener(self, listener: Listener) -> None:
        """Call `listener(event)` synchronously for every event (keep it cheap)."""
        self._listeners.append(listener)

    def _emit(self, event: Event) -> None:
        for fn in self._listeners:
            fn(event)
        if event.branch_id is not None:
            for ids, queue in self._watchers:
                if event.branch_id in ids:
                    queue.put_nowait(event)

    def note(self, message: str, **data: Any) -> None:
        """Record a strategy decision; it appears in the event stream and in `ctx.log`."""
        entry = {"message": message, **data}
        self.log.append(entry)
        self._emit(Event(kind="decision", text=message, data=data))

    # ----------------------------------------------------------------- spawning
    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def _request_id(self, branch_id: str) -> str:
        return f"{self._uid}-{branch_id}"

    def spawn(
        self,
        source: Source,
        n: int = 1,
        sampling: SamplingSpec | None = None,
        *,
        after: Sequence[Branch] | None | After = After.ALL_FINISHED,
        group: str | None = None,
        parent: str | None = None,
        continue_final_message: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> list[Branch]:
        """Start `n` branches of one prompt and return them at once (they run in the background).

        `after` names the branches this one causally depends on, for the sequential-token count: by
        default every branch already finished when it is spawned; pass `[]` for an independent branch.
        A total-token budget clamps `max_tokens` to what is left.
        """
        if n < 1:
            raise ValueError(f"spawn needs n >= 1, got {n}")
        if self.budget_hit:
            raise TTScaleError(f"budget spent ({self.budget_hit}); no new branches")
        sampling = sampling or SamplingSpec()
        deps = ([b for b in self._root()._tree_branches() if b.done] if isinstance(after, After)
                else list(after or []))
        crit = max(deps, key=lambda b: (b.seq_end, b.seq_prompt_end), default=None)  # the critical path so far
        seq_base = crit.seq_end if crit is not None else 0
        seq_prompt_base = crit.seq_prompt_end if crit is not None else 0
        self._start_deadline()
        out = []
        for i in range(n):
            serial = next(self._ids)
            rid = f"{self._id_prefix}{serial}"
            s = sampling
            seed = seed_for(sampling, i, serial, self.seed)
            max_tokens = self._clamp_max_tokens(sampling.max_tokens, seq_base, seq_prompt_base)
            if seed != sampling.seed or max_tokens != sampling.max_tokens:
                s = sampling.model_copy(update={"seed": seed, "max_tokens": max_tokens})
            req = request_for(source, self._request_id(rid), s, continue_final_message, self.system_prompt)
            branch = Branch(id=rid, parent=parent, group=group, request=req, seq_base=seq_base,
                            seq_prompt_base=seq_prompt_base, meta=dict(meta or {}))
            out.append(self._start_branch(branch, None))
        return out

    def fork(self, branch: Branch, n: int, sampling: SamplingSpec | None = None, *,
             group: str | None = None, meta: dict[str, Any] | None = None) -> list[Branch]:
        """Branch `branch` at its current point into `n` children that continue from there.

        On a backend with `shared_kv_fork` (our engine) the children share the parent's KV (no re-prefill)
        and the parent keeps running. Elsewhere each child is a new request whose prompt is the parent's
        prompt plus its text so far, continued as the same assistant turn (prefix caching keeps it cheap);
        the fallback is recorded in each child's `meta["fork"]`. A child's text holds only what it
        generates after the fork; `meta["prefix_text"]` holds the parent's text streamed so far. On shared
        KV the backend forks at its own current position, which can be a step or two past what had been
        streamed when `fork` was called.
        """
        if n < 1:
            raise ValueError(f"fork needs n >= 1, got {n}")
        if branch.request is None:
            raise ValueError(f"branch {branch.id} has no request to fork")
        sampling = sampling or branch.request.sampling
        sampling = sampling.model_copy(update={"max_tokens": max(1, sampling.max_tokens - branch.num_tokens)})
        parent, child_group, seq_base = branch.id, group or branch.group, branch.seq_end
        out: list[Branch] = []
        if self.backend.capabilities.shared_kv_fork and not branch.done:
            streams = self.backend.fork(branch.request.request_id, n, sampling)
            for rid, stream in streams:
                req = branch.request.model_copy(update={"request_id": rid, "sampling": sampling})
                child = Branch(id=self._new_id(), request=req, meta={**(meta or {}), "fork": "shared_kv",
                               "prefix_text": branch.text}, parent=parent, group=child_group, seq_base=seq_base)
                out.append(self._start_branch(child, stream))
            return out
        req = branch.request
        for i in range(n):
            bid = self._new_id()
            rid = self._request_id(bid)
            s = sampling.model_copy(update={"seed": None if sampling.seed is None else sampling.seed + 1 + i})
            child_req = continuation_request(req, branch, rid, s)
            child = Branch(id=bid, request=child_req, meta={**(meta or {}), "fork": "re-prefill",
                           "prefix_text": branch.text}, parent=parent, group=child_group, seq_base=seq_base)
            out.append(self._start_branch(child, None))
        return out

    def run_native(self, job: NativeJob, *, group: str | None = None, after: Sequence[Branch] = (),
                   meta: dict[str, Any] | None = None) -> NativeRun:
        """Start an engine-native run (Hogwild workers, ParaThinker paths) with one branch per stream, like
        `spawn`: events, cancel and budgets apply to them (see `ttscale.native_runs`). `after`: branches
        it depends on (default none). Await `run.finished()` for its outcome."""
        from ttscale.native_runs import start_native

        return start_native(self, job, group=group, after=after, meta=meta)

    def _start_branch(self, branch: Branch, stream: DeltaStream | None) -> Branch:
        self.branches[branch.id] = branch
        self._tasks[branch.id] = asyncio.create_task(self._run_branch(branch, stream), name=f"ttscale-{branch.id}")
        self._emit(Event(kind="spawned", branch_id=branch.id, data={"group": branch.group, "parent": branch.parent}))
        return branch

    def _clamp_max_tokens(self, max_tokens: int, seq_base: int, seq_prompt_base: int = 0) -> int:
        for c in self._chain():  # this Context's budget, then every ancestor's
            max_tokens = tokens_left(c.budget, max_tokens, c._tree_generated(), seq_base, seq_prompt_base)
        return max_tokens

    def _start_deadline(self) -> None:
        if self.budget.wall_time_s is None or self._deadline_task is not None:
            return
        delay = self.budget.wall_time_s - (time.monotonic() - self._start)
        self._deadline_task = asyncio.get_running_loop().create_task(self._deadline(delay))

    async def _deadline(self, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))
        self._spend("wall_time_s")

    async def _run_branch(self, branch: Branch, stream: DeltaStream | None = None) -> None:
        assert branch.request is not None
        try:
            if self._semaphore is not None:
                await self._semaphore.acquire()
            try:
                if branch.done:
                    return
                if self._throttler is not None:
                    async with self._throttler:
                        pass
                self._calls += 1
                if stream is None:
                    stream = self.backend.generate(branch.request)
                async with contextlib.aclosing(stream):
                    async for delta in stream:
                        self._apply(branch, delta)
                        if delta.finished:
                            break
                if not branch.done:
                    self._finish(branch, BranchStatus.finished, "stop")
            finally:
                if self._semaphore is not None:
                    self._semaphore.release()
        except asyncio.CancelledError:
            if not branch.done:
                self._finish(branch, BranchStatus.aborted, "abort")
        except Exception as exc:  # noqa: BLE001 - a backend failure fails this branch; the run goes on
            branch.error = f"{type(exc).__name__}: {exc}"
            if not branch.done:
                self._finish(branch, BranchStatus.failed, "error")
            branch.meta["exception"] = exc

    def _apply(self, branch: Branch, delta: Delta) -> None:
        if branch.done:
            return
        now = time.monotonic()
        n = apply_delta(branch, delta, now)
        if n or delta.text:
            self._generated += n
            if self._listeners or self._watchers:
                self._emit(Event.model_construct(kind="delta", branch_id=branch.id, text=delta.text, n_tokens=n,
                                                 data={}, t=now))
        if delta.finished:
            reason = delta.finish_reason or "stop"
            if delta.error or reason == "error":
                branch.error = delta.error
                self._finish(branch, BranchStatus.failed, "error")
            elif reason == "abort":
                self._finish(branch, BranchStatus.aborted, "abort")
            else:
                self._finish(branch, BranchStatus.finished, reason)
        self._check_budget(branch)

    def _check_budget(self, branch: Branch) -> None:
        chain = self._chain()  # this Context's budget, then every ancestor's (a child spends theirs too)
        if not branch.done and any(c._budget_hit for c in chain) and not ends_by_itself(branch):
            self.cancel(branch, reason="budget")  # it was let finish at its max_tokens, but ran past it
            return
        for c in chain:
            if not c._budget_hit and (which := spent_budget(c.budget, c._tree_generated, branch)):
                c._spend(which)

    def _spend(self, which: str) -> None:
        """A budget is spent: abort every running branch, child Contexts' included."""
        if self._budget_hit:
            return
        self._budget_hit = which
        live = [b for b in self._tree_branches() if not b.done and not ends_by_itself(b)]
        self._emit(Event(kind="budget", text=which, data={"aborted": [b.id for b in live]}))
        for b in live:
            self._owner(b).cancel(b, reason="budget")

    def _finish(self, branch: Branch, status: BranchStatus, reason: str) -> None:
        branch.status = status
        branch.finish_reason = reason
        branch.finished_at = time.monotonic()
        branch.finish_order = next(self._finish_counter)
        kind = _EVENT_OF_STATUS[status]
        self._emit(Event(kind=kind, branch_id=branch.id, data={"reason": reason, "tokens": branch.num_tokens}))

    # ----------------------------------------------------------------- cancelling
    def cancel(self, branch: Branch | str, reason: str = "cancelled") -> None:
        """Abort one branch now: it is marked aborted at once; the backend request is aborted."""
        b = self.branches[branch] if isinstance(branch, str) else branch
        if b.done:
            return
        b.meta.setdefault("abort_reason", reason)
        self._finish(b, BranchStatus.aborted, "abort")
        task = self._tasks.get(b.id)
        if task is not None and not task.done():
            task.cancel()

    def cancel_rest(self, keep: Iterable[Branch] = (), among: Iterable[Branch] | None = None,
                    reason: str = "cancelled") -> list[Branch]:
        """Abort every running branch (of `among`, default all) not in `keep`; returns those aborted."""
        keep_ids = {b.id for b in keep}
        pool = list(among) if among is not None else list(self.branches.values())
        out = [b for b in pool if not b.done and b.id not in keep_ids]
        for b in out:
            self.cancel(b, reason=reason)
        return out

    # ----------------------------------------------------------------- waiting
    async def drain(self) -> None:
        """Wait for every branch task (child Contexts' too), cancelled ones included, to close its stream."""
        while True:
            pending = [t for c in self._tree() for t in c._tasks.values() if not t.done()]
            if not pending:
                return
            await asyncio.gather(*pending, return_exceptions=True)

    async def run_one(self, source: Source, sampling: SamplingSpec | None = None, **kw: Any) -> Branch:
        """Spawn one branch and wait for it."""
        (b,) = self.spawn(source, 1, sampling, **kw)
        await self.wait_all([b])
        return b

    # ----------------------------------------------------------------- other backend calls
    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Score a continuation on the backend; counted in Usage (score_calls, scored_tokens)."""
        if not self.backend.capabilities.score:
            raise CapabilityError(f"backend {self.backend.name!r} cannot score (needs prompt logprobs)")
        if self._throttler is not None:
            async with self._throttler:
                pass
        res = await self.backend.score(request)
        self._score_calls += 1
        self._scored_tokens += len(res.logprobs)
        return res

    def require(self, *capabilities: str, why: str = "") -> None:
        """Raise CapabilityError naming what the backend lacks."""
        missing = self.backend.capabilities.missing(*capabilities)
        if missing:
            raise CapabilityError(
                f"backend {self.backend.name!r} lacks {', '.join(missing)}" + (f": {why}" if why else "")
            )

    def add_usage(self, usage: Usage) -> None:
        """Fold in usage spent outside this Context's branches (engine-native runs, a judge's own calls).

        Counts without a per-model split are this Context's model's (`label`). Nested work that runs
        branches belongs in `child(...)`, not here.
        """
        if not usage.by_model:
            usage = usage.model_copy(update={"by_model": {self.label: model_counts(usage)}})
        self._extra_usage = self._extra_usage + usage

    # ----------------------------------------------------------------- nested work
    def child(self, *, budget: Budget | None = None, label: str | None = None, backend: Backend | None = None,
              limits: Limits | None = None, id_prefix: str | None = None) -> Context:
        """A Context for nested work (a target model, a judge, a verifier) inside this one.

        It shares this Context's budgets: every token it generates counts against them, a spent budget
        here aborts its branches too, and `budget` only narrows it further. Its usage folds into this
        Context's `usage` (per model under `label`, default the backend's model name); its branches may
        depend on this Context's (`spawn(after=[...])`), so the critical path runs through both. Same
        backend: it shares this Context's concurrency and rate limits; another backend: `limits` (none
        by default). It is closed with this Context.
        """
        be = backend or self.backend
        lab = label or model_label(be)
        kid = Context(be, budget=budget, limits=limits if be is not self.backend else self.limits, seed=self.seed,
                      system_prompt=self.system_prompt, id_prefix=id_prefix or f"{lab}-", label=lab)
        if be is self.backend and limits is None:
            kid._semaphore, kid._throttler = self._semaphore, self._throttler
        kid._listeners = self._listeners  # the parent's listeners see the child's events
        kid._start = self._start
        kid._parent = self
        self._children.append(kid)
        return kid

    def _chain(self) -> list[Context]:
        """This Context and its ancestors, innermost first."""
        out: list[Context] = []
        c: Context | None = self
        while c is not None:
            out.append(c)
            c = c._parent
        return out

    def _root(self) -> Context:
        return self._chain()[-1]

    def _tree(self) -> list[Context]:
        """This Context and its descendants."""
        out = [self]
        for ch in self._children:
            out += ch._tree()
        return out

    def _tree_branches(self) -> list[Branch]:
        return [b for c in self._tree() for b in c.branches.values()]

    def _tree_generated(self) -> int:
        return self._generated + sum(ch._tree_generated() for ch in self._children)

    def _owner(self, branch: Branch) -> Context:
        for c in self._tree():
            if c.branches.get(branch.id) is branch:
                return c
        raise KeyError(f"branch {branch.id} is not in this Context tree")

    # ----------------------------------------------------------------- accounting
    @property
    def generated_tokens(self) -> int:
        return self._generated

    @property
    def budget_hit(self) -> str | None:
        """Which budget was spent, if any (this Context's or, for a child, an ancestor's)."""
        return next((c._budget_hit for c in self._chain() if c._budget_hit), None)

    def close_clock(self) -> None:
        self._end = time.monotonic()

    @property
    def usage(self) -> Usage:
        """Exact usage of this Context so far, with `add_usage` extras and child Contexts folded in (the
        summing rules: `context_usage.branch_usage` and `fold_children`)."""
        end = self._end if self._end is not None else time.monotonic()
        counts = CallCounts(calls=self._calls, score_calls=self._score_calls, scored_tokens=self._scored_tokens)
        own = branch_usage(list(self.branches.values()), self._generated, end - self._start, counts, self.label)
        return fold_children(own + self._extra_usage, [ch.usage for ch in self._children])

    async def aclose(self) -> None:
        """Abort whatever still runs (child Contexts' too) and wait for the streams to close."""
        for ch in self._children:
            await ch.aclose()
        self.cancel_rest(reason="context closed")
        if self._deadline_task is not None:
            self._deadline_task.cancel()
        await self.drain()
        if self._end is None:
            self.close_clock()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


"""The Context: what a strategy uses to run branches on a backend.

A strategy never talks to a backend directly. It asks the Context to `spawn` branches, waits for them
(`first_finished`, `wait_all`, `watch`), cancels the ones no longer worth finishing (`cancel`,
`cancel_rest`), and reads `usage`. The Context turns backend deltas into Branch updates and Events,
enforces budgets by aborting, applies concurrency and request-rate limits, and keeps exact Usage.

Cancellation contract: cancelling a branch cancels the task that consumes the backend's stream and
closes the stream, which makes the backend abort the request on its server (see backends/base.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Self

from asyncio_throttle import Throttler

from ttscale.backends.base import Backend
from ttscale.budget import Budget, Limits
from ttscale.errors import CapabilityError, TTScaleError
from ttscale.types import (
    Branch,
    BranchStatus,
    Delta,
    Event,
    GenerationRequest,
    Problem,
    SamplingSpec,
    ScoreRequest,
    ScoreResult,
    Usage,
)

Listener = Callable[[Event], None]
Source = Problem | str | list[dict[str, Any]] | GenerationRequest

_AFTER_ALL_FINISHED = object()


class Context:
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
    ):
        self.backend = backend
        self.budget = budget or Budget()
        self.limits = limits or Limits()
        self.seed = seed
        self.system_prompt = system_prompt
        self.branches: dict[str, Branch] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._listeners: list[Listener] = list(listeners)
        self._watchers: list[tuple[set[str], asyncio.Queue]] = []
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

    def _request_for(self, source: Source, rid: str, sampling: SamplingSpec, continue_final: bool) -> GenerationRequest:
        if isinstance(source, GenerationRequest):
            return source.model_copy(update={"request_id": rid, "sampling": sampling})
        if isinstance(source, Problem):
            return GenerationRequest(request_id=rid, messages=source.chat(self.system_prompt), sampling=sampling)
        if isinstance(source, str):
            return GenerationRequest(
                request_id=rid,
                messages=Problem(prompt=source).chat(self.system_prompt),
                sampling=sampling,
            )
        if isinstance(source, list):
            return GenerationRequest(
                request_id=rid, messages=source, sampling=sampling, continue_final_message=continue_final
            )
        raise TypeError(f"cannot build a request from {type(source).__name__}")

    def _seed_for(self, sampling: SamplingSpec, index: int, serial: int) -> int | None:
        if sampling.seed is not None:
            return sampling.seed + index
        if self.seed is None:
            return None
        return (self.seed * 1_000_003 + serial) % (2**31 - 1)

    def spawn(
        self,
        source: Source,
        n: int = 1,
        sampling: SamplingSpec | None = None,
        *,
        after: Sequence[Branch] | None | object = _AFTER_ALL_FINISHED,
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
        if self._budget_hit:
            raise TTScaleError(f"budget spent ({self._budget_hit}); no new branches")
        sampling = sampling or SamplingSpec()
        if after is _AFTER_ALL_FINISHED:
            deps = [b for b in self.branches.values() if b.done]
        else:
            deps = list(after or [])  # type: ignore[arg-type]
        seq_base = max((b.seq_end for b in deps), default=0)
        self._start_deadline()
        out = []
        for i in range(n):
            serial = next(self._ids)
            rid = f"{self._id_prefix}{serial}"
            s = sampling
            seed = self._seed_for(sampling, i, serial)
            max_tokens = self._clamp_max_tokens(sampling.max_tokens, seq_base)
            if seed != sampling.seed or max_tokens != sampling.max_tokens:
                s = sampling.model_copy(update={"seed": seed, "max_tokens": max_tokens})
            req = self._request_for(source, self._request_id(rid), s, continue_final_message)
            branch = Branch(id=rid, parent=parent, group=group, request=req, seq_base=seq_base, meta=dict(meta or {}))
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
        fork_fn = getattr(self.backend, "fork", None)
        common = {"parent": branch.id, "group": group or branch.group, "seq_base": branch.seq_end}
        out: list[Branch] = []
        if self.backend.capabilities.shared_kv_fork and fork_fn is not None and not branch.done:
            streams = fork_fn(branch.request.request_id, n, sampling)
            for rid, stream in streams:
                req = branch.request.model_copy(update={"request_id": rid, "sampling": sampling})
                child = Branch(id=self._new_id(), request=req, meta={**(meta or {}), "fork": "shared_kv",
                               "prefix_text": branch.text}, **common)
                out.append(self._start_branch(child, stream))
            return out
        req = branch.request
        for i in range(n):
            bid = self._new_id()
            rid = self._request_id(bid)
            s = sampling.model_copy(update={"seed": None if sampling.seed is None else sampling.seed + 1 + i})
            if req.messages is not None:
                msgs = [dict(m) for m in req.messages]
                if req.continue_final_message and msgs and msgs[-1].get("role") == "assistant":
                    msgs[-1]["content"] = str(msgs[-1].get("content", "")) + branch.text
                else:
                    msgs.append({"role": "assistant", "content": branch.text})
                child_req = GenerationRequest(request_id=rid, messages=msgs, continue_final_message=True, sampling=s)
            elif req.prompt is not None:
                child_req = GenerationRequest(request_id=rid, prompt=req.prompt + branch.text, sampling=s)
            else:
                child_req = GenerationRequest(request_id=rid, prompt_token_ids=list(req.prompt_token_ids or [])
                                              + list(branch.token_ids), sampling=s)
            child = Branch(id=bid, request=child_req, meta={**(meta or {}), "fork": "re-prefill",
                           "prefix_text": branch.text}, **common)
            out.append(self._start_branch(child, None))
        return out

    def _start_branch(self, branch: Branch, stream: AsyncIterator[Delta] | None) -> Branch:
        self.branches[branch.id] = branch
        self._tasks[branch.id] = asyncio.create_task(self._run_branch(branch, stream), name=f"ttscale-{branch.id}")
        self._emit(Event(kind="spawned", branch_id=branch.id, data={"group": branch.group, "parent": branch.parent}))
        return branch

    def _clamp_max_tokens(self, max_tokens: int, seq_base: int) -> int:
        left = max_tokens
        if self.budget.total_tokens is not None:
            left = min(left, max(1, self.budget.total_tokens - self._generated))
        if self.budget.sequential_tokens is not None:
            left = min(left, max(1, self.budget.sequential_tokens - seq_base))
        return left

    def _start_deadline(self) -> None:
        if self.budget.wall_time_s is None or self._deadline_task is not None:
            return
        delay = self.budget.wall_time_s - (time.monotonic() - self._start)
        self._deadline_task = asyncio.get_running_loop().create_task(self._deadline(delay))

    async def _deadline(self, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))
        self._spend("wall_time_s")

    async def _run_branch(self, branch: Branch, stream: AsyncIterator[Delta] | None = None) -> None:
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
        n = delta.n_tokens
        if delta.prompt_tokens is not None:
            branch.prompt_tokens = delta.prompt_tokens
        if delta.cached_prompt_tokens is not None:
            branch.cached_prompt_tokens = delta.cached_prompt_tokens
        if n or delta.text:
            if branch.first_token_at is None:
                branch.first_token_at = now
            branch.text += delta.text
            if delta.token_ids:
                branch.token_ids.extend(delta.token_ids)
            branch.num_tokens += n
            if delta.logprobs:
                branch.logprobs.extend(delta.logprobs)
            if delta.top_logprobs:
                branch.top_logprobs.extend(delta.top_logprobs)
            if n:
                branch.token_times.extend([now] * n)
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
        if self._budget_hit:
            return
        if self.budget.total_tokens is not None and self._generated >= self.budget.total_tokens:
            self._spend("total_tokens")
        elif self.budget.sequential_tokens is not None and branch.seq_end >= self.budget.sequential_tokens:
            self._spend("sequential_tokens")

    def _spend(self, which: str) -> None:
        """A budget is spent: abort every running branch."""
        if self._budget_hit:
            return
        self._budget_hit = which
        live = [b for b in self.branches.values() if not b.done]
        self._emit(Event(kind="budget", text=which, data={"aborted": [b.id for b in live]}))
        for b in live:
            self.cancel(b, reason="budget")

    def _finish(self, branch: Branch, status: BranchStatus, reason: str) -> None:
        branch.status = status
        branch.finish_reason = reason
        branch.finished_at = time.monotonic()
        branch.finish_order = next(self._finish_counter)
        kind = {"finished": "finished", "aborted": "aborted", "failed": "failed"}[status.value]
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

    def cancel_rest(self, keep: Iterable[Branch] = (), among: Iterable[Branch] | None = None, reason: str = "cancelled") -> list[Branch]:
        """Abort every running branch (of `among`, default all) not in `keep`; returns those aborted."""
        keep_ids = {b.id for b in keep}
        pool = list(among) if among is not None else list(self.branches.values())
        out = [b for b in pool if not b.done and b.id not in keep_ids]
        for b in out:
            self.cancel(b, reason=reason)
        return out

    # ----------------------------------------------------------------- waiting

    async def watch(self, branches: Sequence[Branch]) -> AsyncIterator[Event]:
        """Yield the events of `branches` as they happen, until all of them are done."""
        ids = {b.id for b in branches}
        queue: asyncio.Queue = asyncio.Queue()
        entry = (ids, queue)
        self._watchers.append(entry)
        try:
            live = {b.id for b in branches if not b.done}
            while live:
                ev: Event = await queue.get()
                yield ev
                if ev.kind in ("finished", "aborted", "failed"):
                    live.discard(ev.branch_id)
        finally:
            self._watchers.remove(entry)

    async def first_finished(
        self,
        branches: Sequence[Branch],
        k: int = 1,
        *,
        accept: Callable[[Branch], bool] | None = None,
    ) -> list[Branch]:
        """The first `k` branches to finish, in finishing order (fewer when the rest end otherwise).

        A branch counts when it ends with status `finished` (EOS, stop string or length limit) and,
        if given, `accept(branch)` holds. Branches that fail or are aborted do not count.
        """
        accept = accept or (lambda b: True)
        won = [b for b in sorted((b for b in branches if b.done), key=lambda b: b.finish_order or 0)
               if b.status is BranchStatus.finished and accept(b)]
        if len(won) >= k or all(b.done for b in branches):
            return won[:k]
        async for ev in self.watch(branches):
            if ev.kind == "finished":
                b = self.branches[ev.branch_id]
                if b not in won and accept(b):
                    won.append(b)
                    if len(won) >= k:
                        break
        return won[:k]

    async def wait_all(self, branches: Sequence[Branch] | None = None) -> list[Branch]:
        """Wait until every branch (default: all of this Context's) is done."""
        pool = list(branches) if branches is not None else list(self.branches.values())
        tasks = [self._tasks[b.id] for b in pool if b.id in self._tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return pool

    async def drain(self) -> None:
        """Wait for every branch task, cancelled ones included, to have closed its backend stream."""
        while True:
            pending = [t for t in self._tasks.values() if not t.done()]
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
        """Fold in usage spent outside this Context's branches (another backend, a sub-context)."""
        self._extra_usage = self._extra_usage + usage

    # ----------------------------------------------------------------- accounting

    @property
    def generated_tokens(self) -> int:
        return self._generated

    @property
    def budget_hit(self) -> str | None:
        """Which budget was spent, if any."""
        return self._budget_hit

    def close_clock(self) -> None:
        self._end = time.monotonic()

    @property
    def usage(self) -> Usage:
        """Exact usage of this Context so far (plus anything folded in with `add_usage`)."""
        bs = list(self.branches.values())
        saved = 0
        for b in bs:
            if b.status is BranchStatus.aborted and b.request is not None:
                saved += max(0, b.request.sampling.max_tokens - b.num_tokens)
        end = self._end if self._end is not None else time.monotonic()
        own = Usage(
            prompt_tokens=sum(b.prompt_tokens for b in bs),
            cached_prompt_tokens=sum(b.cached_prompt_tokens for b in bs),
            generated_tokens=self._generated,
            sequential_tokens=max((b.seq_end for b in bs), default=0),
            saved_tokens=saved,
            wall_time_s=end - self._start,
            calls=self._calls,
            score_calls=self._score_calls,
            scored_tokens=self._scored_tokens,
            branches=len(bs),
            aborted=sum(b.status is BranchStatus.aborted for b in bs),
        )
        extra = self._extra_usage
        return own.model_copy(
            update={
                k: getattr(own, k) + getattr(extra, k)
                for k in ("prompt_tokens", "cached_prompt_tokens", "generated_tokens", "sequential_tokens",
                          "sequential_prompt_tokens", "saved_tokens", "calls", "score_calls", "scored_tokens",
                          "branches", "aborted")
            }
        )

    async def aclose(self) -> None:
        """Abort whatever still runs and wait for the streams to close."""
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

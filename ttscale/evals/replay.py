"""`ReplayBackend`: serves a recorded trace bank (bank.py) as if a model were generating. No model needed.

Each new request for a problem takes the next unused trace of that problem (traces are numbered in the
order their requests started when recorded; `reset()` starts over, the eval runner calls it before each
strategy). The problem is the one the eval runner is solving (`CURRENT_PROBLEM`), else the one whose
first user message equals the request's. A request whose messages, prompt or sampling distribution
(temperature, top-p, top-k, min-p) differ from the trace's is refused with the difference named: the
recorded tokens are not a sample of what it asks for.

Timing. A trace's deltas carry their arrival time relative to the problem's first request. A replayed
delta is due at `max(spawn, origin + start) + (t - start)`, where `origin` is when the problem's first
replayed request arrived, `start` the recorded start of this trace and `spawn` when it was requested now:
replaying the strategy that recorded the bank puts every delta at its recorded time, so the strategy sees
events in the recorded order and takes the same decisions; a trace requested later than recorded is
shifted, never squeezed.

Clocks: `simulated` (default) is a discrete-event clock: it releases the earliest due delta, then waits
until the event loop has nothing left to run (the strategy has reacted) before releasing the next, so a
sweep runs as fast as the CPU allows and keeps the finishing order exactly. This assumes the strategy's
reactions stay on the event loop (no thread or network work between events). `real` does the same and
also waits for the wall clock to reach each recorded time divided by `speed`.

Wall time. Replaying is CPU-side re-use of the bank, so the time a replay takes says nothing about a
model. What it does say is `recorded_wall_time(problem)`: on the recorded timeline, the span from the
problem's first request to the last delta served for it, i.e. the wall time the replayed strategy takes
with the recorded generation speed (for the recording strategy: the recorded wall time). The eval runner
stores it as `Usage.recorded_wall_time_s`, and reports show it instead of the replay's run time.

A request may ask for fewer tokens than were recorded (a budget sweep): the trace is cut at `max_tokens`
with finish reason `length` (a cut inside a multi-token delta keeps that delta's text whole). A trace the
live strategy aborted ends where it was aborted: if a replayed strategy lets it run further, the request
fails with an error saying so once nothing else can happen.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from ttscale.backends.base import BackendBase, Capabilities, DeltaStream
from ttscale.errors import BackendError, CapabilityError, ConfigError
from ttscale.evals.bank import CURRENT_PROBLEM, LoopDriver, RecordedTrace, TraceBank, prompt_key, settle
from ttscale.types import GenerationRequest


class _Stalled(BackendError):
    pass


class SimClock(LoopDriver):
    """Discrete-event clock shared by every replayed stream of one backend.

    It releases the earliest due delta, then lets the event loop run until it is quiet (the strategy has
    reacted) before releasing the next. With `speed` set it also waits until the wall clock reaches each
    delta's recorded time divided by `speed` (the `real` clock); the order of events is the same either way.
    """

    driver_name = "ttscale-replay-clock"

    def __init__(self, speed: float | None = None, settle_rounds: int = 3):
        if speed is not None and speed <= 0:
            raise ConfigError(f"replay speed must be > 0, got {speed}")
        super().__init__()
        self.now = 0.0
        self.speed = speed
        self.settle_rounds = settle_rounds
        self._t0: float | None = None
        self._heap: list[tuple[float, int, int, asyncio.Future]] = []
        self._ids = itertools.count()
        self._stalled: dict[int, tuple[asyncio.Future, str]] = {}
        self.events = 0

    def time(self) -> float:
        """Virtual now: the time of the last released event."""
        return self.now

    def _restarting(self, new_loop: bool) -> None:
        if new_loop:
            self._heap, self._stalled = [], {}  # left over from a closed event loop

    async def sleep_until(self, t: float, order: int = 0) -> None:
        """Return when the clock reaches `t` (ties in `t` go by `order`, then by arrival)."""
        self._kick()  # first: a driver started anew forgets events left from a closed loop
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (max(t, self.now), order, next(self._ids), fut))
        await fut

    async def stall(self, why: str) -> None:
        """Wait forever; fails with `why` once nothing else can happen (only a cancel ends it well)."""
        self._kick()
        fut = asyncio.get_running_loop().create_future()
        key = next(self._ids)
        self._stalled[key] = (fut, why)
        try:
            await fut
        finally:
            self._stalled.pop(key, None)

    async def _pace(self, t: float) -> bool:
        """With a speed set, wait until the wall clock reaches `t`; False if woken early by a new event."""
        if self.speed is None:
            return True
        if self._t0 is None:
            self._t0 = time.monotonic() - self.now / self.speed
        wait = self._t0 + t / self.speed - time.monotonic()
        if wait <= 0:
            return True
        assert self._wake is not None
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), wait)
        except TimeoutError:
            return True
        return False

    async def _drive(self) -> None:
        assert self._wake is not None
        while True:
            await settle(self.settle_rounds)
            while self._heap and self._heap[0][3].done():
                heapq.heappop(self._heap)
            if self._heap:
                if not await self._pace(self._heap[0][0]):
                    continue
                t, _, _, fut = heapq.heappop(self._heap)
                if fut.done():
                    continue
                self.now = max(self.now, t)
                self.events += 1
                fut.set_result(None)
                continue
            stalled = [(f, why) for f, why in self._stalled.values() if not f.done()]
            if stalled:
                for f, why in stalled:
                    f.set_exception(_Stalled(why))
                continue
            self._wake.clear()
            await self._wake.wait()


# Sampling fields that change which tokens a model draws: a trace recorded under other values is not a sample
# of the distribution the request asks for. (max_tokens may be lower than recorded: the trace is cut.)
DISTRIBUTION_FIELDS = ("temperature", "top_p", "top_k", "min_p")


class ReplayRefused(ConfigError):
    """A request a bank cannot serve as recorded (more traces than recorded, another prompt or sampling, a
    trace cut shorter than the request allows): the problem's result would not be the replayed strategy's."""


def recorded_mismatch(trace: RecordedTrace, request: GenerationRequest) -> str | None:
    """Why `trace` cannot stand in for `request`'s generation (other messages, prompt or sampling
    distribution), or None when it can. Fields the recording did not keep are not compared."""
    if trace.messages is not None and request.messages is not None and trace.messages != request.messages:
        for k, (a, b) in enumerate(zip(trace.messages, request.messages, strict=False)):
            if a != b:
                return (f"message {k} differs (recorded {a.get('role')!r}: {str(a.get('content'))[:60]!r}, "
                        f"requested {b.get('role')!r}: {str(b.get('content'))[:60]!r})")
        return f"{len(request.messages)} messages requested, {len(trace.messages)} recorded"
    if trace.prompt is not None and request.prompt is not None and trace.prompt != request.prompt:
        return "the prompt differs from the recorded one"
    asked = request.sampling.model_dump()
    for f in DISTRIBUTION_FIELDS:
        if f in trace.sampling and f in asked and trace.sampling[f] != asked[f]:
            return f"{f} {asked[f]!r} requested, {trace.sampling[f]!r} recorded"
    recorded_max = trace.sampling.get("max_tokens")
    if trace.finish_reason == "length" and recorded_max is not None and asked["max_tokens"] > recorded_max:
        return (f"max_tokens {asked['max_tokens']} requested; the trace was cut at the recorded max_tokens "
                f"{recorded_max}, and the model would have gone on")
    return None


def _whole_set(key: str) -> str:
    """A dataset key without its trailing `[...]` selections (`chain-sum@seed0[eval3]` -> `chain-sum@seed0`)."""
    return re.sub(r"(\[[^\[\]]*\])+$", "", key)


class ReplayBackend(BackendBase):
    """Serves recorded traces deterministically; see the module docstring."""

    name = "replay"

    def __init__(self, bank: TraceBank | str | Path, *, clock: Literal["simulated", "real"] = "simulated",
                 speed: float = 1.0):
        self.bank = bank if isinstance(bank, TraceBank) else TraceBank(bank)
        self.traces: dict[str, list[RecordedTrace]] = self.bank.load_all()
        if not self.traces:
            raise ConfigError(f"trace bank {str(self.bank.path)!r} holds no problems")
        self._by_key: dict[str, str] = {}
        for pid, p in self.bank.problems().items():
            self._by_key.setdefault(prompt_key(p), pid)
            for t in self.traces.get(pid, []):
                if t.messages or t.prompt:
                    self._by_key.setdefault(prompt_key(GenerationRequest(
                        request_id="k", messages=t.messages, prompt=t.prompt if not t.messages else None)), pid)
        if clock == "simulated":
            self.clock = SimClock()
        elif clock == "real":
            self.clock = SimClock(speed=speed)
        else:
            raise ConfigError(f"replay clock must be 'simulated' or 'real', got {clock!r}")
        all_traces = [t for ts in self.traces.values() for t in ts]
        has_tops = [t.top_logprobs_k for t in all_traces if any(d.top_logprobs for d in t.deltas)]
        self.capabilities = Capabilities(
            streaming=True, abort=True, token_ids=any(t.token_ids for t in all_traces),
            top_logprobs=min(has_tops) if has_tops else 0, score=False, tokenize=False,
            chat=True, completion=True,
        )
        self._next: dict[str, int] = defaultdict(int)
        self._origin: dict[str, float] = {}
        self._last: dict[str, float] = {}  # problem -> recorded-timeline time of its last served delta
        self.served: list[tuple[str, int, str]] = []
        self.aborted: list[str] = []
        self.refusals: dict[str, ReplayRefused] = {}  # problem -> the first request of it the bank could not serve

    @classmethod
    def from_spec(cls, path: str | None, **opts: Any) -> ReplayBackend:
        if not path:
            raise ConfigError("backend 'replay' needs a trace bank path: replay:BANK")
        return cls(path, **opts)

    def reset(self) -> None:
        """Start over: every problem's next request takes its first trace again."""
        self._next.clear()
        self._origin.clear()
        self._last.clear()
        self.refusals.clear()

    def refusal(self, problem_id: str) -> ReplayRefused | None:
        """Why the bank could not serve a request of this problem since `reset()` (None: every one was served).
        A strategy goes on without a failed branch; an eval stores the problem as an error instead, because
        its result would not be what the strategy gives live."""
        return self.refusals.get(problem_id)

    def _refuse(self, problem_id: str, why: str) -> ReplayRefused:
        exc = ReplayRefused(why)
        self.refusals.setdefault(problem_id, exc)
        return exc

    def check_dataset(self, key: str) -> None:
        """Refuse, before anything runs, to replay the bank on a dataset other than the one it was recorded on
        (`key`: `Dataset.key`, name plus seed or file hash): every problem would otherwise fail on its own, or
        match another set's prompts. A slice of it (a key with a `[...]` selection, as the study's splits
        have) is the same dataset: a bank of the whole set serves any part. A bank that noted no dataset
        (written from Python) is not checked."""
        recorded = self.bank.meta.get("dataset")
        if recorded is not None and _whole_set(recorded) != _whole_set(key):
            raise ConfigError(f"trace bank {str(self.bank.path)!r} was recorded on dataset {recorded!r}, and this "
                              f"run's dataset is {key!r} (--dataset, --seed); replay it on the dataset it was "
                              f"recorded on, or record a bank of {key!r} (`ttscale bank record`)")

    def recorded_wall_time(self, problem_id: str) -> float | None:
        """Seconds from the problem's first replayed request to its last served delta, on the recorded
        timeline (see the module docstring); None when nothing of it was replayed since `reset()`."""
        if problem_id not in self._origin:
            return None
        return max(0.0, self._last.get(problem_id, self._origin[problem_id]) - self._origin[problem_id])

    def problem_of(self, request: GenerationRequest) -> str:
        pid = CURRENT_PROBLEM.get()
        if pid is not None and pid in self.traces:
            return pid
        key = prompt_key(request)
        if key in self._by_key:
            return self._by_key[key]
        raise BackendError(f"the trace bank {str(self.bank.path)!r} has no problem with this prompt: "
                           f"{key[:120]!r}")

    async def generate(self, request: GenerationRequest) -> DeltaStream:
        pid = self.problem_of(request)
        i = self._next[pid]
        self._next[pid] += 1
        traces = self.traces[pid]
        if i >= len(traces):
            raise self._refuse(pid, f"the trace bank has {len(traces)} traces for problem {pid!r} and this run "
                               f"asked for request #{i + 1}; record more (`ttscale bank record --n N`)")
        tr = traces[i]
        mismatch = recorded_mismatch(tr, request)
        if mismatch is not None:
            raise self._refuse(pid, f"request #{i + 1} for problem {pid!r} cannot replay the recorded trace: "
                               f"{mismatch}; a bank replays requests made the way it was recorded (record one with "
                               "these prompts and sampling)")
        k = request.sampling.logprobs or 0
        if k and (tr.top_logprobs_k < k or any(d.top_logprobs is None for d in tr.deltas if d.n_tokens)):
            raise CapabilityError(f"request asks for top-{k} logprobs; trace {i} of {pid!r} was recorded with "
                                  f"top-{tr.top_logprobs_k}")
        now = self.clock.time()
        origin = self._origin.setdefault(pid, now)
        base = max(now, origin + tr.start) - tr.start
        rid = request.request_id
        limit = request.sampling.max_tokens
        sent = 0
        self.served.append((pid, i, rid))
        try:
            for d in tr.deltas:
                await self.clock.sleep_until(base + d.t, d.seq)
                self._last[pid] = max(self._last.get(pid, origin), self.clock.time())
                out = d.to_delta(rid)
                n = d.n_tokens
                if sent + n > limit or (sent + n == limit and not d.finished and n > 0):
                    keep = limit - sent
                    if keep < n:
                        out.token_ids = out.token_ids[:keep]
                        out.logprobs = out.logprobs[:keep] if out.logprobs is not None else None
                        out.top_logprobs = out.top_logprobs[:keep] if out.top_logprobs is not None else None
                        if out.num_tokens is not None:
                            out.num_tokens = keep
                        if keep == 0:
                            out.text = ""
                    out.finished, out.finish_reason, out.error = True, "length", None
                    yield out
                    return
                sent += n
                yield out
                if d.finished:
                    return
            if tr.status == "failed":
                raise BackendError(f"recorded request failed: {tr.error or 'no error message recorded'}")
            why = (f"trace {i} of problem {pid!r} was aborted after {tr.num_tokens} tokens when it was recorded, "
                   "and the replayed strategy let it run further; replay it with the recording strategy or record "
                   "complete traces (`ttscale bank record`)")
            try:
                await self.clock.stall(why)
            except _Stalled:
                self._refuse(pid, why)
                raise
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(rid)
            raise

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def close(self) -> None:
        await self.clock.aclose()
        self.bank.close()

"""The engine's queues: admission, prefill chunks, preemption and when a request is finished.

Continuous batching: every step decodes all running requests together; new prompts are prefilled in
chunks of at most `prefill_chunk` tokens between decode steps, so a long prompt never stalls the
branches already generating for more than one chunk. The prefix cache lets requests with the same prompt
(n samples of one question) share its blocks: the first one prefills, the others wait one step and then
view the cached segments instead of recomputing them. When the KV pool runs out during a decode, the
newest running request is preempted: its blocks are freed and it is recomputed later (prompt + tokens
so far), ahead of every waiting request; before any is, waiting requests part-way through their prefill give
their blocks back.

Only the engine thread calls this; it holds no tensors and runs no model code (`model_runner` does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ttscale.backends.engine.prefix_cache import (
    PrefixCache,
    block_hashes,
)
from ttscale.backends.engine.request import Request


@dataclass
class PrefillWork:
    request: Request
    start: int
    count: int


class Scheduler:
    """Owns the waiting and running queues (and the id -> request map) and decides what each step runs."""

    def __init__(self, block_size: int, prefill_chunk: int = 512, max_running: int = 256,
                 eos: Iterable[int] = (), max_context: int | None = None) -> None:
        self.block_size = block_size
        self.prefill_chunk = prefill_chunk
        self.max_running = max_running
        self.eos = set(eos)
        self.max_context = max_context
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.version = 0  # counts changes to `running` (a decode batch planned at one version holds until the next)

    # ---- queues -----------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, r: Request) -> bool:
        """Queue a new request for prefill; False (and nothing queued) when its id is already live."""
        if r.request_id in self.requests:
            return False
        self.requests[r.request_id] = r
        self.waiting.append(r)
        return True

    def add_running(self, r: Request) -> None:
        """A request whose KV is already in place (a fork's child) joins the next decode."""
        self.requests[r.request_id] = r
        self.running.append(r)
        self.version += 1

    def admit(self, r: Request) -> None:
        """`r`'s prefill is complete: it leaves the waiting queue and decodes from the next step."""
        self.waiting.remove(r)
        self.running.append(r)
        self.version += 1

    def decode_batch(self, in_flight: dict[int, int]) -> tuple[list[Request], list[int], list[int], list[int]]:
        """The next decode step's rows, in arrival order: every running request with a token to write,
        either its pending one (host) or the one a launched, unread step is sampling for it (`in_flight`:
        id(request) -> its row there, taken on device), less those that end by length when that step is
        read. Returns (requests, host tokens (0 where taken on device), source rows (-1: host), tokens
        ahead (1 where a launched step's token is not yet read))."""
        reqs, tokens, src, ahead = [], [], [], []
        get, length_stop = in_flight.get, self.length_stop  # looked up once: this runs over every request each step
        for r in self.running:
            j = get(id(r), -1)
            pending = r.pending
            if j < 0:
                if pending is None:
                    continue
                a = 0
            elif length_stop(r, 1):
                continue
            else:
                a = 1
            reqs.append(r)
            tokens.append(pending if pending is not None else 0)
            src.append(j)
            ahead.append(a)
        return reqs, tokens, src, ahead

    def preempt(self, r: Request) -> None:
        """Free a running request's KV and queue it first for recomputation (prompt + tokens so far; its
        last sampled token is still pending, so it resumes without sampling again)."""
        if r.seq is not None:
            r.seq.release()
        r.seq = None
        r.prefilled = 0
        r.resume_ids = r.prompt_ids + r.output_ids[:-1]
        self.running.remove(r)
        self.waiting.insert(0, r)
        self.version += 1

    def release_prefills(self, keep: Request | None = None) -> int:
        """Free the KV of waiting requests part-way through their prefill (all but `keep`); they start it
        again when next scheduled. What a full pool gives back first: a prefill chunk is cheaper to redo than
        a running request's whole context, and while they held their blocks the last running request could
        not grow and was ended with an error. How many were freed."""
        freed = 0
        for r in self.waiting:
            if r.seq is not None and r is not keep:
                r.seq.release()
                r.seq, r.prefilled, r.cached_tokens, r.cached_logits = None, 0, 0, None
                freed += 1
        return freed

    def release(self, r: Request, reason: str) -> None:
        """Mark `r` finished, free its KV and forget it."""
        r.finished, r.finish_reason = True, reason
        r.pending = None
        if r.seq is not None:
            r.seq.release()
            r.seq = None
        if r in self.running:
            self.running.remove(r)
            self.version += 1
        if r in self.waiting:
            self.waiting.remove(r)
        self.requests.pop(r.request_id, None)

    # ---- finish checks ----------------------------------------------------------------------------------
    def token_stop(self, r: Request, token: int) -> str | None:
        """"stop" when `token` ends `r` (end-of-sequence unless ignored, or one of its stop ids)."""
        p = r.params
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        return None

    def length_stop(self, r: Request, ahead: int = 0) -> str | None:
        """"length" when `r` has its `max_tokens`, or its newest token would not fit the model's context,
        counting `ahead` tokens sampled for it and not yet read.

        Counted from the request's tokens, not its sequence's length: a step launched ahead may already
        have reserved the next slot."""
        n_out = len(r.output_ids) + ahead
        if n_out >= r.params.max_tokens:
            return "length"
        if self.max_context is not None and len(r.prompt_ids) + n_out > self.max_context:
            return "length"
        return None

    # ---- prefill planning -------------------------------------------------------------------------------
    def plan_prefill(self, setup: Callable[[Request], None], prefix: PrefixCache | None = None
                     ) -> list[PrefillWork]:
        """Waiting requests (in arrival order) to prefill this step within the token budget.

        A request waits when the first block it would compute is one that another request computes this
        step: next step it finds that block in the prefix cache instead of computing it again (the n
        samples of one question; questions behind one system prompt). Keyed on the prompt's *first*
        block instead, every question behind a shared system prompt waited for the one before it, and the
        512 branches of a 64-question eval were prefilled one per step. `setup(r)` gives a request its
        sequence (prefix-cache lookup) the first time it is scheduled.
        """
        budget = self.prefill_chunk
        n_running = len(self.running)
        out: list[PrefillWork] = []
        busy: set[int] = set()
        for r in self.waiting:
            if budget <= 0 or n_running + len(out) >= self.max_running:
                break
            key = self._next_block_key(r, prefix)
            if key is not None and key in busy:
                continue
            if key is not None:
                busy.add(key)
            if r.seq is None:
                setup(r)
            ids = r.prefill_ids
            left = len(ids) - r.prefilled
            n = min(left, budget)
            out.append(PrefillWork(r, r.prefilled, n))
            budget -= n
        return out

    def _next_block_key(self, r: Request, prefix: PrefixCache | None) -> int | None:
        """Chained hash of the first full prompt block `r` would compute (None: no full block left)."""
        ids, bs = r.prefill_ids, self.block_size
        cached = r.block_hashes
        if cached is None or cached[0] is not ids:
            cached = (ids, block_hashes(ids, bs, len(ids) // bs))
            r.block_hashes = cached
        hs = cached[1]
        if r.seq is not None:  # already under way: the block it is computing
            i = r.prefilled // bs
            return hs[i] if i < len(hs) else None
        if prefix is None or not prefix.enabled:
            return hs[0] if hs else None
        return next((h for h in hs if h not in prefix.entries), None)

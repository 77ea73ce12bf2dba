"""Engine outputs handed from the engine thread to an event loop, in batches.

Outputs cross threads in batches (`Inbox`): the engine thread only publishes each request's state and,
the first time since the last hand-off, appends its reader to a deque; the event loop wakes the readers at
most every `stream_interval_ms`, so hundreds of live branches cost one wake-up per interval rather than
one per token, and each reader slices everything its request made since its last Delta into one
multi-token Delta. Per-token hand-offs, each a self-pipe write plus a Delta, a Context update and a GIL
switch, were what made a 512-branch eval several times slower than the engine under it; after them, a
`RequestOutput` per token on the engine thread and merging them again on the loop (`merge_outputs`, still
how native runs' outputs arrive) cost a quarter of a host-bound run. When consuming a batch takes more
than `handoff_share` of the time between batches, the batches are spaced further apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

from ttscale.backends.engine.request import OutputSink, Request, RequestOutput


def merge_outputs(outs: list[RequestOutput]) -> RequestOutput:
    """One output carrying the tokens, text and logprobs of consecutive outputs of one request, in order.

    How a native run's stream outputs arrive (generate and fork streams read their request instead). One
    Python loop of in-place extends: it runs on the event loop, whose time the engine thread waits for."""
    if len(outs) == 1:
        return outs[0]
    ids: list[int] = []
    lps: list[float] = []
    texts: list[str] = []
    tops: list[dict[int, float]] | None = None
    for o in outs:
        if o.top_logprobs or tops is not None:
            if tops is None:
                tops = [{} for _ in ids]
            tops += o.top_logprobs or [{} for _ in o.token_ids]
        ids += o.token_ids
        lps += o.logprobs
        texts.append(o.text)
    last = outs[-1]
    return RequestOutput(
        last.request_id, ids, lps, tops or None, "".join(texts), finished=last.finished,
        finish_reason=last.finish_reason, error=last.error, prompt_tokens=last.prompt_tokens,
        cached_tokens=last.cached_tokens,
    )


class Channel:
    """One request's outputs on the event loop side: a list plus the consumer's waiting future."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list[RequestOutput] = []
        self.waiter: asyncio.Future | None = None

    def put(self, out: RequestOutput) -> None:
        self.items.append(out)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> RequestOutput:
        """Everything that arrived since the last take, merged (waits for at least one output)."""
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        outs, self.items = self.items, []
        return merge_outputs(outs)


class StreamReader(OutputSink):
    """A generate / fork stream's reader of its request's published output (`OutputSink`): the engine
    thread only flags the request ready; the consumer slices the tokens, logprobs and text that arrived
    since its last Delta straight off the request, however many steps that is."""

    __slots__ = ("inbox", "request", "sent_tokens", "sent_chars", "tops_base", "waiter", "ended")

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox
        self.request: Request | None = None
        self.sent_tokens = self.sent_chars = self.tops_base = 0
        self.waiter: asyncio.Future | None = None
        self.ended = False

    def bind(self, r: Request) -> None:
        self.request = r
        self.sent_tokens, self.sent_chars = r.published[0], r.published[1]
        self.tops_base = len(r.output_ids) - len(r.top_logprobs)  # a fork child asking for logprobs its parent did not

    def ready(self, r: Request) -> None:  # engine thread
        self.inbox.put_ready(self)

    def wake(self) -> None:
        """Event loop, from the inbox's drain: later publishes flag the request again; the consumer looks
        (it may have read this output already, the finish included: then there is nothing to do)."""
        if self.request is not None:
            self.request.queued = False
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> tuple[Request, list[int], list[float], list[dict[int, float]] | None, str, str | None,
                            str | None] | None:
        """(request, new token ids, logprobs, top logprobs, text, finish reason, error) since the last take,
        or None when nothing new was published."""
        r = self.request
        if r is None or self.ended:
            return None
        n, c, reason, error = r.published  # one read: a finish never comes ahead of its tokens
        a, b = self.sent_tokens, self.sent_chars
        if n <= a and c <= b and reason is None:
            return None
        ids = r.output_ids[a:n]
        lps = r.logprobs[a:n]
        tops = r.top_logprobs[a - self.tops_base:n - self.tops_base] if r.params.logprobs else None
        text = r.text.slice(b, c) if c > b else ""
        self.sent_tokens = max(a, n)
        self.sent_chars = b + len(text)
        self.ended = reason is not None  # the last take: nothing more will come
        return r, ids, lps, tops or None, text, reason, error

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def next(self) -> tuple[Request, list[int], list[float], list[dict[int, float]] | None, str,
                                  str | None, str | None]:
        """`take()`, waiting until there is something to take."""
        while (got := self.take()) is None:
            await self.wait()
        return got


MAX_HANDOFF_GAP_S = 0.25


class Inbox:
    """Engine-thread outputs handed to one event loop in batches (see the module docstring).

    `put` runs on the engine thread: an append to a deque, and a `call_soon_threadsafe` only when no drain
    is pending. The drain runs on the loop no sooner than `gap` after the previous one: `interval`, or
    longer when consuming the last batch (waking each branch's consumer, Deltas, the Context, the strategy)
    took more than `share` of that time, so the consumers' share of the GIL stays bounded however many
    branches are live (the engine thread needs it too) and a branch's outputs arrive as fewer, longer
    Deltas instead; never more than `MAX_HANDOFF_GAP_S` apart, which bounds how late a stream or a
    finish is seen.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float, share: float = 1.0) -> None:
        self.loop, self.interval, self.share = loop, interval_s, share
        self.items: deque = deque()
        self.ready: deque[StreamReader] = deque()
        self.pending = False
        self.last = 0.0
        self.gap = interval_s

    def put(self, ch: Channel, out: RequestOutput) -> None:
        """Engine thread: one output for `ch` (a native run's stream)."""
        self.items.append((ch, out))
        self._schedule()

    def put_ready(self, sink: StreamReader) -> None:
        """Engine thread: `sink`'s request has new output (see `StreamReader`)."""
        self.ready.append(sink)
        self._schedule()

    def _schedule(self) -> None:
        if not self.pending:
            self.pending = True
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                self.loop.call_soon_threadsafe(self._arm)

    def _arm(self) -> None:
        wait = self.last + self.gap - time.monotonic()
        if wait > 0:
            self.loop.call_later(wait, self._drain)
        else:
            self._drain()

    def _drain(self) -> None:
        self.pending = False  # before taking: a put racing with this drain schedules another one
        self.last = time.monotonic()
        items, ready = self.items, self.ready
        if not items and not ready:
            return
        woken = ready.popleft
        while ready:
            woken().wake()
        while items:
            ch, out = items.popleft()
            ch.put(out)
        # The consumers woken above run next, in order; this runs after them. (Wall time: a per-thread
        # CPU clock is a system call, ~5 us in some sandboxes, and waiting for the GIL counts as cost too.)
        self.loop.call_soon(self._measure, self.last)

    def _measure(self, t0: float) -> None:
        self.gap = max(self.interval, min(MAX_HANDOFF_GAP_S, (time.monotonic() - t0) / self.share))

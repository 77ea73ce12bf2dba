"""Controller overhead: many concurrent branches × many one-token deltas on a zero-latency backend.

Measures how many tokens/s the Context can absorb (branch updates, usage, budget checks, events) when
the backend costs nothing. The baseline in the same run is the bare loop: the same backend's streams
consumed with no Context at all, so the ratio is the Context's own cost.

    python benchmarks/controller_overhead.py --branches 1000 --tokens 1000
Target (issue 2): >= 100,000 tokens/s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator

from ttscale.backends.base import BackendBase, Capabilities
from ttscale.controller import Context
from ttscale.types import Delta, GenerationRequest, SamplingSpec


class ZeroLatencyBackend(BackendBase):
    """Yields `tokens` one-token deltas per request, handing control to the loop every `yield_every`."""

    name = "zero-latency"

    def __init__(self, tokens: int, yield_every: int = 16):
        self.tokens = tokens
        self.yield_every = yield_every
        self.capabilities = Capabilities(abort=True, token_ids=True)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        rid = request.request_id
        step = Delta(request_id=rid, text="x", token_ids=[7])
        final = Delta(request_id=rid, text="x", token_ids=[7], finished=True, finish_reason="stop")
        last = self.tokens - 1
        for i in range(self.tokens):
            if i % self.yield_every == 0:
                await asyncio.sleep(0)
            yield final if i == last else step


async def bare(backend: ZeroLatencyBackend, branches: int) -> int:
    async def one(i: int) -> int:
        n = 0
        async for d in backend.generate(GenerationRequest(request_id=str(i), prompt="p")):
            n += len(d.token_ids)
        return n

    return sum(await asyncio.gather(*(one(i) for i in range(branches))))


async def with_context(backend: ZeroLatencyBackend, branches: int, tokens: int, listener: bool) -> int:
    ctx = Context(backend)
    if listener:
        seen = [0]
        ctx.add_listener(lambda ev: seen.__setitem__(0, seen[0] + ev.n_tokens))
    bs = ctx.spawn("p", branches, SamplingSpec(max_tokens=tokens))
    await ctx.wait_all(bs)
    u = ctx.usage
    assert u.generated_tokens == branches * tokens, u
    return u.generated_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--branches", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    be = ZeroLatencyBackend(args.tokens)
    rows = []
    for label, fn in (
        ("bare stream loop (baseline)", lambda: bare(be, args.branches)),
        ("Context", lambda: with_context(be, args.branches, args.tokens, False)),
        ("Context + event listener", lambda: with_context(be, args.branches, args.tokens, True)),
    ):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            n = asyncio.run(fn())
            best = min(best, time.perf_counter() - t0)
        rows.append((label, n, best))
    base = rows[0][1] / rows[0][2]
    print(f"{args.branches} branches x {args.tokens} one-token deltas")
    print(f"{'':32s} {'tokens':>10s} {'seconds':>8s} {'tokens/s':>12s} {'vs bare':>8s}")
    for label, n, s in rows:
        print(f"{label:32s} {n:10d} {s:8.2f} {n / s:12,.0f} {n / s / base:8.2f}")
    ctx_rate = rows[1][1] / rows[1][2]
    print(f"target >= 100,000 tokens/s: {'PASS' if ctx_rate >= 100_000 else 'FAIL'} ({ctx_rate:,.0f})")


if __name__ == "__main__":
    main()

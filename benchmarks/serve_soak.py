"""Soak test of `ttscale serve`: many requests, a share of clients that walk away, nothing may leak.

    python benchmarks/serve_soak.py                          # 10,000 requests, 30% disconnects
    python benchmarks/serve_soak.py --requests 2000 --out benchmarks/results/serve_soak.txt

The proxy is the real `ttscale serve` CLI in its own process, in front of a stand-in OpenAI-compatible
upstream (a small uvicorn server in another process that streams tokens after a short delay and counts
the requests it is still working on). Requests mix pass-through (plain and streamed) with strategy
requests (`self-consistency-4/…`, `ffs-4/…`) that fan out upstream through `OpenAIBackend`, the path
where cancelled branches used to leak. A `--disconnect` share of the clients closes its connection at a
random point (before the answer, or after the first streamed bytes).

It checks, and exits 1 when one fails:
- the proxy's RSS at the end is at most 1.1x its RSS after the first 1,000 requests;
- the proxy's open file descriptors return to their count before the load (after the upstream work drains;
  pools drop kept-alive connections the upstream closed when next used, so a few plain requests go through
  first);
- none lost: every client that stayed got a complete answer (HTTP 200, one choice / `[DONE]`), and the
  upstream is left with no request in flight (disconnected clients' work was stopped, not orphaned).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from benchmarks.serve_load import (
    add_common_args,
    free_port,
    run_standin_if_asked,
    start,
    stop,
    wait_http,
    write_report,
)

MODEL = "standin"


# ----------------------------------------------------------------------------- stand-in upstream


def standin_app(delay_s: float) -> FastAPI:
    """An OpenAI-compatible upstream whose `/stats` says how many requests it is still serving."""
    app = FastAPI()
    stats = {"in_flight": 0, "total": 0}

    @app.get("/stats")
    async def get_stats():
        return stats

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        n = int(body.get("max_tokens") or 16)
        stats["total"] += 1
        stats["in_flight"] += 1
        answer = random.choice(["\\boxed{1}", "\\boxed{2}"])
        words = [f" t{i}" for i in range(n - 1)] + [answer]
        if body.get("stream"):
            async def gen():
                try:
                    for i, w in enumerate(words):
                        await asyncio.sleep(delay_s / n)
                        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                        if i == len(words) - 1:
                            done = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                                    "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}}
                            yield f"data: {json.dumps(done)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    stats["in_flight"] -= 1

            return StreamingResponse(gen(), media_type="text/event-stream")
        try:
            await asyncio.sleep(delay_s)
        finally:
            stats["in_flight"] -= 1
        return JSONResponse({
            "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n},
        })

    return app


# ----------------------------------------------------------------------------- processes


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ----------------------------------------------------------------------------- load


KINDS = (  # (model, stream, share)
    (MODEL, False, 0.3),
    (MODEL, True, 0.2),
    (f"self-consistency-4/{MODEL}", False, 0.25),
    (f"ffs-4/{MODEL}", True, 0.25),
)


class Tally:
    def __init__(self) -> None:
        self.answered = self.cut = self.failed = 0
        self.errors: dict[str, int] = {}

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1


async def one_request(session: aiohttp.ClientSession, url: str, rng: random.Random, disconnect: float,
                      max_tokens: int, tally: Tally) -> None:
    r = rng.random()
    for model, stream, share in KINDS:  # noqa: B007 - the kind the loop stops at is used below
        if r < share:
            break
        r -= share
    body = {"model": model, "messages": [{"role": "user", "content": "What is 1 + 1?"}],
            "max_tokens": max_tokens, "stream": stream}
    leave = rng.random() < disconnect
    leave_after = rng.uniform(0.0, 0.05)

    async def exchange() -> None:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                tally.fail(f"HTTP {resp.status}: {(await resp.read())[:120]!r}")
                return
            if stream:
                done = False
                async for line in resp.content:
                    if line.startswith(b"data: {\"error\""):
                        tally.fail(f"stream error: {line[:120]!r}")
                        return
                    if line.strip() == b"data: [DONE]":
                        done = True
                if done:
                    tally.answered += 1
                else:
                    tally.fail("stream ended without [DONE]")
            else:
                choices = json.loads(await resp.read()).get("choices") or []
                if len(choices) == 1:
                    tally.answered += 1
                else:
                    tally.fail("no choice")

    if not leave:
        try:
            await exchange()
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            tally.fail(type(e).__name__)
        return
    try:
        await asyncio.wait_for(exchange(), timeout=leave_after)
    except TimeoutError:
        tally.cut += 1  # the client went away: aiohttp closes the connection
    except (aiohttp.ClientError, ValueError) as e:
        tally.fail(type(e).__name__)


async def run_load(url: str, requests: int, clients: int, disconnect: float, max_tokens: int, seed: int,
                   tally: Tally, on_progress) -> None:
    rng = random.Random(seed)
    sent = done = 0
    conn = aiohttp.TCPConnector(limit=clients, limit_per_host=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def client() -> None:
            nonlocal sent, done
            while sent < requests:
                sent += 1
                await one_request(session, url, rng, disconnect, max_tokens, tally)
                done += 1
                on_progress(done)

        await asyncio.gather(*(client() for _ in range(clients)))


async def upstream_in_flight(upstream: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"{upstream}/stats") as r:
        return int((await r.json())["in_flight"])


async def settle(url: str, upstream: str, pid: int, fds_before: int, max_tokens: int,
                 timeout_s: float) -> tuple[int, int, float]:
    """Wait (polling, bounded) until the upstream has no request in flight and the proxy's descriptors are
    back to their count before the load. Returns (in_flight, fds, seconds waited).

    Connection pools (aiohttp's, httpx's) drop a kept-alive connection that the upstream closed when they
    are next used, so while descriptors are above the baseline a few sequential requests (no disconnects)
    go through the proxy before each reading: a leak would survive them, a pool's stale socket does not."""
    t0 = time.monotonic()
    while True:
        busy = await upstream_in_flight(upstream)
        if busy == 0:
            await run_load(url, 8, 1, 0.0, max_tokens, int(t0), Tally(), lambda _n: None)
        fds = open_fds(pid)
        if (busy == 0 and fds <= fds_before) or time.monotonic() - t0 > timeout_s:
            return busy, fds, time.monotonic() - t0
        await asyncio.sleep(1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--disconnect", type=float, default=0.3, help="share of clients that walk away")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="stand-in upstream's answer time")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    add_common_args(ap)
    args = ap.parse_args()
    if run_standin_if_asked(args, standin_app):
        return

    port, pport = free_port(), free_port()
    upstream, proxy = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{pport}"
    procs = [start([sys.executable, "-m", "benchmarks.serve_soak", "--_standin", str(port),
                    str(args.delay_ms / 1000)])]
    try:
        wait_http(f"{upstream}/v1/models", procs[0])
        procs.append(start([sys.executable, "-m", "ttscale.cli", "serve", "--upstream", upstream,
                            "--port", str(pport), "--max-n", "64"]))
        wait_http(f"{proxy}/health", procs[1])
        pid = procs[1].pid
        url = f"{proxy}/v1/chat/completions"
        tally = Tally()
        asyncio.run(run_load(url, 64, 8, 0.0, args.max_tokens, args.seed + 1, Tally(), lambda _n: None))
        fds_before = open_fds(pid)
        readings: dict[str, float] = {"rss_start_mb": rss_mb(pid)}
        t0 = time.monotonic()
        step = max(1, args.requests // 20)

        def on_progress(n: int) -> None:
            if n == min(1000, args.requests):
                readings["rss_1000_mb"] = rss_mb(pid)
            if n % step == 0:
                print(f"  {n:6d}/{args.requests} requests  {n / (time.monotonic() - t0):7.1f} req/s  "
                      f"rss {rss_mb(pid):6.1f} MB  fds {open_fds(pid)}", flush=True)

        asyncio.run(run_load(url, args.requests, args.clients, args.disconnect, args.max_tokens, args.seed,
                             tally, on_progress))
        elapsed = time.monotonic() - t0
        busy, fds_after, waited = asyncio.run(settle(url, upstream, pid, fds_before, args.max_tokens, timeout_s=60))
        rss_end = rss_mb(pid)
        growth = rss_end / readings["rss_1000_mb"]
        stayed = args.requests - tally.cut
        lost = stayed - tally.answered
        ok_rss, ok_fds, ok_lost = growth <= 1.1, fds_after <= fds_before, lost == 0 and busy == 0
        mix = ", ".join(f"{int(s * 100)}% {m}{' stream' if st else ''}" for m, st, s in KINDS)
        lines = [
            (f"ttscale serve soak test  ({time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, "
             f"python {sys.version.split()[0]}, load average before {os.getloadavg()[0]:.2f})"),
            f"command: python -m benchmarks.serve_soak {' '.join(sys.argv[1:])}",
            (f"{args.requests} requests from {args.clients} clients in {elapsed:.1f} s "
             f"({args.requests / elapsed:.0f} req/s); {int(args.disconnect * 100)}% of clients disconnect; "
             f"mix: {mix}"),
            (f"clients that walked away: {tally.cut}; stayed: {stayed}; answered: {tally.answered}; "
             f"failed: {tally.failed} {tally.errors or ''}"),
            (f"proxy RSS: {readings['rss_start_mb']:.1f} MB after warm-up, {readings['rss_1000_mb']:.1f} MB "
             f"after 1,000 requests, {rss_end:.1f} MB at the end: x{growth:.3f} (limit x1.10) "
             + ("ok" if ok_rss else "FAIL")),
            (f"proxy open fds: {fds_before} before the load, {fds_after} after it drained ({waited:.1f} s) "
             + ("ok" if ok_fds else "FAIL")),
            (f"upstream requests still in flight after the drain: {busy}; lost answers: {lost} "
             + ("ok" if ok_lost else "FAIL")),
        ]
        text = "\n".join(lines)
        write_report(text, args.out)
        if not (ok_rss and ok_fds and ok_lost):
            sys.exit(1)
    finally:
        for p in reversed(procs):
            stop(p)


if __name__ == "__main__":
    main()

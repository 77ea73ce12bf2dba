"""The proxy gives every upstream connection back: none is left half-closed (CLOSE-WAIT) for good.

An upstream closes a kept-alive connection after its keep-alive timeout. A connection the proxy still holds
in a pool is dropped by that pool when next used; one the proxy checked out and never returned stays open on
its side forever (CLOSE-WAIT), one more file descriptor per leak until the process runs out. The soak
benchmark (benchmarks/serve_soak.py) found such leaks: a branch aborted while its stream reader was closing
a finished upstream response (`ffs` cancels the losers the moment one branch finishes) cut httpx's close
short, and the connection stayed checked out of the pool. (A cancellation landing right after httpcore's
TCP connect left a connection in state NEW, open on both sides: the wait for the upstream to close all its
connections below fails on that one.)

Real parts: the `ttscale serve` CLI in its own process, in front of a stand-in OpenAI-compatible upstream
under uvicorn on 127.0.0.1 with a 1 s keep-alive; the proxy's sockets are read from /proc/<pid>/fd and
/proc/net/tcp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from tests.fixtures.real_backends import spawn_process_group, stop_process_group
from tests.fixtures.server import free_port

MODEL = "standin"
UPSTREAM_KEEP_ALIVE_S = 1
TCP_ESTABLISHED, TCP_CLOSE_WAIT = "01", "08"  # state codes of /proc/net/tcp
REQUESTS = 240
CLIENTS = 24


@dataclass(frozen=True)
class TcpSocket:
    local_port: int
    remote_port: int
    state: str
    inode: int


def parse_proc_net_tcp(text: str) -> list[TcpSocket]:
    """The sockets listed in /proc/net/tcp (or tcp6) text: ports, state code and inode."""
    sockets = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        sockets.append(TcpSocket(local_port=int(f[1].rsplit(":", 1)[1], 16),
                                 remote_port=int(f[2].rsplit(":", 1)[1], 16), state=f[3], inode=int(f[9])))
    return sockets


def tcp_sockets() -> list[TcpSocket]:
    return [s for name in ("tcp", "tcp6") for s in parse_proc_net_tcp(Path(f"/proc/net/{name}").read_text())]


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds open (from its /proc/<pid>/fd links `socket:[N]`)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


def close_wait_toward(pid: int, port: int) -> set[int]:
    """Local ports of the connections process `pid` holds to `port` that the peer has closed (CLOSE-WAIT)."""
    mine = socket_inodes(pid)
    return {s.local_port for s in tcp_sockets()
            if s.inode in mine and s.remote_port == port and s.state == TCP_CLOSE_WAIT}


def upstream_connections(port: int) -> int:
    """Connections the server on `port` still has open (its side ESTABLISHED)."""
    return sum(1 for s in tcp_sockets() if s.local_port == port and s.state == TCP_ESTABLISHED)


def standin_app() -> FastAPI:
    """An OpenAI-compatible upstream whose chat answers (streamed or not) end after 8 tokens, 20 ms apart
    from the request in all: the branches of one strategy request end together."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        n = int(body.get("max_tokens") or 8)
        words = [f" t{i}" for i in range(n - 1)] + [" \\boxed{2}"]
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        if not body.get("stream"):
            await asyncio.sleep(0.02)
            return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"], "usage": usage,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                                 "finish_reason": "stop"}]}

        async def chunks() -> AsyncIterator[str]:
            for i, w in enumerate(words):
                await asyncio.sleep(0.02 / n)
                last = i == len(words) - 1
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": "stop" if last
                                      else None}], **({"usage": usage} if last else {})}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


@contextlib.asynccontextmanager
async def standin_upstream() -> AsyncIterator[int]:
    """The stand-in under uvicorn on a free loopback port (this event loop), keep-alive 1 s; yields the port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(standin_app(), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off", timeout_keep_alive=UPSTREAM_KEEP_ALIVE_S))
    task = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started or task.done(), 20, "stand-in upstream started")
        assert not task.done(), f"stand-in upstream did not start: {task.exception()}"
        yield port
    finally:
        server.should_exit = True
        await task


@contextlib.contextmanager
def proxy_process(upstream_port: int) -> Iterator[tuple[subprocess.Popen, str]]:
    """`ttscale serve --upstream ...` in its own process: (process, base URL)."""
    port = free_port()
    proc = spawn_process_group(  # ends with this test process, even when it is killed
        [sys.executable, "-m", "ttscale.cli", "serve", "--upstream", f"http://127.0.0.1:{upstream_port}",
         "--port", str(port)], env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc, timeout_s=15)


async def until(pred, timeout_s: float, what: str) -> None:
    """Poll `pred` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.05)


async def proxy_ready(client: httpx.AsyncClient, url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"the proxy exited with {proc.returncode}"
        with contextlib.suppress(httpx.TransportError):
            if (await client.get(f"{url}/health")).status_code == 200:
                return
        assert time.monotonic() < deadline, "the proxy did not answer /health within 60 s"
        await asyncio.sleep(0.1)


# (model, streamed): strategy requests fan out through OpenAIBackend (httpx), the others pass through
# (aiohttp); `ffs` aborts its losing branches as soon as one finishes.
KINDS = ((f"ffs-8/{MODEL}", True), (f"self-consistency-4/{MODEL}", False), (MODEL, True), (MODEL, False))


async def complete(client: httpx.AsyncClient, url: str, model: str, stream: bool) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "1+1?"}], "max_tokens": 8, "stream": stream}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        text = (await resp.aread()).decode()
    assert resp.status_code == 200, text[:300]
    assert text.rstrip().endswith("data: [DONE]") if stream else json.loads(text)["choices"], text[-300:]


async def test_no_upstream_socket_left_in_close_wait_after_the_load():
    async with standin_upstream() as up_port, httpx.AsyncClient(timeout=60) as client:
        with proxy_process(up_port) as (proc, url):
            await proxy_ready(client, url, proc)
            queue = [KINDS[i % len(KINDS)] for i in range(REQUESTS)]

            async def worker() -> None:
                while queue:
                    await complete(client, url, *queue.pop())

            await asyncio.gather(*(worker() for _ in range(CLIENTS)))
            # The upstream's keep-alive expires: it closes its side of every connection the proxy holds.
            await until(lambda: upstream_connections(up_port) == 0, 20, "upstream closed its idle connections")
            stale = close_wait_toward(proc.pid, up_port)
            # Pools drop the connections the upstream closed when they are next used: one request of each kind.
            for model, stream in KINDS:
                await complete(client, url, model, stream)
            left = stale & close_wait_toward(proc.pid, up_port)
            assert not left, (f"the proxy still holds {len(left)} connection(s) to the upstream in CLOSE-WAIT "
                              f"(local ports {sorted(left)}) after its pools were used again: checked out, "
                              "never given back")

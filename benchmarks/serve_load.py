"""Load test of `ttscale serve` pass-through: 64 concurrent clients x 4 requests, proxy vs direct.

    python benchmarks/serve_load.py                       # starts a stand-in upstream and the proxy itself
    python benchmarks/serve_load.py --upstream http://127.0.0.1:8000 --model qwen   # a real server

Every request must be answered (HTTP 200 with one choice); the script exits 1 otherwise. It prints
p50/p99 latency of direct upstream calls and of the same calls through the proxy, measured in the same
run with the rounds interleaved (direct, proxy, direct, proxy, ...), and the proxy's own overhead
(p50 proxy - p50 direct), at full concurrency and with one client at a time, for each proxy worker
count in `--proxy-workers` (default 1 and 2). Target: <= 5 ms p50.

The stand-in upstream is a small uvicorn OpenAI-compatible server that answers after `--delay-ms`
(the model's time); it measures the proxy, not a model. The proxy is the real `ttscale serve` CLI
in its own process, so the numbers include its HTTP parsing, routing and upstream connection pool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- stand-in upstream


def standin_app(delay_s: float) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "standin", "object": "model", "owned_by": "bench"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        n = int(body.get("max_tokens") or 16)
        if body.get("stream"):
            async def gen():
                for i in range(n):
                    await asyncio.sleep(delay_s / n)
                    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")
        await asyncio.sleep(delay_s)
        return JSONResponse({
            "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(f"t{i}" for i in range(n))},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n},
        })

    return app


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """`--out` and the hidden `--_standin PORT DELAY_S` (the script re-runs itself as the stand-in upstream)."""
    ap.add_argument("--out", help="also write the report to this file")
    ap.add_argument("--_standin", nargs=2, metavar=("PORT", "DELAY_S"), help=argparse.SUPPRESS)


def run_standin_if_asked(args: argparse.Namespace, app_factory) -> bool:
    """Serve `app_factory(delay_s)` on the port `--_standin` names (blocking); False when not asked to."""
    if not args._standin:
        return False
    import uvicorn

    uvicorn.run(app_factory(float(args._standin[1])), host="127.0.0.1", port=int(args._standin[0]),
                log_level="warning", access_log=False)
    return True


def write_report(text: str, out: str | None) -> None:
    """Print the report, and write it to `out` too when given (its folder made if missing)."""
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")


def start(cmd: list[str]) -> subprocess.Popen:
    """A child in its own session; its stderr goes to a temporary file (a pipe nobody reads would fill up
    and block a process that logs every disconnect)."""
    with tempfile.TemporaryFile() as log:  # the child keeps its own descriptor of the file
        return subprocess.Popen(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=log)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ----------------------------------------------------------------------------- load


async def one_round(url: str, model: str, clients: int, per_client: int, stream: bool,
                    max_tokens: int) -> tuple[list[float], int]:
    """`clients` concurrent clients, each sending `per_client` requests in a row. Returns latencies, failures.

    The load generator is aiohttp (C parser, O(1) pool): an httpx client with 64 connections spent most
    of its time scanning its own pool, which inflated the direct and proxied latencies alike."""
    import aiohttp

    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}],
                       "max_tokens": max_tokens, "stream": stream}).encode()
    headers = {"Content-Type": "application/json"}
    lat: list[float] = []
    failures = 0
    conn = aiohttp.TCPConnector(limit=clients, limit_per_host=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def client() -> None:
            nonlocal failures
            for _ in range(per_client):
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as r:
                        if stream:
                            ok = False
                            async for line in r.content:
                                if line.strip() == b"data: [DONE]":
                                    ok = r.status == 200
                        else:
                            ok = r.status == 200 and len(json.loads(await r.read()).get("choices") or []) == 1
                except (TimeoutError, aiohttp.ClientError, ValueError):
                    ok = False
                lat.append(time.perf_counter() - t0)
                failures += not ok

        await asyncio.gather(*(client() for _ in range(clients)))
    return lat, failures


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (Linux /proc: `--workers` runs the proxy in
    child processes), to report the proxy's CPU per request."""
    total = 0.0
    try:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(entry) == pid or int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total
    except (OSError, IndexError, ValueError):
        return float("nan")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def measure(direct: str, proxy: str, model: str, clients: int, per_client: int, rounds: int,
                  stream: bool, max_tokens: int, proxy_pid: int) -> dict[str, dict[str, float]]:
    # Warm both paths (connection pools, the proxy's model list).
    await one_round(direct, model, 4, 2, stream, max_tokens)
    await one_round(proxy, model, 4, 2, stream, max_tokens)
    res: dict[str, list[float]] = {"direct": [], "proxy": []}
    fails = {"direct": 0, "proxy": 0}
    proxy_cpu = 0.0
    for _ in range(rounds):
        for name, url in (("direct", direct), ("proxy", proxy)):
            cpu0 = cpu_seconds(proxy_pid)
            lat, f = await one_round(url, model, clients, per_client, stream, max_tokens)
            if name == "proxy":
                proxy_cpu += cpu_seconds(proxy_pid) - cpu0
            res[name] += lat
            fails[name] += f
    want = rounds * clients * per_client
    out = {}
    for name, lat in res.items():
        out[name] = {"n": len(lat), "expected": want, "failed": fails[name],
                     "p50_ms": 1000 * pct(lat, 0.5), "p99_ms": 1000 * pct(lat, 0.99),
                     "mean_ms": 1000 * statistics.fmean(lat)}
    out["proxy"]["cpu_ms_per_request"] = 1000 * proxy_cpu / max(1, len(res["proxy"]))
    return out


def report(title: str, r: dict[str, dict[str, float]]) -> list[str]:
    lines = [title]
    for name in ("direct", "proxy"):
        x = r[name]
        lines.append(f"  {name:6s}  answered {x['n'] - x['failed']:4d}/{x['expected']:4d}  "
                     f"p50 {x['p50_ms']:8.2f} ms  p99 {x['p99_ms']:8.2f} ms  mean {x['mean_ms']:8.2f} ms")
    o50 = r["proxy"]["p50_ms"] - r["direct"]["p50_ms"]
    o99 = r["proxy"]["p99_ms"] - r["direct"]["p99_ms"]
    lines.append(f"  proxy overhead: p50 {o50:+.2f} ms  p99 {o99:+.2f} ms  "
                 f"(ratio p50 proxy/direct {r['proxy']['p50_ms'] / r['direct']['p50_ms']:.3f}); "
                 f"proxy CPU {r['proxy']['cpu_ms_per_request']:.2f} ms/request")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", help="a real OpenAI-compatible server (default: start a stand-in)")
    ap.add_argument("--model", default="standin", help="model name the upstream serves")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved direct/proxy rounds")
    ap.add_argument("--delay-ms", type=float, default=100.0, help="stand-in upstream's answer time")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--stream", action="store_true", help="also measure streamed requests")
    ap.add_argument("--proxy-workers", default="1,2",
                    help="`ttscale serve --workers` counts to measure, each against direct calls in its own run")
    add_common_args(ap)
    args = ap.parse_args()
    if run_standin_if_asked(args, standin_app):
        return

    procs: list[subprocess.Popen] = []
    try:
        if args.upstream:
            upstream = args.upstream.rstrip("/").removesuffix("/v1")
        else:
            port = free_port()
            upstream = f"http://127.0.0.1:{port}"
            procs.append(start([sys.executable, __file__, "--_standin", str(port), str(args.delay_ms / 1000)]))
            wait_http(f"{upstream}/v1/models", procs[-1])
        where = f"stand-in, answers after {args.delay_ms:.0f} ms" if not args.upstream else upstream
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        lines = [
            (f"ttscale serve pass-through load test  ({time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
             f"{os.cpu_count()} CPUs, python {sys.version.split()[0]})"),
            f"upstream: {where}; model {args.model}; {args.rounds} interleaved rounds per path",
            f"command: python {' '.join(sys.argv)}",
            f"load average before the run: {load} (other processes on this machine inflate the 64-client numbers)",
        ]
        modes = [False, True] if args.stream else [False]
        total_fail = 0
        for workers in [int(w) for w in args.proxy_workers.split(",")]:
            pport = free_port()
            proxy = f"http://127.0.0.1:{pport}"
            proc = start([sys.executable, "-m", "ttscale.cli", "serve", "--upstream", upstream, "--port", str(pport),
                          "--max-n", "64", "--workers", str(workers)])
            try:
                wait_http(f"{proxy}/health", proc)
                lines += ["", f"==== ttscale serve --workers {workers}"]
                for stream in modes:
                    kind = "streamed" if stream else "non-streamed"
                    for clients, per in ((args.clients, args.requests), (1, 16)):
                        r = asyncio.run(measure(f"{upstream}/v1/chat/completions", f"{proxy}/v1/chat/completions",
                                                args.model, clients, per, args.rounds, stream, args.max_tokens,
                                                proc.pid))
                        lines += report(f"{kind}, {clients} concurrent clients x {per} requests, "
                                        f"x{args.rounds} rounds:", r)
                        total_fail += sum(r[k]["failed"] + r[k]["expected"] - r[k]["n"] for k in r)
            finally:
                stop(proc)
        lines += ["", "every request answered: " + ("yes" if total_fail == 0 else f"NO ({total_fail} lost or failed)")]
        text = "\n".join(lines)
        write_report(text, args.out)
        if total_fail:
            sys.exit(1)
    finally:
        for p in reversed(procs):
            stop(p)


if __name__ == "__main__":
    main()

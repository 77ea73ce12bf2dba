"""Hogwild tokens/s driven three ways, as ratios to the standalone loop in the same run (issue 15):

- standalone: `HogwildRun.run()` on a cache of its own (the inner loop; the ceiling);
- engine loop: the same job stepped by `Engine.step()` (`add_native`) on the engine's cache, with a graph
  runner lent by the engine's pool, driven in this thread;
- Context: `ctx.run_native(job)` on an EngineBackend (the engine's own thread, Deltas to asyncio, one
  branch per worker), what the Hogwild strategy, `ttscale eval` and `ttscale serve` run.

Each is timed on a second (warm) run, after a first one paid compiles and graph captures.

    python benchmarks/native_engine_loop.py                 # H200 / any CUDA GPU (Qwen2.5-0.5B shape, bf16)
    python benchmarks/native_engine_loop.py --device cpu    # small config, runs anywhere
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.native_strategies import QWEN05, SMALL, build, hogwild_spec, sync


def _job(model, spec, step_every: int, cache=None, graphs=None, on_release=None):
    from ttscale.backends.engine.native import HogwildRun

    return HogwildRun(model, spec, is_boundary=lambda t: len(t) >= step_every, cache=cache, graphs=graphs,
                      on_release=on_release)


def standalone(model, spec, step_every: int) -> float:
    first = _job(model, spec, step_every)
    first.run()
    run = _job(model, spec, step_every, cache=first.cache, graphs=first.graphs)
    sync(model.cfg.device)
    t0 = time.perf_counter()
    out = run.run()
    sync(model.cfg.device)
    return out.generated / (time.perf_counter() - t0)


def engine_loop(engine, spec, step_every: int) -> float:
    rate = 0.0
    for _ in range(2):
        runner = engine.native_runners.take()
        got: list = []
        job = _job(engine.model, spec, step_every, cache=engine.cache, graphs=runner,
                   on_release=lambda r=runner: engine.native_runners.give_back(r))
        sync(engine.model.cfg.device)
        t0 = time.perf_counter()
        engine.add_native(f"bench-{time.monotonic_ns()}", job, got.append)
        while engine.has_work():
            engine.step()
        sync(engine.model.cfg.device)
        rate = sum(got[-1].generated) / (time.perf_counter() - t0)
    return rate


async def through_context(backend, spec, step_every: int) -> float:
    from ttscale.controller import Context

    rate = 0.0
    engine = backend.engine
    for _ in range(2):
        runner = engine.native_runners.take()
        job = _job(engine.model, spec, step_every, cache=engine.cache, graphs=runner,
                   on_release=lambda r=runner: engine.native_runners.give_back(r))
        ctx = Context(backend)
        t0 = time.perf_counter()
        done = await ctx.run_native(job).finished()
        rate = ctx.usage.generated_tokens / (time.perf_counter() - t0)
        assert done.finish == "done", done
        await ctx.aclose()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--step-every", type=int, default=32)
    a = ap.parse_args()
    from ttscale.backends.engine import EngineBackend
    from ttscale.backends.engine.engine import Engine

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    model = build(QWEN05 if cuda else SMALL, torch.bfloat16 if cuda else torch.float32, dev, parscale_n=0)
    if cuda:
        model.use_kernels(True)
    steps = a.steps or (256 if cuda else 48)

    class _Tok:  # what EngineBackend needs of a tokenizer here: the run's token ids are not text
        chat_template = None

        def decode(self, ids, skip_special_tokens=True):
            return ""

    engine = Engine(model, _Tok(), num_blocks=4096 if cuda else 512, fused_kernels=cuda)
    print(f"device={dev} steps={steps} prompt={a.prompt} step every {a.step_every} tokens")
    bare = Engine(model, None, num_blocks=4096 if cuda else 512, fused_kernels=cuda)
    for W in [int(x) for x in a.workers.split(",")]:
        spec = hogwild_spec(model, W, steps, a.prompt)
        ref = standalone(model, spec, a.step_every)
        loop = engine_loop(bare, spec, a.step_every)
        backend = EngineBackend(engine=engine)
        ctx = asyncio.run(through_context(backend, spec, a.step_every))
        print(f"  W={W}: standalone {ref:9.1f} tok/s | engine loop x{loop / ref:.2f} | "
              f"Context (engine thread) x{ctx / ref:.2f}")
    engine.close()
    bare.close()


if __name__ == "__main__":
    main()

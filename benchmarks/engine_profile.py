"""Where a decode step's time goes (CUDA): host-side phases and the GPU kernels of one step.

    python benchmarks/engine_profile.py --n 64
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from benchmarks.engine_throughput import build_hf
from ttscale.backends.engine import Engine, SamplingParams
from ttscale.backends.engine.loader import model_from_hf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="1,64")
    ap.add_argument("--prompt", type=int, default=1024)
    args = ap.parse_args()
    hf = build_hf("qwen0.5b", torch.bfloat16, "cuda")
    model = model_from_hf(hf, dtype=torch.bfloat16, device="cuda")
    del hf
    for n in [int(x) for x in args.n.split(",")]:
        eng = Engine(model, kv_memory_gb=4.0)
        prompt = list(range(100, 100 + args.prompt))
        for i in range(n):
            eng.add_request(f"r{i}", prompt, SamplingParams(temperature=1.0, max_tokens=200, seed=i,
                                                            ignore_eos=True, detokenize=False))
        while len(eng.running) < n or eng.waiting:
            eng.step()
        for _ in range(40):  # captures for the buckets met early
            eng.step()
        acc = defaultdict(float)

        def timed(name, fn):
            def wrap(*a, **k):
                torch.cuda.synchronize()
                t = time.perf_counter()
                r = fn(*a, **k)
                torch.cuda.synchronize()
                acc[name] += time.perf_counter() - t
                return r
            return wrap

        eng.model.build_meta = timed("build_meta", eng.model.build_meta)
        eng.graphs.run = timed("graph (copy+replay)", eng.graphs.run)
        eng._accept = timed("accept (sync+bookkeeping)", eng._accept)
        steps = 50
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        print(f"n={n}: {total / steps * 1e3:.3f} ms/step", flush=True)
        for k, v in acc.items():
            print(f"   {k:28s} {v / steps * 1e3:.3f} ms", flush=True)
        # kernels of one eager fused decode step
        items_meta = None
        from ttscale.backends.engine.model import ForwardItem

        del eng.model.build_meta
        reqs = [r for r in eng.running if r.pending is not None]
        items = [ForwardItem(r.seq.views, [r.pending]) for r in reqs]
        items_meta = eng.model.build_meta(eng.cache, items, pad=True)
        for r in reqs:
            r.seq.write.length -= 1
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eng.model.forward_meta(eng.cache, items_meta)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)
        eng.close()


if __name__ == "__main__":
    main()

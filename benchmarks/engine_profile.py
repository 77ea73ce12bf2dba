"""Where a decode step's time goes (CUDA): host-side phases and the GPU kernels of one step.

    python benchmarks/engine_profile.py --n 64
    python benchmarks/engine_profile.py --shape smollm2 --n 512 --prompt 128 --top-p 0.95 --temperature 0.6

Two kernel tables: the steps as the engine runs them (CUDA graphs, sampler included; CUPTI reports the
kernels inside a graph), then one eager forward for the launch count.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from benchmarks.engine_throughput import build_hf
from ttscale.backends.engine import Engine, SamplingParams
from ttscale.backends.engine.loader import model_from_hf


def tune(eng, meta) -> None:
    """Time each attention job class under launch configurations and key splits, 24 launches replayed as one
    CUDA graph (as the engine runs them: warm L2, no per-launch host cost), and the sampler."""
    import itertools
    import math

    import triton.testing

    from benchmarks.attn_sweep import graph_ms
    from ttscale.backends.engine import kernels as kn
    from ttscale.backends.engine.sampler import SamplingTensors, sample

    m, c, pool = eng.model, eng.model.cfg, eng.cache.pool
    H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
    G = H // Hkv
    N = meta.tokens.shape[0]
    q = torch.randn(N, H, D, device="cuda", dtype=c.dtype)
    layers = len(pool.k)
    for ci, cm in enumerate(meta.classes):
        base = kn.attn_split(cm, G, Hkv, pool.block_size)
        res = []
        for split in (1, 2, 4, 8, 16, 32):
            out = torch.zeros(N + 1, meta.vmax * split, H, D, device="cuda")
            lse = torch.zeros(N + 1, meta.vmax * split, H, device="cuda")
            for cfg in [None, *itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3))]:
                opts = {} if cfg is None else dict(zip(("block_n", "num_warps", "num_stages"), cfg, strict=True))

                def f(cm=cm, out=out, lse=lse, split=split, opts=opts):
                    for li in range(layers):
                        kn.seg_attn(q, pool.k[li], pool.v[li], cm, m.inv_freq, out, lse, N, meta.vmax,
                                    1 / math.sqrt(D), 1.0, G, split, split, **opts)
                try:
                    us = graph_ms(f) * 1e3 / layers
                except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
                    print(f"   split={split} {cfg} failed: {e!r:.80}")
                    continue
                res.append((us, split, cfg or "engine's"))
        print(f"class {ci} shape {tuple(cm.qidx.shape)} blocks {cm.blocks.shape[1]} engine's split {base}:",
              flush=True)
        for r in sorted(res)[:8]:
            print(f"   {r[0]:7.2f} us/launch  split={r[1]} (block_n, warps, stages)={r[2]}", flush=True)
        for r in res:
            if r[1] == base and isinstance(r[2], str):
                print(f"   engine's choice (split {base}, its launch config): {r[0]:.2f} us/launch", flush=True)
    logits = torch.randn(N, c.vocab_size, device="cuda")
    st = SamplingTensors.build([(1.0, 1.0, 0, i, 5) for i in range(N)], N, "cuda")
    print(f"sample(): {triton.testing.do_bench(lambda: sample(logits, st, False, 0)) * 1e3:.1f} us", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="1,64")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--tune", action="store_true", help="time attention launch configurations")
    ap.add_argument("--shape", default="qwen0.5b", choices=["qwen0.5b", "smollm2"])
    ap.add_argument("--top-p", type=float, default=1.0, help="real evals use 0.95 (the filtered sampler)")
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args()
    hf = build_hf(args.shape, torch.bfloat16, "cuda")
    model = model_from_hf(hf, dtype=torch.bfloat16, device="cuda")
    del hf
    for n in [int(x) for x in args.n.split(",")]:
        eng = Engine(model, kv_memory_gb=4.0 if n <= 64 else 24.0, max_running=max(256, n))
        prompt = list(range(100, 100 + args.prompt))
        for i in range(n):
            sp = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=200, seed=i,
                                ignore_eos=True, detokenize=False)
            eng.add_request(f"r{i}", prompt, sp)
        while len(eng.running) < n or eng.waiting:
            eng.step()
        for _ in range(70):  # past the 64-token bucket boundary: no capture inside the timed steps
            eng.step()
        acc = defaultdict(float)

        def timed(name, fn, acc=acc):
            def wrap(*a, **kw):
                torch.cuda.synchronize()
                t = time.perf_counter()
                r = fn(*a, **kw)
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
        for obj in (eng.model, eng.graphs, eng):  # the timing wrappers off again
            for name in ("build_meta", "run", "_accept"):
                vars(obj).pop(name, None)
        prof_steps = 5
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(prof_steps):
                eng.step()
            torch.cuda.synchronize()
        print(f"kernels of {prof_steps} engine steps (graphs + sampler), n={n}:", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16), flush=True)
        from ttscale.backends.engine.model import ForwardItem

        # kernels of one eager fused decode step (a bare `inference_mode().__enter__()` on a temporary did
        # not hold: the metadata upload failed on the engine's inference buffers)
        with torch.inference_mode():
            eng._drain()  # read the step in flight: every running request's next token is on the host
            reqs = [r for r in eng.running if r.pending is not None]
            items = [ForwardItem(r.seq.views, [r.pending]) for r in reqs]
            items_meta = eng.model.build_meta(eng.cache, items, pad=True)
            for r in reqs:
                r.seq.write.length -= 1
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                eng.model.forward_meta(eng.cache, items_meta)
                torch.cuda.synchronize()
            print("kernels of one eager forward:", flush=True)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)
            if args.tune:
                tune(eng, items_meta)
        eng.close()


if __name__ == "__main__":
    main()

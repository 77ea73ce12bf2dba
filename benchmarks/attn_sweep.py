"""Launch-config sweep of the segment-attention kernel on real Hogwild metadata (CUDA).

Runs Hogwild decodes with W=1 and W=4 workers (random-weight Qwen2.5-0.5B shape, eager steps), keeps the
metadata of a late step (many finished steps in the common block), and times `seg_attn`, then the merge,
over 24 layers replayed as one CUDA graph, for each launch config and key split. The defaults in
`kernels.seg_attn` come from this sweep.

    python benchmarks/attn_sweep.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.native_strategies import QWEN05, build, hogwild_spec
from ttscale.backends.engine import kernels as kn
from ttscale.backends.engine.native import HogwildRun

CONFIGS = {
    "default": {},
    "bn64 w4 s3": {"block_n": 64, "num_warps": 4, "num_stages": 3},
    "bn64 w8 s2": {"block_n": 64, "num_warps": 8, "num_stages": 2},
    "bn128 w8 s1": {"block_n": 128, "num_warps": 8, "num_stages": 1},
    "bn128 w8 s2": {"block_n": 128, "num_warps": 8, "num_stages": 2},
}
LAYERS = 24


def late_step_meta(model, W: int, steps: int = 256, prompt: int = 128):
    """The metadata of the second-to-last step of an eager Hogwild run, and the run's cache (kept alive)."""
    seen = []
    build_meta = model.build_meta

    def record(cache, items, pad=False):
        seen.append(build_meta(cache, items, pad))
        return seen[-1]

    model.build_meta = record
    try:
        run = HogwildRun(model, hogwild_spec(model, W, steps, prompt), is_boundary=lambda t: len(t) >= 32,
                         cuda_graphs=False)
        run._run()  # not run(): its segments stay allocated for the timing
    finally:
        model.build_meta = build_meta
    return seen[-2], run.cache


def graph_ms(fn, reps: int = 50) -> float:
    """Milliseconds per replay of `fn` captured as one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        g.replay()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / reps


def sweep(model, W: int) -> None:
    c = model.cfg
    H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
    G = H // Hkv
    meta, cache = late_step_meta(model, W)
    pool = cache.pool
    N, V = meta.tokens.shape[0], meta.vmax
    print(f"W={W}: rows={N} view slots={V} job classes=" + ", ".join(
        f"{tuple(cm.qidx.shape)} x {cm.blocks.shape[1]} blocks" for cm in meta.classes), flush=True)
    q = torch.randn(N, H, D, device="cuda", dtype=c.dtype)
    attn = torch.empty(N, H * D, device="cuda", dtype=c.dtype)
    for split_mode in ("auto", 2):
        splits = [kn.attn_split(cm, G, Hkv, pool.block_size) if split_mode == "auto" else split_mode
                  for cm in meta.classes]
        smax = max(splits)
        out = torch.zeros(N + 1, V * smax, H, D, dtype=torch.float32, device="cuda")
        lse = torch.full((N + 1, V * smax, H), -1e30, dtype=torch.float32, device="cuda")
        for name, cfg in CONFIGS.items():
            def attend(cfg=cfg, splits=splits, smax=smax, out=out, lse=lse):
                for li in range(LAYERS):
                    for cm, sp in zip(meta.classes, splits, strict=True):
                        kn.seg_attn(q, pool.k[li], pool.v[li], cm, model.inv_freq, out, lse, N, V,
                                    1 / math.sqrt(D), c.rope_scale, G, sp, smax, **cfg)

            def attend_merge(attend=attend, smax=smax, out=out, lse=lse):
                attend()
                for _ in range(LAYERS):
                    kn.merge(out, lse, attn, V * smax)

            ta, tm = graph_ms(attend), graph_ms(attend_merge)
            print(f"  split={split_mode}{splits} {name:12s}: seg_attn {1000 * ta / LAYERS:6.2f} us/layer, "
                  f"merge {1000 * (tm - ta) / LAYERS:5.2f} us/layer", flush=True)
        for block_v in (16, 32, 64, 128):
            def merge_only(block_v=block_v, smax=smax, out=out, lse=lse):
                for _ in range(LAYERS):
                    kn.merge(out, lse, attn, V * smax, block_v=block_v)

            print(f"  split={split_mode}{splits} merge reading up to {block_v:3d} slots per pass: "
                  f"{1000 * graph_ms(merge_only) / LAYERS:5.2f} us/layer", flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("attn_sweep times Triton kernels: it needs a CUDA GPU")
    model = build(QWEN05, torch.bfloat16, torch.device("cuda"), parscale_n=0)
    model.use_kernels(True)
    for W in (1, 4):
        sweep(model, W)


if __name__ == "__main__":
    main()

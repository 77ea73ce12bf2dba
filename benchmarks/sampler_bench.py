"""Time `sampler.sample` against the previous implementation (sort-based top-p/top-k, torch passes).

On CUDA: the fused Triton sampler vs the previous torch path, both eager and replayed from a CUDA graph
(the engine captures sampling inside its step graph), for the engine's shapes; each line also says how
many rows drew the same token as the torch reference (`sample_torch`, same semantics). On CPU: the
current torch path (top-k head, full sort only where the nucleus is wider) vs the previous one, small
shapes.

    python benchmarks/sampler_bench.py                    # CUDA if present, else CPU
    python benchmarks/sampler_bench.py --dist flat        # near-uniform rows (random-weight models)
    python benchmarks/sampler_bench.py --variants         # the fused sampler's bracketing settings, A/B

`--variants` times the fused top-p draw (in a CUDA graph) under several settings of `sample_kernels`
(tile layout, thresholds and passes, logits read at once per program), flat and peaked rows, one run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from ttscale.backends.engine.sampler import CHUNK, SamplingTensors, inverse_cdf, sample, sample_torch, uniform

GPU_SHAPES = [(1, 151936), (64, 151936), (512, 49152), (512, 151936)]
VARIANTS = {  # sample_kernels settings, A/B against the default
    "default: K-major tile, 8 thresholds x 4 passes": {},
    "thresholds-major tile, 16 x 3 (before)": {"LEVEL_KMAJOR": False, "K": 16, "LEVELS": 3},
    "K-major tile, 16 thresholds x 3 passes": {"K": 16, "LEVELS": 3},
    "K-major tile, 4 thresholds x 6 passes": {"K": 4, "LEVELS": 6},
    "K-major tile, 8 x 4, 8 warps": {"LEVEL_WARPS": 8},
}
CPU_SHAPES = [(1, 49152), (8, 49152), (64, 8192)]
MODES = {  # (temperature, top_p, top_k)
    "unfiltered": (1.0, 1.0, 0),
    "top_p": (0.6, 0.95, 0),
    "top_p+top_k": (0.6, 0.95, 50),
}


# ---- the previous implementation (frozen copy), for the comparison ----
def _old_cumsum_rows(x: torch.Tensor) -> torch.Tensor:
    B, V = x.shape
    if x.is_cuda:
        try:
            from ttscale.backends.engine.kernels import cumsum_rows

            return cumsum_rows(x, CHUNK)
        except ImportError:
            pass
    C = -(-V // CHUNK)
    inner = torch.nn.functional.pad(x, (0, C * CHUNK - V)).view(B, C, CHUNK).cumsum(-1)
    tails = inner[:, :, -1]
    return (inner + (tails.cumsum(-1) - tails)[:, :, None]).view(B, C * CHUNK)


def _old_sort_rows(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, V = probs.shape
    if not (probs.is_cuda and 1 < B <= 16):
        return probs.sort(-1, descending=True)
    bits = probs.contiguous().view(torch.int32) >> 3
    rows = torch.arange(B - 1, -1, -1, device=probs.device, dtype=torch.int32)[:, None] << 27
    _, flat = (bits | rows).view(-1).sort(descending=True, stable=True)
    si = flat.view(B, V) - torch.arange(B, device=probs.device)[:, None] * V
    return probs.view(-1)[flat].view(B, V), si


def _old_nucleus_pick(sp, cum, top_p, top_k, u):
    V = sp.shape[-1]
    n = torch.searchsorted(cum, top_p.to(cum.dtype)[:, None].contiguous())
    last = (sp > 0).sum(-1, keepdim=True) - 1
    n = torch.minimum(n, torch.where(top_k > 0, top_k - 1, V - 1)[:, None]).clamp_max(V - 1)
    n = torch.minimum(n, last.clamp_min(0))
    x = (u.to(cum.dtype)[:, None] * cum.gather(-1, n)).contiguous()
    return torch.minimum(torch.searchsorted(cum, x, right=True), n).squeeze(-1)


def _old_filtered_pick(probs, st, u):
    V = probs.shape[-1]
    if probs.device.type == "cpu" and V > 64:
        tv, ti = probs.topk(64, -1)
        cum = tv.cumsum(-1)
        inside = (cum[:, -1] >= st.top_p.to(cum.dtype)) | ((st.top_k > 0) & (st.top_k <= 64))
        out = ti.gather(-1, _old_nucleus_pick(tv, cum, st.top_p, st.top_k, u)[:, None]).squeeze(-1)
        if bool(inside.all()):
            return out
        rest = (~inside).nonzero().squeeze(-1)
        sp, si = _old_sort_rows(probs[rest])
        pick = _old_nucleus_pick(sp, _old_cumsum_rows(sp), st.top_p[rest], st.top_k[rest], u[rest])
        out[rest] = si.gather(-1, pick[:, None]).squeeze(-1)
        return out
    sp, si = _old_sort_rows(probs)
    pick = _old_nucleus_pick(sp, _old_cumsum_rows(sp), st.top_p, st.top_k, u)
    return si.gather(-1, pick[:, None]).squeeze(-1)


def sample_previous(logits: torch.Tensor, st: SamplingTensors, filtered: bool, n_top: int):
    """`sample` as it was before the fused sampler (sort-based filtering)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, -1, keepdim=True)
    greedy_tok = logits.argmax(-1)
    probs = torch.softmax(logits / st.temperature.clamp_min(1e-5)[:, None], -1)
    u = uniform(st.seeds, st.steps)
    sampled = _old_filtered_pick(probs, st, u) if filtered else inverse_cdf(probs, u)
    tok = torch.where(st.temperature > 0, sampled, greedy_tok)
    return tok, (logits.gather(-1, tok[:, None]) - lse).squeeze(-1), None, None


# ---- timing ----
def make_logits(b: int, v: int, dist: str, dev: str) -> torch.Tensor:
    """`peaked`: a heavy head over a long tail (like a trained model); `flat`: near-uniform rows (random
    weights), where the top-p nucleus is most of the vocabulary."""
    g = torch.Generator().manual_seed(0)
    if dist == "flat":
        x = torch.randn(b, v, generator=g) * 0.3
    else:
        x = torch.randn(b, v, generator=g) * 2.0
        x[:, : max(1, v // 500)] += 8.0 * torch.rand(b, max(1, v // 500), generator=g)
        x = x[:, torch.randperm(v, generator=g)]
    return x.to(dev)


def time_us(fn: Callable[[], object], dev: str, graph: bool, reps: int) -> float:
    if dev != "cuda":
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e6
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def time_variants(dev: str, reps: int) -> None:
    from ttscale.backends.engine import sample_kernels

    default = {k: getattr(sample_kernels, k)
               for k in ("LEVELS", "LEVEL_SUB", "LEVEL_WARPS", "SETTLE_AT", "LEVEL_KMAJOR", "K")}
    print("fused top_p 0.95 (T 0.6) draw in a CUDA graph, us per call; tokens equal to the torch path's")
    for dist in ("flat", "peaked"):
        for b, v in GPU_SHAPES:
            logits = make_logits(b, v, dist, dev)
            st = SamplingTensors.build([(0.6, 0.95, 0, 1234 + i, 7) for i in range(b)], b, dev)
            ref = sample_torch(logits, st, True, 0)[0]
            for name, over in VARIANTS.items():
                for k, val in {**default, **over}.items():
                    setattr(sample_kernels, k, val)
                same = int((sample(logits, st, True, 0)[0] == ref).sum())
                us = time_us(lambda x=logits, st=st: sample(x, st, True, 0), dev, True, reps)
                print(f"{dist:<6} {b:>4} x {v:>6}  {name:<44} {us:>9.1f}  {same}/{b}", flush=True)
    for k, val in default.items():
        setattr(sample_kernels, k, val)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dist", choices=["peaked", "flat"], default="peaked")
    ap.add_argument("--reps", type=int, default=0, help="calls per timing (default: 200 CUDA, 5 CPU)")
    ap.add_argument("--variants", action="store_true", help="A/B the fused sampler's settings (CUDA)")
    args = ap.parse_args()
    dev = args.device
    reps = args.reps or (200 if dev == "cuda" else 5)
    if args.variants:
        if dev != "cuda":
            raise SystemExit("--variants times the fused Triton sampler: it needs a CUDA GPU")
        time_variants(dev, reps)
        return
    shapes = GPU_SHAPES if dev == "cuda" else CPU_SHAPES
    new_name = "fused" if dev == "cuda" else "torch"
    print(f"device={dev} dist={args.dist} reps={reps}  (us per sample() call; ratio = previous / new)")
    head = f"{'B':>4} {'V':>7} {'mode':<12} {'graph':<5} {'previous':>10} {new_name:>10} {'ratio':>7}"
    print(head + ("  same tokens as torch path" if dev == "cuda" else ""))
    for b, v in shapes:
        logits = make_logits(b, v, args.dist, dev)
        for mode, (t, p, k) in MODES.items():
            st = SamplingTensors.build([(t, p, k, 1234 + i, 7) for i in range(b)], b, dev)
            filtered = p < 1 or k > 0
            check = ""
            if dev == "cuda":
                same = (sample(logits, st, filtered, 0)[0] == sample_torch(logits, st, filtered, 0)[0]).sum()
                check = f"  {int(same)}/{b}"
            for graph in ((False, True) if dev == "cuda" else (False,)):
                old = time_us(lambda x=logits, st=st, f=filtered: sample_previous(x, st, f, 0), dev, graph, reps)
                new = time_us(lambda x=logits, st=st, f=filtered: sample(x, st, f, 0), dev, graph, reps)
                print(f"{b:>4} {v:>7} {mode:<12} {str(graph):<5} {old:>10.1f} {new:>10.1f} {old / new:>7.2f}{check}")


if __name__ == "__main__":
    main()

"""Few-row projections: cuBLAS (`F.linear`, plus the SiLU*up kernel after the gate/up projection) against
`linear_kernels.linear` under launch configurations, for the four projections of a decoder layer (CUDA).

The engine takes the few-row kernel for the QKV, output and gate/up projections and keeps cuBLAS for the
down projection (split-K there beats one pass over 4,864-long rows). Each figure is one launch's share of
24 launches on 24 distinct weights (a layer stack: nothing stays in L2) replayed as one CUDA graph, as the
engine runs them.

    python benchmarks/skinny_linear.py [--shape qwen0.5b|smollm2] [--rows 1,8,64]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attn_sweep import graph_ms
from ttscale.backends.engine import kernels as kn
from ttscale.backends.engine import linear_kernels as lk

SHAPES = {  # (hidden, heads, kv heads, head dim, intermediate)
    "qwen0.5b": (896, 14, 2, 64, 4864),
    "smollm2": (576, 9, 3, 64, 1536),
}
LAYERS = 24


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen0.5b", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--sweep", action="store_true", help="time every launch configuration, not the default")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("skinny_linear times CUDA kernels: it needs a CUDA GPU")
    d, h, hkv, hd, inter = SHAPES[args.shape]
    dev, dt = torch.device("cuda"), torch.bfloat16
    projections = {  # name: (out features, in features, bias, gated)
        "qkv": ((h + 2 * hkv) * hd, d, True, False),
        "o": (d, h * hd, False, False),
        "gate_up+silu": (inter, d, False, True),
        "down": (d, inter, False, False),
    }
    print(f"{args.shape} shape, bfloat16, {torch.cuda.get_device_name()}; us per launch (24 weights, one graph)")
    total = {}
    for M in [int(r) for r in args.rows.split(",")]:
        for name, (n, k, bias, gated) in projections.items():
            ws = [torch.randn(2 * n if gated else n, k, device=dev, dtype=dt) / k ** 0.5 for _ in range(LAYERS)]
            b = torch.randn(n, device=dev, dtype=dt) if bias else None
            x = torch.randn(M, k, device=dev, dtype=dt)

            def cublas(ws=ws, b=b, x=x, gated=gated):
                for w in ws:
                    y = F.linear(x, w, b)
                    if gated:
                        kn.silu_mul(y)

            base = graph_ms(cublas) * 1e3 / LAYERS
            ref = F.linear(x, ws[0], b)
            if gated:
                ref = kn.silu_mul(ref)
            err = (lk.linear(x, ws[0], b, gated=gated).float() - ref.float()).abs().max().item()
            configs = [None]
            if args.sweep:
                configs += list(itertools.product((16, 32, 64), (128, 256), (4, 8), (4,)))
            res = []
            for cfg in configs:
                config = None if cfg is None else (16 if M <= 16 else (32 if M <= 32 else 64), *cfg[:3])
                stages = 4 if cfg is None else cfg[3]

                def ours(ws=ws, b=b, x=x, gated=gated, config=config, stages=stages):
                    for w in ws:
                        lk.linear(x, w, b, gated=gated, config=config, num_stages=stages)
                try:
                    res.append((graph_ms(ours) * 1e3 / LAYERS, cfg or "default"))
                except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
                    print(f"   {cfg} failed: {e!r:.80}")
            res.sort(key=lambda r: r[0])
            dflt = next(r[0] for r in res if r[1] == "default")
            engine = base if name == "down" else dflt  # the engine keeps cuBLAS for the down projection
            b0, e0 = total.get(M, (0.0, 0.0))
            total[M] = (b0 + base, e0 + engine)
            print(f"M={M:3d} {name:13s} cuBLAS {base:6.2f} | ours default {dflt:6.2f} ({base / dflt:4.2f}x) | best "
                  f"{res[0][0]:6.2f} {res[0][1]} | max err {err:.3g}", flush=True)
            for r in res[1:4] if args.sweep else []:
                print(f"      {r[0]:6.2f} {r[1]}", flush=True)
    for M, (b, e) in total.items():
        print(f"M={M:3d} layer total: cuBLAS {b:6.2f} us, as the engine runs them {e:6.2f} us ({b / e:4.2f}x); "
              f"x24 layers: {24 * (e - b):+.0f} us per step")

if __name__ == "__main__":
    main()

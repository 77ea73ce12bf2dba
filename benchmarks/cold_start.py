"""First call on a cold process: tokens/s over its first `--window` seconds against the warm rate.

Each measured process is fresh (a subprocess): it loads the model, builds `Pipeline(EngineBackend,
"self-consistency:n=N")` and runs it over `--problems` questions (the cold call), then runs the same
pipeline again with another seed (the warm call). A thread samples the engine's generated-token count
every 0.25 s, so the cold call's tokens over its first `--window` seconds (from the call, i.e. after the
model is loaded) are known exactly; the ratio printed is that rate over the warm call's rate.

    python benchmarks/cold_start.py --model random:smollm2 --tokenizer TOKENIZER_DIR
    python benchmarks/cold_start.py --model smollm2 --triton-cache keep

`--triton-cache fresh` (default) gives the child an empty Triton kernel cache, as on a machine that never
ran the engine; `keep` uses the user's cache (~/.triton), as on every later process of that machine.
`--model`: as `benchmarks/e2e_throughput.py` (embedded SmolLM2, random shapes, a folder / .gguf).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` when run as a script


def child(args: argparse.Namespace) -> None:
    t_proc = time.perf_counter()
    import torch

    from benchmarks.e2e_throughput import make_problems
    from ttscale.backends.engine.backend import EngineBackend, EngineConfig
    from ttscale.pipeline import Pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = EngineBackend(EngineConfig(model=args.folder, device=device, kv_memory_gb=args.kv_memory_gb))
    problems = make_problems(args.problems)
    sc = f"self-consistency:n={args.n},max_tokens={args.max_tokens}"

    async def main() -> dict:
        await backend.start()
        t_loaded = time.perf_counter() - t_proc
        eng = backend.engine
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def generated() -> int:
            return eng.stats["decode_tokens"]

        def sample(t0: float) -> None:
            while not stop.is_set():
                samples.append((time.perf_counter() - t0, generated()))
                stop.wait(0.25)

        out = {"load_s": t_loaded, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "kernel_compiles": eng.kernel_compiles}
        for label, seed in (("cold", 0), ("warm", 1)):
            samples.clear()
            stop.clear()
            c0 = eng.graphs.captures if eng.graphs else 0
            base = generated()
            t0 = time.perf_counter()
            th = threading.Thread(target=sample, args=(t0,), daemon=True)
            th.start()
            results = await Pipeline(backend, sc, concurrency=args.problems, seed=seed).run(problems)
            wall = time.perf_counter() - t0
            stop.set()
            th.join()
            toks = sum(r.usage.generated_tokens for r in results)
            in_window = max((n for t, n in samples if t <= args.window), default=base) - base
            out[label] = {"tokens": toks, "wall": wall, "rate": toks / wall,
                          "window_tokens": in_window if wall > args.window else toks,
                          "captures": (eng.graphs.captures if eng.graphs else 0) - c0,
                          "curve": [(round(t, 2), n - base) for t, n in samples[::4]]}
        await backend.close()
        return out

    print("RESULT " + json.dumps(asyncio.run(main())), flush=True)


def _compiles(info: dict | None) -> str:
    if info is None:
        return "not compiled ahead (TTSCALE_PRECOMPILE=0 or no CUDA)"
    if "error" in info:
        return f"compiling ahead failed ({info['error']}); compiled at first use"
    return (f"{info['kernels']} specialisations ({info['failed']} failed) on {info['threads']} threads in "
            f"{info['seconds']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--kv-memory-gb", type=float, default=None, help="KV pool (default: the engine's)")
    ap.add_argument("--triton-cache", choices=["fresh", "keep"], default="fresh")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    import torch

    from benchmarks.e2e_throughput import resolve_model

    work = Path(tempfile.mkdtemp(prefix="ttscale-cold-"))
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    folder, label = resolve_model(args.model, dtype, args.tokenizer, work)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    if args.triton_cache == "fresh":
        env["TRITON_CACHE_DIR"] = str(work / "triton-cache")
    cmd = [sys.executable, __file__, "--child", "--folder", folder, "--problems", str(args.problems), "--n",
           str(args.n), "--max-tokens", str(args.max_tokens), "--window", str(args.window)]
    if args.kv_memory_gb is not None:
        cmd += ["--kv-memory-gb", str(args.kv_memory_gb)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    cold, warm = res["cold"], res["warm"]
    w = min(args.window, cold["wall"])
    ratio = cold["window_tokens"] / w / warm["rate"]
    lines = [
        f"{label} on {res['device']}; Pipeline self-consistency n={args.n}, {args.problems} problems, "
        f"max {args.max_tokens} new tokens; Triton cache: {args.triton_cache}; "
        f"process {time.perf_counter() - t0:.1f} s",
        f"model load + engine start: {res['load_s']:.1f} s (before the call); Triton kernels before the first "
        f"step: {_compiles(res['kernel_compiles'])}",
        f"cold call: {cold['tokens']} tokens in {cold['wall']:.1f} s ({cold['rate']:.0f} tok/s), "
        f"{cold['captures']} graph captures; first {w:.0f} s: {cold['window_tokens']} tokens",
        f"warm call: {warm['tokens']} tokens in {warm['wall']:.1f} s ({warm['rate']:.0f} tok/s), "
        f"{warm['captures']} graph captures",
        f"first {w:.0f} s of the cold call at {ratio:.2f}x the warm rate (target >= 0.50)",
        "cold call, tokens by time: " + ", ".join(f"{t:.0f}s:{n}" for t, n in cold["curve"][::2]),
    ]
    if args.triton_cache == "fresh":
        kernels = sorted({p.stem for p in (work / "triton-cache").rglob("*.cubin")})
        lines.append(f"Triton kernels compiled by the process: {len(list((work / 'triton-cache').rglob('*.cubin')))} "
                     f"({', '.join(kernels)})")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("$ python " + " ".join(sys.argv) + "\n" + "\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()

"""Long reasoning on the engine: n branches x `--new` tokens after one `--prompt`-token prompt.

What a long-chain-of-thought eval does to the engine: the KV cache grows to prompt + n x new tokens, the
decode step reads ever longer contexts, and the scheduler must neither run out of blocks nor preempt in a
loop. Prints tokens/s, ms per decode step early and late in the run, peak KV blocks against the pool,
preemptions and the longest step, with the user's sampling (temperature 0.6, top_p 0.95, detokenised when a
tokenizer is given; EOS ignored so every branch makes `--new` tokens).

    python benchmarks/long_reasoning.py --device cuda  # random Qwen2.5-0.5B shape, 32 x 4096 after 2048
    python benchmarks/long_reasoning.py --device cpu --n 4 --prompt 256 --new 128 --model random:tiny
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.e2e_throughput import SHAPES
from benchmarks.serve_load import write_report


def build(model: str, device: str, dtype):
    """The engine's model: a random shape from `SHAPES` or a local folder / .gguf."""
    from ttscale.backends.engine.loader import load_model, model_from_hf

    if model.startswith("random:"):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        arch, cfg = SHAPES[model.split(":", 1)[1]]
        hf_cfg = AutoConfig.for_model(arch, **cfg)
        torch.manual_seed(0)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
        return model_from_hf(hf.eval(), dtype=dtype, device=device)
    return load_model(model, dtype=dtype, device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="random:qwen2.5-0.5b", help="random:SHAPE or a model folder / .gguf")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder: detokenise like a user run")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=4096)
    ap.add_argument("--kv-memory-gb", type=float, default=None, help="KV pool size (engine default if unset)")
    ap.add_argument("--out", default=None, help="also write the report to this file")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from ttscale.backends.engine import Engine, SamplingParams

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build(args.model, args.device, dtype)
    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    eng = Engine(model, tokenizer=tok, kv_memory_gb=args.kv_memory_gb)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, min(model.cfg.vocab_size, 30000), (args.prompt,), generator=g).tolist()

    def run(p: list[int], new: int) -> dict:
        made = [0]
        ends: dict[str, int] = {}

        def count(out) -> None:
            made[0] += len(out.token_ids)
            if out.finished:
                ends[out.finish_reason] = ends.get(out.finish_reason, 0) + 1

        for i in range(args.n):
            sp = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=new, seed=i, ignore_eos=True,
                                detokenize=tok is not None)
            eng.add_request(f"long-{i}-{time.time_ns()}", p, sp, count)
        steps: list[tuple[float, int]] = []  # (seconds, decode tokens) per step
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        while eng.has_work():
            s0 = time.perf_counter()
            before = eng.stats["decode_tokens"]
            eng.step()
            steps.append((time.perf_counter() - s0, eng.stats["decode_tokens"] - before))
        if args.device == "cuda":
            torch.cuda.synchronize()
        return {"wall": time.perf_counter() - t0, "made": made[0], "steps": steps, "ends": ends}

    with torch.inference_mode():
        t = time.perf_counter()
        run([(x + 7) % 30000 + 100 for x in prompt[:256]], 32)  # warm-up: kernels, graphs for the n bucket
        warm = time.perf_counter() - t
        eng.prefix.clear()
        eng.stats.update(peak_blocks=0, preemptions=0, prefills_released=0)
        r = run(prompt, args.new)
    decode = [s for s, k in r["steps"] if k == args.n]
    tenth = max(1, len(decode) // 10)
    early = sum(decode[:tenth]) / tenth * 1e3
    late = sum(decode[-tenth:]) / tenth * 1e3
    pool = eng.cache.pool.num_blocks
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    lines = [
        f"$ python benchmarks/long_reasoning.py {' '.join(sys.argv[1:])}",
        (f"{args.model} {str(dtype).removeprefix('torch.')} on {args.device} ({dev}, torch {torch.__version__}); "
        f"{args.n} branches x {args.new} new tokens after a {args.prompt}-token prompt, temperature 0.6, "
        f"top_p 0.95, detokenised: {tok is not None}"),
        f"generated tokens      {r['made']}  (expected {args.n * args.new})",
        f"wall                  {r['wall']:.1f} s  ({r['made'] / r['wall']:.0f} tok/s incl. prefill)",
        (f"ms per decode step    first 10%: {early:.2f}  last 10%: {late:.2f}  longest step: "
        f"{max(s for s, _ in r['steps']) * 1e3:.1f} ms"),
        (f"peak KV blocks        {eng.stats['peak_blocks']} of {pool} ({eng.stats['peak_blocks'] / pool:.0%} of the "
        f"pool; block {eng.cache.block_size} tokens)"),
        (f"preemptions           {eng.stats['preemptions']} (and {eng.stats['prefills_released']} partial "
         "prefills given back first)"),
        f"branches ended by     {', '.join(f'{k} {v}' for k, v in sorted(r['ends'].items()))}",
        f"warm-up               {warm:.1f} s (kernels and graphs before the measured run)",
    ]
    if args.device == "cuda":
        lines.append(f"peak CUDA memory      {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    ok = r["made"] == args.n * args.new
    lines.append("result                " + ("complete" if ok else "INCOMPLETE"))
    write_report("\n".join(lines), args.out)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

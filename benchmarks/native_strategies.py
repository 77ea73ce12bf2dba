"""Hogwild tokens/s for W workers and ParScale ms/token for P streams, each against W=1 / P=1 in the
same run, on a random-weight model (default: the Qwen2.5-0.5B shape, bf16, CUDA).

Targets (issue 5): W workers deliver >= 0.9*W x the single-worker token rate; P=8 costs <= 1.5x the
per-token latency of P=1.

    python benchmarks/native_strategies.py                 # H200 / any CUDA GPU
    python benchmarks/native_strategies.py --device cpu    # small config, runs anywhere
"""

from __future__ import annotations

import argparse
import time

import torch

QWEN05 = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
          "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True,
          "max_position_embeddings": 32768}
SMALL = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 256, "vocab_size": 4096, "tie_word_embeddings": True, "max_position_embeddings": 4096}


def build(shape: dict, dtype, device, parscale_n: int = 1, n_tokens: int = 48, seed: int = 0):
    """Random-weight Qwen2 shape (our Model) or ParScaleModel; weights drawn directly, no transformers model."""
    from transformers import Qwen2Config

    from ttscale.backends.engine.model import Model, ModelConfig
    from ttscale.backends.engine.parscale_model import ParScaleModel, random_parscale_state

    hf = Qwen2Config(**shape, use_sliding_window=False, rope_theta=1000000.0, rms_norm_eps=1e-6)
    cfg = ModelConfig.from_hf(hf, dtype, device)
    g = torch.Generator().manual_seed(seed)
    H, inter, hd = hf.hidden_size, hf.intermediate_size, hf.hidden_size // hf.num_attention_heads
    kv = hf.num_key_value_heads * hd

    def r(*s, std=0.02):
        return (torch.randn(*s, generator=g) * std).to(dtype)

    st = {"model.embed_tokens.weight": r(hf.vocab_size, H), "model.norm.weight": torch.ones(H, dtype=dtype)}
    for i in range(hf.num_hidden_layers):
        p = f"model.layers.{i}."
        st.update({p + "input_layernorm.weight": torch.ones(H, dtype=dtype),
                   p + "post_attention_layernorm.weight": torch.ones(H, dtype=dtype),
                   p + "self_attn.q_proj.weight": r(H, H), p + "self_attn.q_proj.bias": r(H),
                   p + "self_attn.k_proj.weight": r(kv, H), p + "self_attn.k_proj.bias": r(kv),
                   p + "self_attn.v_proj.weight": r(kv, H), p + "self_attn.v_proj.bias": r(kv),
                   p + "self_attn.o_proj.weight": r(H, H), p + "mlp.gate_proj.weight": r(inter, H),
                   p + "mlp.up_proj.weight": r(inter, H), p + "mlp.down_proj.weight": r(H, inter)})
    if parscale_n == 0:
        return Model(cfg, st)
    st = random_parscale_state(hf, parscale_n, n_tokens, seed=seed, base_state=st)
    return ParScaleModel.from_state(cfg, st, parscale_n, n_tokens, 0.01)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hogwild_spec(model, W: int, steps: int, prompt: int, stagger: int = 0):
    """W workers, combined layout, sampled at T=0.8 / top-p 0.95, never stopping early (no EOS, no boxed).
    With `stagger`, worker w's step header is `stagger * w` tokens longer, so workers end steps at
    different forwards (as they do on real text) instead of all together."""
    from ttscale.backends.engine.native import HogwildSpec, SamplingRow

    vocab = model.cfg.vocab_size
    return HogwildSpec(prompt_ids=[(7 * i) % vocab for i in range(prompt)], workers=W, layout="combined",
                       max_steps=steps, others_header=[11, 12, 13], own_header=[14, 15],
                       step_prefix=[[20 + w] * (1 + stagger * w) for w in range(W)], check_ids=[30, 31, 32],
                       check_every=128,
                       sampling=SamplingRow(0.8, 0.95, 0, 1), ignore_eos=True, stop_on_boxed=False)


def hogwild_rate(model, W: int, steps: int, prompt: int, step_every: int, graphs: bool | None,
                 stagger: int = 0) -> dict:
    """Tokens/s of two identical runs on one cache: the first ("cold") pays kernel compiles and CUDA-graph
    captures, the second ("warm") replays them, as a server that keeps its workspace would."""
    from ttscale.backends.engine.native import HogwildRun

    spec = hogwild_spec(model, W, steps, prompt, stagger)
    out: dict = {}
    first = None
    for phase in ("cold", "warm"):
        run = HogwildRun(model, spec, is_boundary=lambda t: len(t) >= step_every, cuda_graphs=graphs,
                         cache=first.cache if first else None, graphs=first.graphs if first else None)
        sync(model.cfg.device)
        t0 = time.perf_counter()
        res = run.run()
        sync(model.cfg.device)
        dt = time.perf_counter() - t0
        out[phase] = res.generated / dt
        out["forwards"] = res.forwards
        out["ms_per_step"] = 1000 * dt / res.forwards
        out["wait_ms"] = 1000 * run.waited / res.forwards
        out["dropped"] = run.dropped
        first = first or run
    out["captures"] = first.graphs.captures if first.graphs is not None else 0
    return out


def hogwild_profile(model, W: int, steps: int, prompt: int, step_every: int, top: int = 12) -> None:
    """GPU kernel time per step of a warm Hogwild run (torch profiler), against its wall time per step."""
    from torch.profiler import ProfilerActivity, profile

    from ttscale.backends.engine.native import HogwildRun

    spec = hogwild_spec(model, W, steps, prompt)
    first = HogwildRun(model, spec, is_boundary=lambda t: len(t) >= step_every)
    first.run()
    run = HogwildRun(model, spec, is_boundary=lambda t: len(t) >= step_every, graphs=first.graphs)
    sync(model.cfg.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        out = run.run()
        sync(model.cfg.device)
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels) / 1000
    print(f"  W={W}: wall {1000 * wall / out.forwards:.3f} ms/step, GPU kernels {total / out.forwards:.3f} ms/step")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"     {e.self_device_time_total / 1000 / out.forwards:7.4f} ms/step  x{e.count // out.forwards:<4d} "
              f"{e.key[:90]}")


def parscale_ms(pm, steps: int, prompt: int, graphs: bool) -> float:
    """Per-token decode latency, prefill excluded: (time of `steps` tokens - time of 1 token) / (steps - 1),
    after one untimed run of the same length (kernel compiles, graph captures)."""
    from ttscale.backends.engine.kv_cache import KVCache

    cache = KVCache.for_model(pm.cfg, num_blocks=pm.P * ((prompt + steps) // 16 + 8) + 8)
    runner = pm.graph_runner(cache) if graphs else None
    ids = [(5 * i) % pm.cfg.vocab_size for i in range(prompt)]
    pm.generate(cache, ids, steps, temperature=0.8, top_p=0.95, seed=1, graphs=runner)  # warm-up
    sync(pm.cfg.device)
    t0 = time.perf_counter()
    res = pm.generate(cache, ids, steps, temperature=0.8, top_p=0.95, seed=1, graphs=runner)
    sync(pm.cfg.device)
    t1 = time.perf_counter()
    pm.generate(cache, ids, 1, temperature=0.8, top_p=0.95, seed=1, graphs=runner)  # prefill + one token
    sync(pm.cfg.device)
    t2 = time.perf_counter()
    n = len(res["token_ids"])
    return 1000 * ((t1 - t0) - (t2 - t1)) / max(1, n - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--shape", choices=["qwen0.5b", "small"], default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--kernels", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--graphs", choices=["auto", "on", "off"], default="auto", help="CUDA graphs for decode steps")
    ap.add_argument("--step-every", type=int, default=32, help="Hogwild step boundary every N tokens")
    ap.add_argument("--stagger", type=int, default=0,
                    help="worker w's steps end N*w tokens earlier, so workers end steps at different forwards")
    ap.add_argument("--profile", action="store_true", help="only: GPU kernel time per Hogwild step (CUDA)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    dtype = dtypes[a.dtype or ("bf16" if cuda else "fp32")]
    shape = QWEN05 if (a.shape or ("qwen0.5b" if cuda else "small")) == "qwen0.5b" else SMALL
    steps = a.steps or (256 if cuda else 64)
    use_k = a.kernels == "on" or (a.kernels == "auto" and cuda)
    graphs = a.graphs == "on" or (a.graphs == "auto" and cuda)
    print(f"device={dev} ({torch.cuda.get_device_name(dev) if cuda else 'cpu'}) dtype={dtype} "
          f"shape={'qwen2.5-0.5b' if shape is QWEN05 else 'small'} steps={steps} prompt={a.prompt}")

    base = build(shape, dtype, dev, parscale_n=0)
    kern = base.use_kernels(use_k) if use_k else False
    print(f"fused kernels: {kern}   CUDA graphs: {graphs}")
    if a.profile:
        for W in [int(x) for x in a.workers.split(",")]:
            hogwild_profile(base, W, steps, a.prompt, a.step_every)
        return
    stag = f", worker w's steps {a.stagger}*w tokens shorter" if a.stagger else ""
    print(f"\n== Hogwild: tokens/s over one shared cache (combined layout, a step every {a.step_every} tokens{stag})")
    print("   warm = a second identical run on the same cache (compiles and graph captures done); "
          "the target is checked on it")
    rates = {}
    for W in [int(x) for x in a.workers.split(",")]:
        try:
            r = hogwild_rate(base, W, steps, a.prompt, a.step_every, graphs, a.stagger)
        except Exception as e:
            if not kern:
                raise
            print(f"  fused kernels failed ({type(e).__name__}: {e}); torch path")
            kern = base.use_kernels(False)
            r = hogwild_rate(base, W, steps, a.prompt, a.step_every, graphs, a.stagger)
        rates[W] = r
        r1 = rates[min(rates)]
        ratio, cold_ratio = r["warm"] / r1["warm"], r["cold"] / r1["cold"]
        target = 0.9 * W
        print(f"  W={W}: warm {r['warm']:9.1f} tok/s ({r['ms_per_step']:.2f} ms/step, {r['forwards']} steps)  "
              f"x{ratio:.2f} vs W=1  target >= x{target:.2f}  {'OK' if ratio >= target else 'MISS'}   "
              f"| cold {r['cold']:8.1f} tok/s x{cold_ratio:.2f}, {r['captures']} graphs captured")
        print(f"        host waited for the GPU {r['wait_ms']:.2f} ms/step; {r['dropped']} steps launched ahead "
              f"were dropped (a worker stopped)")
    del base
    print("\n== ParScale: ms per decoded token (P streams + aggregation), after an untimed run of the same length")
    ms = {}
    for P in [int(x) for x in a.streams.split(",")]:
        pm = build(shape, dtype, dev, parscale_n=P)
        if kern:
            pm.model.use_kernels(True)
        try:
            ms[P] = parscale_ms(pm, steps, a.prompt, graphs)
        except Exception as e:
            if not kern:
                raise
            print(f"  fused kernels failed ({type(e).__name__}: {e}); torch path")
            kern = pm.model.use_kernels(False)
            ms[P] = parscale_ms(pm, steps, a.prompt, graphs)
        del pm
        r = ms[P] / ms[min(ms)]
        line = f"  P={P}: {ms[P]:8.2f} ms/token  x{r:.2f} vs P=1"
        if P == 8:
            line += f"  target <= x1.50  {'OK' if r <= 1.5 else 'MISS'}"
        print(line)


if __name__ == "__main__":
    main()

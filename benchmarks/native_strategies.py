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
    H, I, hd = hf.hidden_size, hf.intermediate_size, hf.hidden_size // hf.num_attention_heads
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
                   p + "self_attn.o_proj.weight": r(H, H), p + "mlp.gate_proj.weight": r(I, H),
                   p + "mlp.up_proj.weight": r(I, H), p + "mlp.down_proj.weight": r(H, I)})
    if parscale_n == 0:
        return Model(cfg, st)
    st = random_parscale_state(hf, parscale_n, n_tokens, seed=seed, base_state=st)
    return ParScaleModel.from_state(cfg, st, parscale_n, n_tokens, 0.01)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hogwild_rate(model, W: int, steps: int, prompt: int, step_every: int) -> tuple[float, int]:
    from ttscale.backends.engine.native import HogwildRun, HogwildSpec, SamplingRow

    vocab = model.cfg.vocab_size
    spec = HogwildSpec(prompt_ids=[(7 * i) % vocab for i in range(prompt)], workers=W, layout="combined",
                       max_steps=steps, others_header=[11, 12, 13], own_header=[14, 15],
                       step_prefix=[[20 + w] for w in range(W)], check_ids=[30, 31, 32], check_every=128,
                       sampling=SamplingRow(0.8, 0.95, 0, 1), ignore_eos=True, stop_on_boxed=False)
    HogwildRun(model, spec.__class__(**{**spec.__dict__, "max_steps": 4}),
               is_boundary=lambda t: len(t) >= step_every).run()  # warm-up
    sync(model.cfg.device)
    t0 = time.perf_counter()
    out = HogwildRun(model, spec, is_boundary=lambda t: len(t) >= step_every).run()
    sync(model.cfg.device)
    dt = time.perf_counter() - t0
    return out.generated / dt, out.forwards


def parscale_ms(pm, steps: int, prompt: int) -> float:
    from ttscale.backends.engine.kv_cache import KVCache

    cache = KVCache.for_model(pm.cfg, num_blocks=pm.P * ((prompt + steps) // 16 + 8) + 8)
    ids = [(5 * i) % pm.cfg.vocab_size for i in range(prompt)]
    pm.generate(cache, ids, 4, temperature=0.8, top_p=0.95, seed=1)  # warm-up
    sync(pm.cfg.device)
    t0 = time.perf_counter()
    res = pm.generate(cache, ids, steps, temperature=0.8, top_p=0.95, seed=1)
    sync(pm.cfg.device)
    t1 = time.perf_counter()
    pm.generate(cache, ids, 1, temperature=0.8, top_p=0.95, seed=1)  # prefill + one token, subtracted
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
    a = ap.parse_args()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[a.dtype or ("bf16" if cuda else "fp32")]
    shape = QWEN05 if (a.shape or ("qwen0.5b" if cuda else "small")) == "qwen0.5b" else SMALL
    steps = a.steps or (256 if cuda else 64)
    use_k = a.kernels == "on" or (a.kernels == "auto" and cuda)
    print(f"device={dev} ({torch.cuda.get_device_name(dev) if cuda else 'cpu'}) dtype={dtype} "
          f"shape={'qwen2.5-0.5b' if shape is QWEN05 else 'small'} steps={steps} prompt={a.prompt}")

    base = build(shape, dtype, dev, parscale_n=0)
    kern = base.use_kernels(use_k) if use_k else False
    print(f"fused kernels: {kern}")
    print("\n== Hogwild: tokens/s over one shared cache (combined layout, a step every 32 tokens)")
    rates = {}
    for W in [int(x) for x in a.workers.split(",")]:
        try:
            rates[W], fw = hogwild_rate(base, W, steps, a.prompt, 32)
        except Exception as e:
            if not kern:
                raise
            print(f"  fused kernels failed ({type(e).__name__}: {e}); torch path")
            kern = base.use_kernels(False)
            rates[W], fw = hogwild_rate(base, W, steps, a.prompt, 32)
        r1 = rates[min(rates)]
        ratio = rates[W] / r1
        target = 0.9 * W
        print(f"  W={W}: {rates[W]:9.1f} tok/s  ({fw} forwards)  x{ratio:.2f} vs W=1  target >= x{target:.2f}  "
              f"{'OK' if ratio >= target else 'MISS'}")
    del base
    print("\n== ParScale: ms per decoded token (P streams + aggregation)")
    ms = {}
    for P in [int(x) for x in a.streams.split(",")]:
        pm = build(shape, dtype, dev, parscale_n=P)
        if kern:
            pm.model.use_kernels(True)
        try:
            ms[P] = parscale_ms(pm, steps, a.prompt)
        except Exception as e:
            if not kern:
                raise
            print(f"  fused kernels failed ({type(e).__name__}: {e}); torch path")
            kern = pm.model.use_kernels(False)
            ms[P] = parscale_ms(pm, steps, a.prompt)
        del pm
        r = ms[P] / ms[min(ms)]
        line = f"  P={P}: {ms[P]:8.2f} ms/token  x{r:.2f} vs P=1"
        if P == 8:
            line += f"  target <= x1.50  {'OK' if r <= 1.5 else 'MISS'}"
        print(line)


if __name__ == "__main__":
    main()

"""Run every issue-4 strategy end to end on SmolLM2-135M-Instruct (in-process vLLM on CPU).

    python examples/strategies_smollm2.py                # all strategies, one easy question
    python examples/strategies_smollm2.py --only ffs pdr --questions 2

Prints each strategy's answer (and whether it is right) and its usage. The configs are scaled down from
the papers' defaults (n, token limits, windows) so that a 135M model on two CPU cores finishes in minutes;
the scaled knobs are listed in CONFIGS. ATTS needs a draft and a target model; only SmolLM2 ships with
ttscale, so here the same vLLM engine plays both roles (tests/strategies/test_real_backends.py runs two
different models).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

QUESTIONS = [
    ("What is 12 + 30?", "42"),
    ("Tom has 3 apples and buys 4 more. How many apples does he have now?", "7"),
]

COMMON = {"max_tokens": 192, "seed": 0}
CONFIGS: dict[str, dict] = {
    "ffs": {"n": 4},
    "sync-ffs": {"n": 4},
    "ffs-k": {"n": 6, "k": 3},
    "short-m": {"k": 6, "m": 3},
    "last-finish": {"n": 3},
    "deepprune": {"n": 8, "prefix_tokens": 24, "k3": 3, "judge": "embedding"},
    "pdr": {"schedule": [3, 2, 1], "kappa": 192, "distill": "summary"},
    "sr": {"rounds": 2, "kappa": 192},
    "atts": {"samples": 3, "turns": 4, "step_tokens": 64, "target_tokens": 48},
    "deepconf": {"n": 8, "warmup": 4, "window": 32, "top_logprobs": 5},
}


async def main(only: list[str] | None, n_questions: int) -> None:
    from ttscale.backends.vllm import VLLMBackend
    from ttscale.models import default_model_dir
    from ttscale.pipeline import Pipeline
    from ttscale.strategies.atts import ATTS
    from ttscale.strategies.registry import make_strategy
    from ttscale.types import Problem

    backend = VLLMBackend(default_model_dir(), dtype="float32", max_model_len=2048,
                          kv_cache_memory_bytes=256 * 2**20, max_num_seqs=16)
    t0 = time.monotonic()
    await backend.start()
    print(f"vLLM on SmolLM2-135M-Instruct started in {time.monotonic() - t0:.1f}s")
    try:
        for name, cfg in CONFIGS.items():
            if only and name not in only:
                continue
            cfg = {**COMMON, **cfg}
            strat = ATTS(cfg, target_backend=backend) if name == "atts" else make_strategy(name, **cfg)
            async with Pipeline(backend, strat, seed=0) as pipe:
                for q, ref in QUESTIONS[:n_questions]:
                    t = time.monotonic()
                    r = await pipe.solve(Problem(id=name, prompt=q, answer=ref))
                    u = r.usage
                    print(f"[{strat.spec}] {q!r}\n  answer={r.answer!r} correct={r.correct} "
                          f"({time.monotonic() - t:.1f}s)\n  usage: branches={u.branches} aborted={u.aborted} "
                          f"prompt={u.prompt_tokens} generated={u.generated_tokens} sequential={u.sequential_tokens} "
                          f"seq_prompt={u.sequential_prompt_tokens} saved_est={u.saved_tokens} "
                          f"score_calls={u.score_calls}"
                          + (f"\n  fallbacks: {r.fallbacks}" if r.fallbacks else ""))
    finally:
        await backend.close()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help=f"strategies to run (default: all of {', '.join(CONFIGS)})")
    ap.add_argument("--questions", type=int, default=1, choices=[1, 2])
    args = ap.parse_args()
    asyncio.run(main(args.only, args.questions))

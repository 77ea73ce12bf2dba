"""Hogwild (2 workers on one shared cache) and ParaThinker's text fallback on SmolLM2-135M-Instruct.

Runs offline on CPU with the bundled model:  python examples/native_smollm2.py
"""

from __future__ import annotations

import asyncio
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


async def main() -> None:
    from ttscale.backends.engine import EngineBackend, EngineConfig
    from ttscale.controller import Context
    from ttscale.models import default_model_dir
    from ttscale.strategies.registry import make_strategy
    from ttscale.types import Problem

    be = EngineBackend(EngineConfig(model=str(default_model_dir()), dtype="float32", device="cpu",
                                    kv_memory_gb=0.25))
    problem = Problem(prompt="What is 12 + 30?", answer="42")
    try:
        for spec in ("hogwild:workers=2,max_tokens=48,temperature=0.7,seed=1",
                     "parathinker:paths=2,max_tokens=48,summary_max_tokens=48,temperature=0.7,seed=1"):
            res = await make_strategy(spec).run(problem, Context(be))
            u = res.usage
            print(f"{spec}\n  answer={res.answer!r} fallbacks={res.fallbacks}\n  usage: generated={u.generated_tokens} "
                  f"sequential={u.sequential_tokens} prompt={u.prompt_tokens} branches={u.branches}")
    finally:
        await be.close()


if __name__ == "__main__":
    asyncio.run(main())

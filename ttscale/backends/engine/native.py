"""Driver loops for strategies that lay out KV themselves, one module each; this module re-exports them.

- `native_hogwild`: Hogwild! workers over one shared cache (views re-laid every step).
- `native_parathinker`: ParaThinker paths and the summary over their merged KV.
- `native_common`: sampling rows, banned-token masks, KV workspaces and CUDA-graph runners they share, and
  `NativeDriver`, which steps native runs inside the engine's loop.

Both loops are native jobs: a `steps()` generator, one batched forward of every live worker / path per
`next()`, directly on `Model.forward`, sampling on device (`sampler.sample`, counter-based seeds: a
worker's draw depends only on its logits, seed and step). The engine steps them on its own thread and KV
cache (`Engine.add_native`); `run()` drives one to the end in the caller's thread over any cache.
"""

from __future__ import annotations

from ttscale.backends.engine.native_common import (
    NativeDone,
    NativeDriver,
    NativeJob,
    NativeOutput,
    NativeStream,
    RunnerPool,
    SamplingRow,
    Workspaces,
    apply_ban,
    ban_mask,
    set_banned,
)
from ttscale.backends.engine.native_hogwild import (
    HogwildOutcome,
    HogwildRun,
    HogwildSpec,
    WorkerState,
    hogwild_blocks,
    is_step_end,
)
from ttscale.backends.engine.native_parathinker import (
    ControlTokens,
    ParaThinkerOutcome,
    ParaThinkerRun,
    ParaThinkerSpec,
    control_token_ids,
    control_tokens,
    parathinker_run,
)

__all__ = [
    "ControlTokens", "HogwildOutcome", "HogwildRun", "HogwildSpec", "NativeDone", "NativeDriver", "NativeJob",
    "NativeOutput", "NativeStream", "ParaThinkerOutcome", "ParaThinkerRun", "ParaThinkerSpec", "RunnerPool",
    "SamplingRow", "WorkerState", "Workspaces", "apply_ban", "ban_mask", "control_token_ids",
    "control_tokens", "hogwild_blocks", "is_step_end", "parathinker_run", "set_banned",
]

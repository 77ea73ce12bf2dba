"""Driver loops for strategies that lay out KV themselves, one module each; this module re-exports them.

- `native_hogwild`: Hogwild! workers over one shared cache (views re-laid every step).
- `native_parathinker`: ParaThinker paths and the summary over their merged KV.
- `native_common`: sampling rows, banned-token masks, KV workspaces and CUDA-graph runners they share.

Both loops run directly on `Model.forward` over a `KVCache` of their own (the engine thread owns the
engine's cache), batch every live worker / path into one forward per step, and sample on device
(`sampler.sample`, counter-based seeds: a worker's draw depends only on its logits, seed and step).
"""

from __future__ import annotations

from ttscale.backends.engine.native_common import SamplingRow, Workspaces, apply_ban, ban_mask, set_banned
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
    ParaThinkerSpec,
    control_token_ids,
    control_tokens,
    parathinker_run,
)

__all__ = [
    "ControlTokens", "HogwildOutcome", "HogwildRun", "HogwildSpec", "ParaThinkerOutcome", "ParaThinkerSpec",
    "SamplingRow", "WorkerState", "Workspaces", "apply_ban", "ban_mask", "control_token_ids",
    "control_tokens", "hogwild_blocks", "is_step_end", "parathinker_run", "set_banned",
]

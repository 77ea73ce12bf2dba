"""Engine-native runs (Hogwild workers, ParaThinker paths) as branches of a Context: `Context.run_native`.

The engine steps a native run in its own loop (`ttscale.backends.engine.native_common`) and streams one
Delta stream per worker / path. Here each stream becomes a Branch of the Context, started like a spawned
one, so the Context's events (spawned / delta / finished), cancellation and budgets apply to it:

- cancelling any of its branches (`ctx.cancel`, `cancel_rest`, a spent budget, `aclose`) closes that
  stream, which aborts the whole run in the engine (its KV blocks are free after the engine's next step);
  its other branches then end `aborted`;
- a total-token budget is also handed to the engine as a token cap (what is left of it when the run
  starts), and a sequential-token budget as a cap on forward passes: the engine ends the run after the
  step that reaches it, so it stops at most one step per stream past the budget even though its tokens
  reach the event loop in batches;
- a stream with `after` (ParaThinker's summary) continues the critical path of those streams: its
  `seq_base` is set when its first token arrives.

`NativeRun.finished()` waits for the branches and the run's end, and folds into the Context's usage what
its branches cannot show: tokens the run wrote that a cancelled branch never received, forward passes
beyond the longest branch (a Hogwild step whose sampled token gave way to a header), and the run's peak KV
blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ttscale.errors import CapabilityError, TTScaleError
from ttscale.types import Branch, Delta, GenerationRequest, SamplingSpec, Usage

if TYPE_CHECKING:
    from ttscale.backends.engine.backend import NativeHandle
    from ttscale.backends.engine.native_common import NativeDone, NativeJob
    from ttscale.controller import Context


@dataclass
class NativeRun:
    """A native run started by `Context.run_native`: its branches (one per job stream, in order)."""

    context: Context
    handle: NativeHandle
    branches: list[Branch]

    @property
    def run_id(self) -> str:
        return self.handle.run_id

    async def finished(self) -> NativeDone:
        """Wait until every branch is done and the engine ended the run; returns how it ended (the job's
        outcome is `.outcome`) and folds the run's extra usage into the Context (see the module doc)."""
        await self.context.wait_all(self.branches)
        done = await self.handle.done
        unseen = sum(done.generated) - sum(b.num_tokens for b in self.branches)
        longest = max((b.seq_end for b in self.branches), default=0)
        first = min((b.seq_base for b in self.branches), default=0)
        self.context.add_usage(Usage(generated_tokens=max(0, unseen),
                                     sequential_tokens=max(0, first + done.steps - longest),
                                     peak_kv_blocks=done.peak_blocks or None))
        return done


def start_native(ctx: Context, job: NativeJob, *, group: str | None = None,
                 after: Sequence[Branch] = (), meta: dict[str, Any] | None = None) -> NativeRun:
    """`Context.run_native`: start `job` on the Context's backend; see the module docstring."""
    if ctx.budget_hit:
        raise TTScaleError(f"budget spent ({ctx.budget_hit}); no new branches")
    if ctx.backend.capabilities.missing("engine_native"):
        raise CapabilityError(f"backend {ctx.backend.name!r} cannot run native jobs (needs the engine backend: "
                              "capability `engine_native`)")
    seq_base = max((b.seq_end for b in after), default=0)
    max_generated = max_steps = None
    for c in ctx._chain():
        if c.budget.total_tokens is not None:
            left = c.budget.total_tokens - c._tree_generated()
            max_generated = left if max_generated is None else min(max_generated, left)
        if c.budget.sequential_tokens is not None:
            left = c.budget.sequential_tokens - seq_base
            max_steps = left if max_steps is None else min(max_steps, left)
    if (max_generated is not None and max_generated <= 0) or (max_steps is not None and max_steps <= 0):
        raise TTScaleError("budget spent; no new branches")
    ctx._start_deadline()
    serial = next(ctx._ids)
    base_id = f"{ctx._id_prefix}{serial}"
    handle = ctx.backend.run_native(ctx._request_id(base_id), job, max_generated=max_generated,
                                    max_steps=max_steps)
    branches: list[Branch] = []
    for s in job.streams:
        req = GenerationRequest(request_id=f"{handle.run_id}/{s.name}", prompt_token_ids=list(job.prompt_ids),
                                sampling=SamplingSpec(max_tokens=max(1, s.max_tokens)))
        branches.append(Branch(id=f"{base_id}.{s.name}", group=group, request=req, seq_base=seq_base,
                               meta={**(meta or {}), "native": handle.run_id, "stream": s.name}))
    for s, b, stream in zip(job.streams, branches, handle.streams, strict=True):
        ctx._start_branch(b, _continuing(stream, b, [branches[i] for i in s.after]) if s.after else stream)
    return NativeRun(ctx, handle, branches)


async def _continuing(stream: AsyncGenerator[Delta, None], branch: Branch,
                      deps: list[Branch]) -> AsyncGenerator[Delta, None]:
    """`stream`, with `branch.seq_base` set to the end of the longest of `deps` when its first delta comes."""
    first = True
    async with contextlib.aclosing(stream):
        async for d in stream:
            if first:
                branch.seq_base = max([branch.seq_base] + [b.seq_end for b in deps])
                first = False
            yield d

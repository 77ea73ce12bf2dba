"""Decode steps captured in CUDA graphs, one per shape key (batch-size bucket, segment-job layout).

A decode step launches a few hundred small kernels; replaying a captured graph removes the per-kernel
launch cost that otherwise dominates at small batch sizes. Metadata is padded to buckets
(`Model.build_meta(pad=True)`), copied into the capture's static input tensors, and the graph (forward +
sampling) is replayed. Graphs share one memory pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ttscale.backends.engine.kv_cache import KVCache
from ttscale.backends.engine.model import AttnMeta, Model
from ttscale.backends.engine.sampler import SamplingTensors, sample


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: tuple


log = logging.getLogger("ttscale.engine")

StepFn = Callable[[AttnMeta, SamplingTensors, bool, int], tuple]


class GraphRunner:
    """Replays one captured graph per shape key. `step(meta, st, filtered, n_top)` is what gets captured:
    by default the model's forward and sampling (`(tokens, logprobs, top ids, top logprobs)`); ParScale
    passes its own (forward, stream aggregation, sampling)."""

    def __init__(self, model: Model, cache: KVCache, max_graphs: int = 256, step: StepFn | None = None,
                 state: Callable[[], list[torch.Tensor]] | None = None, capture_on_repeat: bool = False) -> None:
        self.model, self.cache = model, cache
        # tensors `step` reads and then overwrites (the decode step's fed-back tokens): the warm-up before a
        # capture must leave them as they were for the replay that follows
        self._state = state or (lambda: [])
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self._capture_stream = torch.cuda.Stream()
        self.max_graphs = max_graphs
        # `capture_on_repeat`: a shape is captured when the step before had the same one, or at its third step
        # (a shape that recurs apart); until then its steps run eagerly. A capture costs ~50 ms (warm-up,
        # capture, instantiation), an eager step of a large batch about what a replay costs (the device is the
        # bound). The batch sizes a run passes through while its requests arrive and finish are each one step
        # long and depend on the event loop's timing, so every eval captured a few new ones (4 graphs, 0.2-0.3 s
        # of a 2 s run).
        self.capture_on_repeat = capture_on_repeat
        self._last_key: tuple | None = None
        self._sightings: dict[tuple, int] = {}  # steps of each shape not captured yet
        self.captures = 0
        self.eager_steps = 0
        self._fn = step or self._forward_sample

    def _forward_sample(self, meta: AttnMeta, st: SamplingTensors, filtered: bool, n_top: int):
        logits = self.model.forward_meta(self.cache, meta, float_logits=False)
        return sample(logits, st, filtered, n_top)

    def run(self, meta: AttnMeta, st: SamplingTensors, filtered: bool, n_top: int):
        key = (meta.shape_key(), filtered, n_top)
        last, self._last_key = self._last_key, key
        cap = self.graphs.get(key)
        if cap is None:
            if len(self.graphs) >= self.max_graphs or (self.capture_on_repeat and not self._worth_capturing(key, last)):
                self.eager_steps += 1
                return self._fn(meta, st, filtered, n_top)
            return self._capture(key, meta, st, filtered, n_top).outputs
        assert meta.flat is not None, "graphs replay metadata built by build_meta (one flat tensor)"
        for dst, src in zip(cap.inputs, [meta.flat, *st.tensors()], strict=True):
            dst.copy_(src, non_blocking=True)
        cap.graph.replay()
        return cap.outputs

    def _worth_capturing(self, key: tuple, last: tuple | None) -> bool:
        """`capture_on_repeat`'s rule for a shape not captured yet: the same as the step before (`last`), or its
        third step."""
        seen = self._sightings.pop(key, 0) + 1
        if key == last or seen >= 3:
            return True
        if len(self._sightings) >= 4 * self.max_graphs:  # shapes seen once or twice long ago: start counting anew
            self._sightings.clear()
        self._sightings[key] = seen
        return False

    def _capture(self, key, meta: AttnMeta, st: SamplingTensors, filtered: bool, n_top: int) -> _Captured:
        t0 = time.perf_counter()
        assert meta.flat is not None, "graphs capture metadata built by build_meta (one flat tensor)"
        inputs = [t.clone() for t in [meta.flat, *st.tensors()]]
        smeta = AttnMeta.from_flat(inputs[0], meta.shapes, meta.has_emb, meta.vmax, has_src=meta.has_src)
        sst = SamplingTensors(inputs[1], inputs[2], st.n)
        # Warm up on a side stream (required before capture). K/V writes are idempotent: the same
        # values land in the same slots again at replay.
        saved = [t.clone() for t in self._state()]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self._fn(smeta, sst, filtered, n_top)
        torch.cuda.current_stream().wait_stream(s)
        for t, v in zip(self._state(), saved, strict=True):
            t.copy_(v)
        g = torch.cuda.CUDAGraph()
        # `torch.cuda.graph` empties the device and pinned-host caching allocators before each capture, so
        # every capture made the steps around it allocate afresh (a second or more over a run's first
        # dozen captures); this is its capture without that. thread_local: two engines in one process
        # (ATTS's draft and target) step in their own threads, and under the default "global" mode the
        # other engine's kernel launches invalidate this capture.
        torch.cuda.synchronize()
        with torch.cuda.stream(self._capture_stream):
            g.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                outs = self._fn(smeta, sst, filtered, n_top)
            finally:
                g.capture_end()
        cap = _Captured(g, inputs, outs)
        self.graphs[key] = cap
        self.captures += 1
        g.replay()
        # Progress for the first call of a process: each new batch bucket / layout is captured once.
        log.info("captured CUDA graph %d (%d tokens, layout %s) in %.0f ms", self.captures, meta.n_tokens,
                 key[0][3], (time.perf_counter() - t0) * 1e3)
        return cap

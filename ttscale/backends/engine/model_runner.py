"""Runs the model for the engine: attention metadata, forward, CUDA graphs and sampling.

The scheduler decides which requests run; this turns them into `ForwardItem`s, builds the step's
metadata (allocating KV blocks, evicting cached prefixes when the pool is short), runs the forward
(eagerly, or a captured CUDA graph for decode steps) and samples on device. With `overlap`, the next
decode step's metadata is built while the device runs this one (`take_spec`); any command that may change
sequences drops it first (`drop_spec`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from ttscale.backends.engine.attn_meta import AttnMeta, ForwardItem
from ttscale.backends.engine.kv_cache import KVCache, OutOfKVBlocks, Segment, Sequence
from ttscale.backends.engine.model import Model
from ttscale.backends.engine.prefix_cache import PrefixCache
from ttscale.backends.engine.request import Request
from ttscale.backends.engine.sampler import SamplingTensors, sample
from ttscale.backends.engine.scheduler import PrefillWork

T = TypeVar("T")
Sampled = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def sampling_rows(reqs: list[Request]) -> tuple[list[tuple[float, float, int, int, int]], bool, int]:
    """Per-request (temperature, top_p, top_k, seed, step) rows, whether any row filters (top-p / top-k,
    which needs a sort), and how many top logprobs to return (20 when any request asks for some)."""
    rows = [(r.params.temperature, r.params.top_p, r.params.top_k, r.seed, len(r.output_ids)) for r in reqs]
    filtered = any(r.params.top_p < 1.0 or r.params.top_k > 0 for r in reqs)
    n_top = 20 if any(r.params.logprobs for r in reqs) else 0
    return rows, filtered, n_top


class ModelRunner:
    """The model, its KV cache and (on CUDA) its decode-step graphs, driven one step at a time."""

    def __init__(self, model: Model, cache: KVCache, prefix: PrefixCache, cuda_graphs: bool,
                 overlap: bool = True) -> None:
        self.model, self.cache, self.prefix = model, cache, prefix
        self.graphs = None
        if cuda_graphs:
            from ttscale.backends.engine.cuda_graphs import GraphRunner

            self.graphs = GraphRunner(model, cache)
        self.pad = self.graphs is not None
        self.overlap = overlap
        self.last_decode_jobs: dict[int, int] = {}
        # the next decode step, prepared ahead: (its requests, metadata, their write segments)
        self._spec: tuple[list[Request], AttnMeta, list[Segment]] | None = None

    def with_blocks(self, fn: Callable[[], T]) -> T:
        """Run `fn`, evicting prefix-cache entries while the pool is short of blocks."""
        while True:
            try:
                return fn()
            except OutOfKVBlocks:
                if not self.prefix.evict_one():
                    raise

    def sample(self, logits: torch.Tensor, reqs: list[Request], pad_to: int | None = None) -> Sampled:
        rows, filtered, n_top = sampling_rows(reqs)
        st = SamplingTensors.build(rows, pad_to or len(rows), logits.device)
        return sample(logits, st, filtered, n_top)

    # ---- prefill ----------------------------------------------------------------------------------------
    def prefill(self, work: list[PrefillWork]) -> tuple[dict[int, torch.Tensor], list[Request]]:
        """Run this step's prefill chunks. Returns the last-token logits of the requests whose prompt was
        computed to its end (by `id`), and every request whose prefill is now complete (those, plus the
        ones whose whole prompt came from the prefix cache). Raises `OutOfKVBlocks` when the chunks do not
        fit even after evicting cached prefixes (nothing is written then)."""
        items, computed, done = [], [], []
        for w in work:
            r = w.request
            if w.count == 0:  # whole prompt in the prefix cache, with its last logits
                done.append(r)
                continue
            last = w.start + w.count == len(r.prefill_ids)
            assert r.seq is not None
            items.append(ForwardItem(r.seq.views, r.prefill_ids[w.start:w.start + w.count],
                                     logits="last" if last else "none"))
            if last:
                computed.append(r)
                done.append(r)
        rows: dict[int, torch.Tensor] = {}
        if items:
            meta = self.with_blocks(lambda: self.model.build_meta(self.cache, items))
            logits = self.model.forward_meta(self.cache, meta)
            for i, r in enumerate(computed):
                rows[id(r)] = logits[i]
        return rows, done

    # ---- decode -----------------------------------------------------------------------------------------
    def take_spec(self, reqs: list[Request]) -> AttnMeta | None:
        """The metadata prepared ahead for exactly `reqs` (its token ids filled in now), or None (and any
        prepared step undone)."""
        spec, self._spec = self._spec, None
        if spec is not None and len(spec[0]) == len(reqs) and all(a is b for a, b in zip(spec[0], reqs, strict=True)):
            meta = spec[1]  # prepared while the previous step ran: only the tokens were unknown
            assert meta.flat is not None
            meta.flat[:len(reqs)].copy_(torch.tensor([r.pending for r in reqs], dtype=torch.long))
            return meta
        if spec is not None:
            self._spec = spec
            self.drop_spec()
        return None

    def drop_spec(self) -> None:
        """Undo the speculatively prepared next decode step (its write segments' lengths)."""
        if self._spec is not None:
            for seg in self._spec[2]:
                seg.length -= 1
            self._spec = None

    def decode_meta(self, reqs: list[Request]) -> AttnMeta:
        """Metadata for one decode step of `reqs` (their pending tokens). Raises `OutOfKVBlocks` when a
        new block is needed and none is left after evicting cached prefixes."""
        # running requests always have a sequence and a pending token (`Scheduler.decode_batch`)
        items = [ForwardItem(r.seq.views, [r.pending]) for r in reqs]  # type: ignore[union-attr,list-item]
        return self.with_blocks(lambda: self.model.build_meta(self.cache, items, pad=self.pad))

    def decode(self, meta: AttnMeta, reqs: list[Request]) -> Sampled:
        """Run one decode step (a CUDA graph when captured) and sample; with `overlap`, prepare the next
        step's metadata while the device works."""
        self.last_decode_jobs = meta.jobs_per_segment
        if self.graphs is not None:
            rows, filtered, n_top = sampling_rows(reqs)
            st = SamplingTensors.build(rows, meta.tokens.shape[0], self.cache.pool.device)
            out = self.graphs.run(meta, st, filtered, n_top)
        else:
            logits = self.model.forward_meta(self.cache, meta)
            out = self.sample(logits, reqs)
        if self.overlap:
            # Prepare the next step's metadata while the GPU works on this one (token ids patched in later).
            try:
                seqs: list[Sequence] = [r.seq for r in reqs]  # type: ignore[misc]  # decoding: all have one
                nxt = self.model.build_meta(self.cache, [ForwardItem(s.views, [0]) for s in seqs], pad=self.pad)
                self._spec = (reqs, nxt, [s.write for s in seqs])
            except OutOfKVBlocks:
                self._spec = None
        return out

    # ---- scoring ----------------------------------------------------------------------------------------
    def score(self, ctx: list[int], cont: list[int]) -> list[float]:
        """Logprobs of `cont` given `ctx`: one prefill, the context possibly from the prefix cache."""
        seq = None
        try:
            views, n, cached = self.prefix.lookup(ctx)
            seq = Sequence.new(self.cache, views, offset=n)
            toks = ctx[n:] + cont
            items = [ForwardItem(seq.views, toks, logits="all")]
            meta = self.with_blocks(lambda: self.model.build_meta(self.cache, items))
            logits = self.model.forward_meta(self.cache, meta)
            start = len(ctx) - n - 1
            if cached is not None:  # the whole context was cached: its last logits predict cont[0]
                logits, start = torch.cat([cached[None].float(), logits]), 0
            lp = torch.log_softmax(logits[start:start + len(cont)].float(), -1)
            res: list[float] = lp.gather(-1, torch.tensor(cont, device=lp.device)[:, None]).squeeze(-1).tolist()
            return res
        finally:
            if seq is not None:
                seq.release()

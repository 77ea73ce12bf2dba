"""Runs the model for the engine: attention metadata, forward, CUDA graphs and sampling.

The scheduler decides which requests run; this turns them into `ForwardItem`s, builds the step's
metadata (allocating KV blocks, evicting cached prefixes when the pool is short), runs the forward
(eagerly, or a captured CUDA graph for decode steps) and samples on device. With `overlap`, the next
decode step is planned while the device runs this one (`set_spec` / `take_spec`); any command that may
change sequences drops it first (`drop_spec`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from ttscale.backends.engine.attn_meta import AttnMeta, DecodeLayout, ForwardItem
from ttscale.backends.engine.kv_cache import KVCache, OutOfKVBlocks, Segment, Sequence
from ttscale.backends.engine.model import Model
from ttscale.backends.engine.prefix_cache import PrefixCache
from ttscale.backends.engine.request import Request
from ttscale.backends.engine.sampler import SamplingTensors, sample
from ttscale.backends.engine.scheduler import PrefillWork

T = TypeVar("T")
Sampled = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def sampling_rows(reqs: list[Request], ahead: list[int] | None = None
                  ) -> tuple[list[tuple[float, float, int, int, int]], bool, int]:
    """Per-request (temperature, top_p, top_k, seed, step) rows, whether any row filters (top-p / top-k),
    and how many top logprobs to return (20 when any request asks for some). A row's step is the index of
    the token it draws: its accepted tokens plus `ahead` (tokens sampled by a launched step not yet read)."""
    ahead = ahead or [0] * len(reqs)
    rows = [(r.params.temperature, r.params.top_p, r.params.top_k, r.seed, len(r.output_ids) + a)
            for r, a in zip(reqs, ahead, strict=True)]
    filtered = any(r.params.top_p < 1.0 or r.params.top_k > 0 for r in reqs)
    n_top = 20 if any(r.params.logprobs for r in reqs) else 0
    return rows, filtered, n_top


@dataclass
class DecodePlan:
    """One decode step, ready to launch: its requests (row order), metadata, sampling tensors, and the
    segments it reserved a slot in (undone with `ModelRunner.undo` if it is never launched)."""

    reqs: list[Request]
    meta: AttnMeta
    writes: list[Segment]
    st: SamplingTensors
    filtered: bool
    n_top: int
    key: tuple = ()  # what the rows were chosen from (`Engine`: scheduler version, the step in flight)


@dataclass
class Launched:
    """A launched decode step's sampled outputs for its first `n` rows: on CUDA, copies into pinned host
    memory that are complete once `event` fires; elsewhere the tensors themselves."""

    n: int
    tok: torch.Tensor
    lp: torch.Tensor
    top_ids: torch.Tensor | None
    top_lps: torch.Tensor | None
    event: torch.cuda.Event | None = None

    def lists(self) -> tuple[list[int], list[float], list[list[int]] | None, list[list[float]] | None]:
        """The outputs as Python lists (waits for the step to finish)."""
        if self.event is not None:
            self.event.synchronize()
        n = self.n
        tops = None if self.top_ids is None or self.top_lps is None else (self.top_ids[:n].tolist(),
                                                                       self.top_lps[:n].tolist())
        return self.tok[:n].tolist(), self.lp[:n].tolist(), *(tops or (None, None))


class _HostSlot:
    """Pinned host buffers one launched step's outputs are copied into (a ring of two: the step being read
    and the one being launched)."""

    def __init__(self, rows: int, n_top: int) -> None:
        self.rows, self.n_top = rows, n_top
        self.tok = torch.empty(rows, dtype=torch.long, pin_memory=True)
        self.lp = torch.empty(rows, dtype=torch.float32, pin_memory=True)
        self.top_ids = torch.empty(rows, max(n_top, 1), dtype=torch.long, pin_memory=True)
        self.top_lps = torch.empty(rows, max(n_top, 1), dtype=torch.float32, pin_memory=True)


FEED_ROWS = 4096  # rows of the previous decode step's tokens kept on device (grown, and graphs recaptured, if needed)


class ModelRunner:
    """The model, its KV cache and (on CUDA) its decode-step graphs, driven one step at a time.

    Decode steps can be launched before the previous one's tokens are read on the host: the step's graph
    takes each row's input token from the previous step's sampled tokens on device (`AttnMeta.src` into
    `feed`), and its own sampled tokens are copied to pinned host memory to be read later (`Launched`)."""

    def __init__(self, model: Model, cache: KVCache, prefix: PrefixCache, cuda_graphs: bool,
                 overlap: bool = True) -> None:
        self.model, self.cache, self.prefix = model, cache, prefix
        self.device = cache.pool.device
        self.feed = torch.zeros(FEED_ROWS, dtype=torch.long, device=self.device)
        self.graphs = None
        if cuda_graphs:
            from ttscale.backends.engine.cuda_graphs import GraphRunner

            self.graphs = GraphRunner(model, cache, step=self._decode_fn, state=lambda: [self.feed],
                                      capture_on_repeat=True)
        self.pad = self.graphs is not None
        self.overlap = overlap
        self.last_decode_jobs: dict[int, int] = {}
        self._spec: DecodePlan | None = None  # the next decode step, planned while the device runs this one
        self._layout: DecodeLayout | None = None  # the last decode plan's rows, from which the next is derived
        self._last_st: tuple[SamplingTensors, bool, int] | None = None  # and its sampling tensors
        self._inc: torch.Tensor | None = None
        self._slots: list[_HostSlot | None] = [None, None]
        self._slot = 0

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

    # ---- kernel compiles ---------------------------------------------------------------------------------
    def kinds_of_step(self, prompt: int = 128, max_branches: int = 64) -> None:
        """One forward and sampling of each kind the engine runs: a prompt's prefill (more rows than the
        few-row projection kernels take: the cuBLAS + SiLU path of long prompts), then decode steps of
        1, 2, 4 ... `max_branches` branches sharing it (padded as the graphs pad them: the attention tile
        grows with the branches that share a segment), each sampled with and without top-p. Run under
        `precompile.dry_launches` this compiles every Triton specialisation the engine's steps will meet
        (`Engine.precompile_kernels`); run for real it writes a few KV blocks and gives them back."""
        prompt = max(1, min(prompt, self.model.cfg.max_position - 2))
        parent = Sequence.new(self.cache)
        children: list[Sequence] = []
        try:
            try:
                self._forward_sample_both([ForwardItem(parent.views, [0] * prompt)], decode=False)
            except OutOfKVBlocks:  # a pool too small for the prompt: everything compiles at its first use
                return
            b = 1
            while b <= max_branches:
                try:
                    children += self.with_blocks(lambda: parent.fork(b - len(children)))  # noqa: B023
                    self._forward_sample_both([ForwardItem(c.views, [0]) for c in children], decode=True)
                except OutOfKVBlocks:  # a small pool: the larger tiles compile at their first use
                    break
                for c in children:  # the next step rewrites the same positions
                    c.write.length -= 1
                b *= 2
        finally:
            for c in children:
                c.release()
            parent.release()

    def _forward_sample_both(self, items: list[ForwardItem], decode: bool) -> None:
        """A forward and its sampling as a prefill (float logits) or a decode step (padded, the model's
        dtype: `_decode_fn`) runs them."""
        src = [-1] * len(items) if decode else None
        meta = self.with_blocks(lambda: self.model.build_meta(self.cache, items, pad=decode, src=src))
        logits = self.model.forward_meta(self.cache, meta, float_logits=not decode)
        n = logits.shape[0]
        for top_p in (1.0, 0.95):
            st = SamplingTensors.build([(0.7, top_p, 0, 0, 0)] * n, n, self.device)
            sample(logits, st, top_p < 1.0, 0)

    # ---- decode -----------------------------------------------------------------------------------------
    def plan(self, reqs: list[Request], tokens: list[int], src: list[int], ahead: list[int]) -> DecodePlan:
        """Plan one decode step of `reqs`: row i writes `tokens[i]`, or the previous decode step's sampled
        token of row `src[i]` when that is >= 0 (taken on device). Reserves each row's KV slot. Raises
        `OutOfKVBlocks` when a new block is needed and none is left after evicting cached prefixes."""
        seqs: list[Sequence] = [r.seq for r in reqs]  # type: ignore[misc]  # decoding: all have one
        lay, meta = self._layout, None
        if lay is not None and len(lay.views) == len(seqs) and all(
                s.views is v for s, v in zip(seqs, lay.views, strict=True)):
            meta = self.with_blocks(lambda: self.model.advance_meta(self.cache, lay, tokens, src))
        if meta is not None and self._last_st is not None:
            # the same rows one token on: their sampling rows differ only in the step, one more each
            st, filtered, n_top = self._last_st
            st = SamplingTensors(st.floats, st.ints + self._step_inc(st.ints), st.n)
        else:
            if meta is None:
                items = [ForwardItem(s.views, [t]) for s, t in zip(seqs, tokens, strict=True)]
                meta = self.with_blocks(lambda: self.model.build_meta(self.cache, items, pad=self.pad, src=src,
                                                                      record=True))
                self._layout = meta.layout
            rows, filtered, n_top = sampling_rows(reqs, ahead)
            st = SamplingTensors.build(rows, meta.n_tokens, self.device)
        self._last_st = (st, filtered, n_top)
        return DecodePlan(reqs, meta, [s.write for s in seqs], st, filtered, n_top)

    def _step_inc(self, ints: torch.Tensor) -> torch.Tensor:
        """[3, B] zeros with ones in the step row (cached per B): what one decode step adds to `ints`."""
        if self._inc is None or self._inc.shape != ints.shape:
            self._inc = torch.zeros_like(ints)
            self._inc[2] = 1
        return self._inc

    def undo(self, plan: DecodePlan) -> None:
        """Give back the KV slots a plan reserved (it will not be launched); the next plan is built anew."""
        for seg in plan.writes:
            seg.length -= 1
        self._layout, self._last_st = None, None

    def set_spec(self, plan: DecodePlan) -> None:
        self.drop_spec()
        self._spec = plan

    def take_spec_at(self, key: tuple) -> DecodePlan | None:
        """The plan prepared ahead when it was chosen under the same `key` (the rows cannot differ)."""
        spec = self._spec
        if spec is not None and spec.key == key:
            self._spec = None
            return spec
        return None

    def take_spec(self, reqs: list[Request]) -> DecodePlan | None:
        """The plan prepared ahead for exactly `reqs`, or None (and any prepared plan undone)."""
        spec, self._spec = self._spec, None
        if spec is not None and len(spec.reqs) == len(reqs) and all(
                a is b for a, b in zip(spec.reqs, reqs, strict=True)):
            return spec
        if spec is not None:
            self.undo(spec)
        return None

    def drop_spec(self) -> None:
        """Undo the plan prepared ahead (a command or a drain may have changed what the next step runs)."""
        if self._spec is not None:
            self.undo(self._spec)
            self._spec = None

    def _decode_fn(self, meta: AttnMeta, st: SamplingTensors, filtered: bool, n_top: int) -> Sampled:
        """Forward + sampling of one decode step (what the graphs capture): input tokens from `feed` where
        `meta.src` says so, the sampled tokens written back to `feed` for the next step."""
        if meta.src is not None:
            if self.model.kernels is not None:
                self.model.kernels.feed_tokens(meta.tokens, meta.src, self.feed)
            else:
                meta.tokens.copy_(torch.where(meta.src >= 0, self.feed[meta.src.clamp_min(0)], meta.tokens))
        logits = self.model.forward_meta(self.cache, meta, float_logits=False)
        out = sample(logits, st, filtered, n_top)
        self.feed[:out[0].shape[0]].copy_(out[0])
        return out

    def launch(self, plan: DecodePlan) -> Launched:
        """Run one planned decode step (a CUDA graph when captured) without waiting for it."""
        meta = plan.meta
        self.last_decode_jobs = meta.jobs_per_segment
        rows = meta.n_logits
        if rows > self.feed.shape[0]:  # a batch beyond FEED_ROWS: a bigger buffer, graphs captured anew
            self.feed = torch.zeros(2 * rows, dtype=torch.long, device=self.device)
            if self.graphs is not None:
                self.graphs.graphs.clear()
        if self.graphs is not None:
            out = self.graphs.run(meta, plan.st, plan.filtered, plan.n_top)
        else:
            out = self._decode_fn(meta, plan.st, plan.filtered, plan.n_top)
        n = len(plan.reqs)
        tok, lp, ti, tl = out
        if self.device.type != "cuda":
            return Launched(n, tok, lp, ti, tl)
        self._slot ^= 1
        slot = self._slots[self._slot]
        if slot is None or slot.rows < n or slot.n_top < plan.n_top:
            slot = self._slots[self._slot] = _HostSlot(max(n, 256), max(plan.n_top, 20 if plan.n_top else 0))
        slot.tok[:n].copy_(tok[:n], non_blocking=True)
        slot.lp[:n].copy_(lp[:n], non_blocking=True)
        tops: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        if ti is not None and tl is not None:
            k = ti.shape[1]
            slot.top_ids[:n, :k].copy_(ti[:n], non_blocking=True)
            slot.top_lps[:n, :k].copy_(tl[:n], non_blocking=True)
            tops = (slot.top_ids[:, :k], slot.top_lps[:, :k])
        event = torch.cuda.Event()
        event.record()
        return Launched(n, slot.tok, slot.lp, *tops, event=event)

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

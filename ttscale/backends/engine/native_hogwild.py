"""Hogwild! (arXiv 2504.06261) on our engine: W workers writing into one shared KV cache.

Segments: the prompt, finished steps (the common block, in finishing order), each worker's current step,
and header segments. Every step each worker's view is re-laid from the current lengths:
- "combined" (the authors' code): common, "work in progress (others)" header, the others' current steps
  (each but the last followed by the `<...>` pivot), the "(own)" header (which starts with the pivot), own
  current step;
- "contiguous": common, the others' current steps, own current step.
Keys stay at their local positions; the engine rotates each query per view offset, so nothing is
recomputed when the layout shifts. A token written by one worker is visible to the others at the next
step. A step ends at a blank line after sentence-ending punctuation: once that token is written, the
finished step segment (ending with it) moves into the common block and the worker opens a new step (its
indexed header, `**Alice [5]:** `; every >= `check_every` tokens the "Quick check" line); the token it
sampled in that same forward is dropped, since the header comes first. Banned tokens (the authors ban
EOS, BOS, `#` and `</think>`) get probability 0 in every worker's sampling, so no worker ends the shared
solution alone. Usage: one forward pass per step for every worker (sequential = steps).

`HogwildRun` is a native job (`native_common`): `steps()` yields, after every forward, the tokens each
worker kept (the forced final answer counts as worker 0's), so the engine steps it in its own loop and
the Context sees one branch per worker. When a worker's answer is complete is the strategy's call
(`HogwildSpec.answered`, a predicate over the worker's current step text); the engine imports no answer
extraction.

The run's inputs, worker state, outcome and the end-of-step rule are in `native_hogwild_spec`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ttscale.backends.engine.kv_cache import KVCache, Segment, View
from ttscale.backends.engine.model import ForwardItem, Model
from ttscale.backends.engine.native_common import (
    NativeRunBase,
    NativeStream,
    _cache_for,
    _graph_runner,
    _sample,
    apply_ban,
    ban_mask,
    set_banned,
)
from ttscale.backends.engine.native_hogwild_spec import (
    END_OF_STEP_CHARS,
    STEP_SEP,
    Decode,
    HogwildOutcome,
    HogwildSpec,
    WorkerState,
    hogwild_blocks,
    is_step_end,
)
from ttscale.backends.engine.sampler import SamplingTensors, sample
from ttscale.errors import ConfigError

if TYPE_CHECKING:
    from ttscale.backends.engine.cuda_graphs import GraphRunner

__all__ = [
    "END_OF_STEP_CHARS",
    "STEP_SEP",
    "Decode",
    "HogwildOutcome",
    "HogwildRun",
    "HogwildSpec",
    "WorkerState",
    "hogwild_blocks",
    "is_step_end",
]


@dataclass
class _Launched:
    """A Hogwild step queued on the device: who it is for, where it writes and how many tokens, its
    sampled tokens (on the device and, once `ready`, in host memory; CPU: `ready` is None)."""

    workers: tuple[int, ...]
    writes: list[Segment]
    counts: tuple[int, ...]
    tokens: torch.Tensor
    host: torch.Tensor
    ready: torch.cuda.Event | None

    def fits(self, live: list[WorkerState]) -> bool:
        """Whether this step is the one `live` needs now: same workers, segments and token counts."""
        return (self.workers == tuple(w.index for w in live)
                and self.counts == tuple(len(w.pending) for w in live)
                and all(w.step is s for w, s in zip(live, self.writes, strict=True)))


class HogwildRun(NativeRunBase):
    """W workers over one shared cache. `run()` returns a HogwildOutcome; see the module docstring.

    `decode` turns a worker's current step tokens into text for the step-boundary and `\\boxed{}` checks
    (None: no boundaries, no early stop; benchmarks). `on_step(step, worker, view_tokens, new_tokens,
    logits)` observes every worker's forward (tests compare against a plain forward of `view_tokens +
    new_tokens`). `pipelined` launches each step before the previous one's tokens reach the host
    (default: with CUDA graphs; on CPU it runs the same bookkeeping synchronously, which tests use).
    """

    def __init__(self, model: Model, spec: HogwildSpec, decode: Decode | None = None,
                 cache: KVCache | None = None, on_step=None, is_boundary=None,
                 cuda_graphs: bool | None = None, graphs: GraphRunner | None = None,
                 pipelined: bool | None = None, on_release: Callable[[], None] | None = None) -> None:
        if spec.workers < 1:
            raise ConfigError(f"Hogwild needs >= 1 worker (got {spec.workers})")
        if spec.layout not in ("combined", "contiguous"):
            raise ConfigError(f"unknown Hogwild layout {spec.layout!r} (combined | contiguous)")
        if not spec.prompt_ids:
            raise ConfigError("Hogwild needs a non-empty prompt")
        self.model, self.spec, self.decode, self.on_step = model, spec, decode, on_step
        self.is_boundary = is_boundary
        if cache is None:
            cache = graphs.cache if graphs is not None else _cache_for(model, 0, num_blocks=hogwild_blocks(spec))
        self.cache = cache
        self.pad = model.cfg.device.type == "cuda"
        self.graphs = _graph_runner(model, self.cache, cuda_graphs, graphs)
        if self.graphs is not None:
            self.ban = getattr(self.graphs, "ban", None)
            if self.ban is None and spec.banned_ids:
                raise ConfigError("banned_ids need a graph runner made by the native loops (this one has "
                                  "no ban mask)")
            if self.ban is not None:
                set_banned(self.ban, spec.banned_ids)
        else:
            self.ban = ban_mask(model, spec.banned_ids) if spec.banned_ids else None
        self.pipelined = (self.graphs is not None if pipelined is None else pipelined) and on_step is None
        self.segments: list[Segment] = []
        self._spec: _Launched | None = None  # the next step, launched ahead (pipelined)
        self.seg_tokens: dict[int, list[int]] = {}
        self.common: list[Segment] = []
        self.pivots: list[Segment] = []
        self.step_before_final: dict[int, int] = {}  # segment id -> its length before the finisher
        self.transcript: list[tuple[int, list[int]]] = []
        self.peak = 0
        self.forced = 0
        self.dropped = 0  # steps launched ahead and then discarded (a worker stopped)
        self.waited = 0.0  # seconds the host spent waiting for the GPU's tokens
        self.on_release = on_release  # called once when the run's segments are released (a lent runner)
        self.workers: list[WorkerState] = []
        self.forwards = 0
        self.answer_worker: int | None = None
        self.finish = "budget"
        self.final: list[int] = []
        self.streams = [NativeStream(f"worker{i}", spec.max_steps + (spec.final_tokens if i == 0 else 0))
                        for i in range(spec.workers)]
        self.blocks_hint = hogwild_blocks(spec, self.cache.block_size)

    @property
    def prompt_tokens(self) -> int:
        """The prompt and the headers and pivots prefilled after it."""
        sp = self.spec
        pivots = max(0, sp.workers - 2) if sp.layout == "combined" and sp.pivot else 0
        headers = len(sp.others_header) + len(sp.own_header) if sp.layout == "combined" else 0
        return len(sp.prompt_ids) + headers + len(sp.pivot) * pivots

    def _own_blocks(self) -> int:
        """KV blocks this run's segments hold (the cache may be the engine's, shared with other work)."""
        return sum(len(s.blocks) for s in self.segments)  # no two of its segments share a block

    # ---- layout -------------------------------------------------------------------------------------------
    def view(self, w: WorkerState, workers: list[WorkerState]) -> list[View]:
        """The worker's view now: see the module docstring for the two layouts."""
        segs: list[Segment] = list(self.common)
        others = [o.step for o in workers if o is not w]
        if self.spec.layout == "combined":
            segs.append(self.hdr_others)
            for j, o in enumerate(others):
                segs.append(o)
                if j < len(others) - 1 and j < len(self.pivots):
                    segs.append(self.pivots[j])
            segs.append(self.hdr_own)
        else:
            segs += others
        segs.append(w.step)
        views, off = [], 0
        for s in segs:
            views.append(View(s, off))
            off += s.length
        return views

    def _new_segment(self, tokens: list[int] | None = None) -> Segment:
        seg = self.cache.new_segment()
        self.segments.append(seg)
        self.seg_tokens[seg.id] = [] if tokens is None else tokens
        return seg

    def _prefill(self, views: list[View], ids: list[int]) -> None:
        self.model.forward(self.cache, [ForwardItem(views, ids, logits="none")])
        self.seg_tokens[views[-1].segment.id].extend(ids)

    # ---- the loop ----------------------------------------------------------------------------------------
    def run(self) -> HogwildOutcome:
        """Drive `steps()` to the end in this thread."""
        for _ in self.steps():
            pass
        return self.outcome()

    def steps(self) -> Generator[list[tuple[int, list[int]]], None, None]:
        """One forward per `next()`, yielding `(worker, kept tokens)`; closing it releases the run's KV."""
        try:
            with torch.inference_mode():
                yield from self._steps()
        finally:
            self.release()

    def release(self) -> None:
        """Release the run's segments (the cache and its captured graphs can serve the next run) and call
        `on_release` once."""
        self._spec = None
        for seg in self.segments:
            seg.release()
        self.segments = []
        if self.on_release is not None:
            self.on_release()
            self.on_release = None

    def _pipelined_step(self, live: list[WorkerState], workers: list[WorkerState],
                        rows: list[tuple[float, float, int, int, int]],
                        more: bool) -> tuple[list[int], set[int]]:
        """One step, pipelined: before waiting for this step's tokens, the next step is launched with the
        layout it will have (steps ending now already moved; every other worker appends the token it is
        sampling now, copied on the device). The host reads this step's tokens while the device runs the
        next. The guess fails only when a worker stops (EOS, boxed answer, budget): `_drop_spec` gives its
        slots back and the step is built again. Returns the tokens and the workers whose step ended."""
        ahead, self._spec = self._spec, None
        if ahead is not None and ahead.fits(live):
            cur = ahead
        else:
            if ahead is not None:
                self._drop_spec(ahead)
            items = [ForwardItem(self.view(w, workers), list(w.pending), write=w.step) for w in live]
            cur = self._launch(live, items, rows)
        self._wrote(live)
        closed = self._close_steps(live)
        if more:
            items, copies, row = [], [], 0
            for j, w in enumerate(live):
                forced = w.index in closed and w.pending  # the new step's header is written next
                toks = list(w.pending) if forced else [0]
                if not forced:
                    copies.append((row, j))
                items.append(ForwardItem(self.view(w, workers), toks, write=w.step))
                row += len(toks)
            self._spec = self._launch(live, items, [r[:4] + (r[4] + 1,) for r in rows], (cur.tokens, copies))
        if cur.ready is not None:
            t0 = time.perf_counter()
            cur.ready.synchronize()
            self.waited += time.perf_counter() - t0
        return cur.host.tolist(), closed

    def _launch(self, live: list[WorkerState], items: list[ForwardItem], rows,
                sampled: tuple[torch.Tensor, list[tuple[int, int]]] | None = None) -> _Launched:
        """Queue one step: metadata from `items`, forward and sampling (a CUDA graph, or run synchronously
        without graphs). `sampled = (tokens, [(row, j)])` fills input rows with tokens sampled on the device
        by the step before (item j's token goes to row `row`), without a trip through the host."""
        meta = self.model.build_meta(self.cache, items, pad=self.pad)
        if sampled is not None:
            tokens, copies = sampled
            flat = meta.flat
            assert flat is not None  # build_meta always lays the step out in one flat tensor
            if len(copies) == len(items):  # every item is one sampled token: rows 0..n-1
                flat[:len(items)].copy_(tokens[:len(items)])
            else:
                for row, j in copies:
                    flat[row:row + 1].copy_(tokens[j:j + 1])
        st = SamplingTensors.build(rows, meta.logits_idx.shape[0], self.model.cfg.device)
        filtered = any(r[1] < 1.0 or r[2] > 0 for r in rows)
        who = (tuple(w.index for w in live), [w.step for w in live], tuple(len(it.tokens) for it in items))
        if self.graphs is None:
            logits = apply_ban(self.model.forward_meta(self.cache, meta), self.ban)
            tokens = sample(logits, st, filtered, 0)[0]
            return _Launched(*who, tokens, tokens[:len(live)], None)
        tokens = self.graphs.run(meta, st, filtered, 0)[0]
        host = torch.empty(len(live), dtype=torch.long, pin_memory=True)
        host.copy_(tokens[:len(live)], non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Launched(*who, tokens, host, ready)

    def _drop_spec(self, spec: _Launched | None = None) -> None:
        """Give back the token slots each write segment took for a step launched ahead; the discarded
        step's K/V there is masked (frozen segment) or overwritten by the step that replaces it."""
        spec, self._spec = spec or self._spec, None
        if spec is not None:
            self.dropped += 1
            for seg, n in zip(spec.writes, spec.counts, strict=True):
                seg.length -= n

    def _wrote(self, live: list[WorkerState]) -> None:
        """Record the tokens this step writes (each worker's pending ones) in their segments' text."""
        for w in live:
            self.seg_tokens[w.step.id].extend(w.pending)

    def _close_steps(self, live: list[WorkerState]) -> set[int]:
        """Move the steps whose last token (the boundary) this step wrote into the common block."""
        closed = set()
        for w in live:
            if w.closing:
                w.closing = False
                self._end_step(w)
                closed.add(w.index)
        return closed

    def _steps(self) -> Iterator[list[tuple[int, list[int]]]]:
        sp = self.spec
        W = sp.workers
        prompt = self._new_segment()
        self._prefill([View(prompt, 0)], sp.prompt_ids)
        prompt.frozen = True
        self.common.append(prompt)
        self.transcript.append((-1, list(sp.prompt_ids)))
        self.hdr_others = self._new_segment()
        self.hdr_own = self._new_segment()
        if sp.layout == "combined":
            for hdr, ids in ((self.hdr_others, sp.others_header), (self.hdr_own, sp.own_header)):
                if ids:
                    self._prefill([View(prompt, 0), View(hdr, prompt.length)], ids)
                hdr.frozen = True
        if sp.layout == "combined" and sp.pivot:
            for _ in range(W - 2):
                seg = self._new_segment()
                self._prefill([View(prompt, 0), View(seg, prompt.length)], sp.pivot)
                seg.frozen = True
                self.pivots.append(seg)
        workers = [WorkerState(i, self._new_segment(), list(sp.first_step[i]) if i < len(sp.first_step)
                               else self._step_header(i, 0, 1)) for i in range(W)]
        self.workers = workers
        for w in workers:
            w.step_tokens = list(w.pending)
        self.forced += sum(len(w.pending) for w in workers)
        self.finish = "budget"
        eos = set() if sp.ignore_eos else set(sp.eos_ids)
        answered = sp.answered if sp.stop_on_boxed and self.decode is not None else None
        while self.forwards < sp.max_steps:
            live = [w for w in workers if not w.done]
            if not live:
                self.finish = "eos"
                break
            rows = [(sp.sampling.temperature, sp.sampling.top_p, sp.sampling.top_k,
                     sp.sampling.seed * 1009 + w.index, w.sampled) for w in live]
            if self.pipelined:
                toks, closed = self._pipelined_step(live, workers, rows, more=self.forwards + 1 < sp.max_steps)
            else:
                views_of = [self.view(w, workers) for w in live]
                if self.on_step is not None:
                    news = [list(w.pending) for w in live]
                    snap = [[t for v in vs[:-1] for t in self.seg_tokens[v.segment.id][:v.segment.length]]
                            + self.seg_tokens[vs[-1].segment.id][:vs[-1].segment.length] for vs in views_of]
                items = [ForwardItem(vs, list(w.pending), write=w.step) for w, vs in zip(live, views_of, strict=True)]
                logits = torch.cat(self.model.forward(self.cache, items, pad=self.pad))
                toks = _sample(self.model, logits, rows, self.ban)[0]
                self._wrote(live)
                closed = self._close_steps(live)
                if self.on_step is not None:
                    for j, w in enumerate(live):
                        self.on_step(self.forwards, w.index, snap[j], news[j], logits[j])
            self.forwards += 1
            self.peak = max(self.peak, self._own_blocks())
            kept: list[tuple[int, list[int]]] = []
            for w, tok in zip(live, toks, strict=True):
                w.forwards += 1
                w.sampled += 1
                if w.index in closed and w.pending:
                    continue  # sampled before its step ended: the new step's header comes first
                if tok in eos:
                    w.done = True
                    w.pending = []
                    continue
                w.tokens.append(tok)
                w.step_tokens.append(tok)
                w.since_check += 1
                w.pending = [tok]
                w.closing = self._boundary(w)
                kept.append((w.index, [tok]))
            if answered is not None:
                assert self.decode is not None
                self.answer_worker = next((w.index for w in live if not w.done
                                           and answered(self.decode(w.step_tokens))), None)
            if any(w.done for w in live) or self.answer_worker is not None:
                self._drop_spec()
            yield kept
            if self.answer_worker is not None:
                self.finish = "boxed"
                break
        self._drop_spec()
        if self.answer_worker is None and sp.final_ids:
            yield from self._force_final(workers)

    def outcome(self) -> HogwildOutcome:
        """What the run wrote so far (all of it once `steps()` is exhausted)."""
        sp = self.spec
        transcript = list(self.transcript)
        for w in self.workers:  # unfinished steps go to the transcript after the common block
            toks = self.seg_tokens.get(w.step.id, []) + (w.pending if not w.done else [])
            if w.step.id in self.step_before_final:  # the finisher is `final_tokens`, not the worker's step
                toks = toks[:self.step_before_final[w.step.id]]
            if toks:
                transcript.append((w.index, toks))
        final = self.final
        return HogwildOutcome(
            worker_tokens=[list(w.tokens) for w in self.workers] or [[] for _ in range(sp.workers)],
            transcript=transcript, answer_worker=self.answer_worker,
            final_tokens=list(final), forwards=self.forwards,
            generated=sum(len(w.tokens) for w in self.workers) + len(final),
            forced=self.forced, prompt_tokens=self.prompt_tokens,
            peak_blocks=self.peak, finish=self.finish,
        )

    def _step_header(self, i: int, since_check: int, index: int) -> list[int]:
        """Worker i's header for its step number `index` (from 1), with the quick check when due."""
        sp = self.spec
        if sp.step_header is not None:
            ids = list(sp.step_header(i, index))
        else:
            ids = list(sp.step_prefix[i]) if i < len(sp.step_prefix) else []
        if sp.check_ids and since_check >= sp.check_every:
            ids += list(sp.check_ids)
        return ids

    def _boundary(self, w: WorkerState) -> bool:
        if self.is_boundary is not None:
            return self.is_boundary(w.step_tokens)
        if self.decode is None or not w.step_tokens:
            return False
        return is_step_end(self.decode(w.step_tokens), self.decode(w.step_tokens[-1:]))

    def _end_step(self, w: WorkerState) -> None:
        """Move the worker's finished step (ending with the boundary token, just written) into the common
        block and open its next step with the worker's header (and the quick check when due).

        The token the worker sampled in the same forward is dropped when a header follows: it was drawn
        before the header. Keeping the boundary in the finished step keeps the steps launched ahead valid
        (the layout changes only for what comes after) and the blank line between steps in the common block.
        """
        old = w.step
        old.frozen = True
        self.common.append(old)
        self.transcript.append((w.index, list(self.seg_tokens[old.id])))
        w.steps_done += 1
        check = w.since_check >= self.spec.check_every
        header = self._step_header(w.index, w.since_check, w.steps_done + 1)
        if check:
            w.since_check = 0
        w.step = self._new_segment()
        w.pending = header
        self.forced += len(header)
        w.step_tokens = list(header)

    def _force_final(self, workers: list[WorkerState]) -> Iterator[list[tuple[int, list[int]]]]:
        """At the step limit: worker 0 writes the final-answer prompt and decodes greedily, one forward per
        `next()`; its tokens go to `self.final` (and to worker 0's stream)."""
        sp = self.spec
        w = workers[0]
        pending = (list(w.pending) if not w.done else []) + list(sp.final_ids)
        self.step_before_final[w.step.id] = len(self.seg_tokens[w.step.id]) + len(pending) - len(sp.final_ids)
        self.forced += len(sp.final_ids)
        eos = set(sp.eos_ids)
        answered = sp.answered if sp.stop_on_boxed and self.decode is not None else None
        for _ in range(sp.final_tokens):
            views = self.view(w, workers)
            [lg] = self.model.forward(self.cache, [ForwardItem(views, pending, write=w.step)], pad=self.pad)
            self.forwards += 1
            self.peak = max(self.peak, self._own_blocks())
            self.seg_tokens[w.step.id].extend(pending)
            tok = int(lg[-1].argmax())
            if tok in eos:
                break
            self.final.append(tok)
            pending = [tok]
            yield [(w.index, [tok])]
            if answered is not None and self.decode is not None and answered(self.decode(sp.final_ids + self.final)):
                break
        w.pending = []

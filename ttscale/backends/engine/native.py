"""Driver loops for strategies that lay out KV themselves: Hogwild! workers and ParaThinker paths.

Both run directly on `Model.forward` over a `KVCache` of their own (the engine thread owns the engine's
cache), batch every live worker / path into one forward per step, and sample on device
(`sampler.sample`, counter-based seeds: a worker's draw depends only on its logits, seed and step).

Hogwild! (arXiv 2504.06261): W workers share one cache. Segments: the prompt, finished steps (the common
block, in finishing order), each worker's current step, and two header segments. Every step each worker's
view is re-laid from the current lengths:
- "combined" (the authors' code): common, "work in progress (others)" header, the others' current steps,
  "(own)" header, own current step;
- "contiguous": common, the others' current steps, own current step.
Keys stay at their local positions; the engine rotates each query per view offset, so nothing is
recomputed when the layout shifts. A token written by one worker is visible to the others at the next
step. A step ends at a blank line after sentence-ending punctuation: once that token is written, the
finished step segment (ending with it) moves into the common block and the worker opens a new step (name
header; every >= `check_every` tokens the "Quick check" line); the token it sampled in that same forward
is dropped, since the header comes first. Usage: one forward pass per step for every worker
(sequential = steps).

ParaThinker (arXiv 2509.04475): P paths forked from one prompt segment, each at the same offset right
after the prompt (positions restart), each forced to start with its control token; segments carry
segment ids (0 prompt/summary, i path i) for the checkpoint's segment embeddings. The think stage ends
when `finish_share` of the paths finished; the summary segment then views the prompt and every path
(no re-prefill) at an offset after the longest path, starting with the forced summary prefix.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from ttscale.backends.engine.kv_cache import KVCache, Segment, View
from ttscale.backends.engine.model import ForwardItem, Model
from ttscale.backends.engine.sampler import SamplingTensors, sample
from ttscale.errors import ConfigError

if TYPE_CHECKING:
    from ttscale.backends.engine.cuda_graphs import GraphRunner

STEP_END = re.compile(r"[.!?。][\"')\]*]*[ \t]*\n[ \t]*\n\s*$")

Decode = Callable[[list[int]], str]


def is_step_end(text: str) -> bool:
    """A Hogwild step ends at a blank line after sentence-ending punctuation."""
    return STEP_END.search(text) is not None


@dataclass
class SamplingRow:
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0


def _sample(model: Model, logits: torch.Tensor, rows: list[tuple[float, float, int, int, int]]):
    st = SamplingTensors.build(rows, len(rows), model.cfg.device)
    filtered = any(r[1] < 1.0 or r[2] > 0 for r in rows)
    tok, lp, _, _ = sample(logits, st, filtered, 0)
    return tok.tolist(), lp.tolist()


def _graph_runner(model: Model, cache: KVCache, cuda_graphs: bool | None, graphs: GraphRunner | None):
    """The CUDA-graph runner a native loop decodes with: `graphs` as given (on the loop's cache), a new one
    on CUDA (or when `cuda_graphs` asks), None on CPU or when `cuda_graphs` is False."""
    if graphs is not None:
        if graphs.cache is not cache:
            raise ConfigError("the graph runner must capture on the same KV cache the run writes")
        return graphs
    on_cuda = model.cfg.device.type == "cuda"
    if cuda_graphs is None:
        cuda_graphs = on_cuda
    if not cuda_graphs:
        return None
    if not on_cuda:
        raise ConfigError("CUDA graphs need the model on a CUDA device")
    from ttscale.backends.engine.cuda_graphs import GraphRunner

    return GraphRunner(model, cache)


def _blocks_for(tokens_hint: int, block_size: int = 16) -> int:
    return max(64, 2 * (tokens_hint // block_size + 8))


def _cache_for(model: Model, tokens_hint: int, block_size: int = 16, num_blocks: int | None = None) -> KVCache:
    if num_blocks is None:
        num_blocks = _blocks_for(tokens_hint, block_size)
    return KVCache.for_model(model.cfg, num_blocks=num_blocks, block_size=block_size)


class Workspaces:
    """KV caches (with their CUDA-graph runners) kept between native runs on one model, so that a second
    problem replays the graphs the first one captured instead of capturing (and allocating) again.

    `take(num_blocks)` lends a free workspace at least that large, or makes one; concurrent runs get
    different workspaces. `for_model(model)` is the pool of a model, kept on the model itself so that it
    lives and dies with it (a global map would keep every model alive through its graph runners).
    """

    _pools_lock = threading.Lock()

    def __init__(self, model: Model) -> None:
        self.model = model
        self._free: list[tuple[KVCache, GraphRunner | None]] = []
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, model: Model) -> Workspaces:
        with cls._pools_lock:
            pool = getattr(model, "_native_workspaces", None)
            if pool is None:
                pool = cls(model)
                model._native_workspaces = pool  # type: ignore[attr-defined]
            return pool

    @contextlib.contextmanager
    def take(self, num_blocks: int) -> Iterator[tuple[KVCache, GraphRunner | None]]:
        with self._lock:
            # the most recently returned one that fits: its graphs are the likeliest to match
            ws = next((w for w in reversed(self._free) if w[0].pool.num_blocks >= num_blocks), None)
            if ws is not None:
                self._free.remove(ws)
        if ws is None:
            cache = KVCache.for_model(self.model.cfg, num_blocks=_pow2_at_least(num_blocks))
            ws = (cache, _graph_runner(self.model, cache, None, None))
        try:
            yield ws
        finally:
            with self._lock:
                self._free.append(ws)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# ------------------------------------------------------------------------------------------------ Hogwild


@dataclass
class HogwildSpec:
    """Inputs of one Hogwild run, all as token ids (the strategy builds them from text)."""

    prompt_ids: list[int]
    workers: int = 2
    layout: Literal["combined", "contiguous"] = "combined"
    max_steps: int = 512
    others_header: list[int] = field(default_factory=list)
    own_header: list[int] = field(default_factory=list)
    step_prefix: list[list[int]] = field(default_factory=list)  # per worker, e.g. "Alice: "
    check_ids: list[int] = field(default_factory=list)  # "Quick check: am I doing redundant work? (yes/no): "
    check_every: int = 256
    final_ids: list[int] = field(default_factory=list)  # "... final answer is \boxed{"
    final_tokens: int = 16
    sampling: SamplingRow = field(default_factory=SamplingRow)
    eos_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stop_on_boxed: bool = True


@dataclass
class WorkerState:
    index: int
    step: Segment
    pending: list[int]
    tokens: list[int] = field(default_factory=list)  # every token this worker wrote or will write
    step_tokens: list[int] = field(default_factory=list)
    since_check: int = 0
    forwards: int = 0
    sampled: int = 0
    done: bool = False
    steps_done: int = 0
    closing: bool = False  # the pending token ends the step: once written, the step moves to the common block


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
        return (self.workers == tuple(w.index for w in live) and self.counts == tuple(len(w.pending) for w in live)
                and all(w.step is s for w, s in zip(live, self.writes)))


@dataclass
class HogwildOutcome:
    worker_tokens: list[list[int]]
    transcript: list[tuple[int, list[int]]]  # (worker or -1 for prompt/final, tokens) in common order
    answer_worker: int | None
    final_tokens: list[int]
    forwards: int  # sequential forward passes (steps)
    generated: int  # sampled tokens, all workers
    forced: int  # forced tokens (headers, quick checks, final prompt)
    prompt_tokens: int
    peak_blocks: int
    finish: str  # "boxed" | "eos" | "budget"


class HogwildRun:
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
                 pipelined: bool | None = None) -> None:
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
        self.pipelined = (self.graphs is not None if pipelined is None else pipelined) and on_step is None
        self.segments: list[Segment] = []
        self._spec: _Launched | None = None  # the next step, launched ahead (pipelined)
        self.seg_tokens: dict[int, list[int]] = {}
        self.common: list[Segment] = []
        self.transcript: list[tuple[int, list[int]]] = []
        self.peak = 0
        self.forced = 0
        self.dropped = 0  # steps launched ahead and then discarded (a worker stopped)
        self.waited = 0.0  # seconds the host spent waiting for the GPU's tokens

    # ---- layout -------------------------------------------------------------------------------------------
    def view(self, w: WorkerState, workers: list[WorkerState]) -> list[View]:
        """The worker's view now: see the module docstring for the two layouts."""
        segs: list[Segment] = list(self.common)
        others = [o.step for o in workers if o is not w]
        if self.spec.layout == "combined":
            segs += [self.hdr_others] + others + [self.hdr_own]
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
    @torch.inference_mode()
    def run(self) -> HogwildOutcome:
        try:
            return self._run()
        finally:
            for seg in self.segments:  # the cache (and its captured graphs) can serve the next run
                seg.release()
            self.segments = []

    def _pipelined_step(self, live: list[WorkerState], workers: list[WorkerState],
                        rows: list[tuple[float, float, int, int, int]], more: bool) -> tuple[list[int], set[int]]:
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
            if len(copies) == len(items):  # every item is one sampled token: rows 0..n-1
                meta.flat[:len(items)].copy_(tokens[:len(items)])
            else:
                for row, j in copies:
                    meta.flat[row:row + 1].copy_(tokens[j:j + 1])
        st = SamplingTensors.build(rows, meta.logits_idx.shape[0], self.model.cfg.device)
        filtered = any(r[1] < 1.0 or r[2] > 0 for r in rows)
        who = (tuple(w.index for w in live), [w.step for w in live], tuple(len(it.tokens) for it in items))
        if self.graphs is None:
            tokens = sample(self.model.forward_meta(self.cache, meta), st, filtered, 0)[0]
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
            for seg, n in zip(spec.writes, spec.counts):
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

    def _run(self) -> HogwildOutcome:
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
        workers = [WorkerState(i, self._new_segment(), self._step_header(i, 0)) for i in range(W)]
        self.forced += sum(len(w.pending) for w in workers)
        answer_worker, finish = None, "budget"
        forwards = 0
        eos = set() if sp.ignore_eos else set(sp.eos_ids)
        while forwards < sp.max_steps:
            live = [w for w in workers if not w.done]
            if not live:
                finish = "eos"
                break
            rows = [(sp.sampling.temperature, sp.sampling.top_p, sp.sampling.top_k,
                     sp.sampling.seed * 1009 + w.index, w.sampled) for w in live]
            if self.pipelined:
                toks, closed = self._pipelined_step(live, workers, rows, more=forwards + 1 < sp.max_steps)
            else:
                views_of = [self.view(w, workers) for w in live]
                if self.on_step is not None:
                    news = [list(w.pending) for w in live]
                    snap = [[t for v in vs[:-1] for t in self.seg_tokens[v.segment.id][:v.segment.length]]
                            + self.seg_tokens[vs[-1].segment.id][:vs[-1].segment.length] for vs in views_of]
                items = [ForwardItem(vs, list(w.pending), write=w.step) for w, vs in zip(live, views_of)]
                logits = torch.cat(self.model.forward(self.cache, items, pad=self.pad))
                toks = _sample(self.model, logits, rows)[0]
                self._wrote(live)
                closed = self._close_steps(live)
                if self.on_step is not None:
                    for j, w in enumerate(live):
                        self.on_step(forwards, w.index, snap[j], news[j], logits[j])
            forwards += 1
            self.peak = max(self.peak, self.cache.pool.num_used)
            for w, tok in zip(live, toks):
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
            if sp.stop_on_boxed and self.decode is not None:
                for w in live:
                    if not w.done and _boxed_closed(self.decode(w.step_tokens)):
                        answer_worker = w.index
                        break
                if answer_worker is not None:
                    finish = "boxed"
                    break
            if any(w.done for w in live):
                self._drop_spec()
        self._drop_spec()
        final: list[int] = []
        if answer_worker is None and sp.final_ids:
            final, n = self._force_final(workers)
            forwards += n
        for w in workers:  # unfinished steps go to the transcript after the common block
            toks = self.seg_tokens[w.step.id] + (w.pending if not w.done else [])
            if toks:
                self.transcript.append((w.index, toks))
        return HogwildOutcome(
            worker_tokens=[w.tokens for w in workers], transcript=self.transcript, answer_worker=answer_worker,
            final_tokens=final, forwards=forwards, generated=sum(len(w.tokens) for w in workers) + len(final),
            forced=self.forced, prompt_tokens=len(sp.prompt_ids) + len(sp.others_header) + len(sp.own_header),
            peak_blocks=self.peak, finish=finish,
        )

    def _step_header(self, i: int, since_check: int) -> list[int]:
        sp = self.spec
        ids = list(sp.step_prefix[i]) if i < len(sp.step_prefix) else []
        if sp.check_ids and since_check >= sp.check_every:
            ids += list(sp.check_ids)
        return ids

    def _boundary(self, w: WorkerState) -> bool:
        if self.is_boundary is not None:
            return self.is_boundary(w.step_tokens)
        return self.decode is not None and is_step_end(self.decode(w.step_tokens))

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
        header = self._step_header(w.index, w.since_check)
        if check:
            w.since_check = 0
        w.step = self._new_segment()
        w.pending = header
        self.forced += len(header)
        w.step_tokens = list(header)

    def _force_final(self, workers: list[WorkerState]) -> tuple[list[int], int]:
        """At the budget limit: worker 0 writes the final-answer prompt and decodes greedily.

        Returns the generated tokens and the number of forward passes."""
        sp = self.spec
        w = workers[0]
        pending = (list(w.pending) if not w.done else []) + list(sp.final_ids)
        self.forced += len(sp.final_ids)
        out: list[int] = []
        eos = set(sp.eos_ids)
        n = 0
        for _ in range(sp.final_tokens):
            views = self.view(w, workers)
            [lg] = self.model.forward(self.cache, [ForwardItem(views, pending, write=w.step)], pad=self.pad)
            n += 1
            self.seg_tokens[w.step.id].extend(pending)
            tok = int(lg[-1].argmax())
            if tok in eos:
                break
            out.append(tok)
            pending = [tok]
            if self.decode is not None and _boxed_closed(self.decode(sp.final_ids + out)):
                break
        w.pending = []
        return out, n


def hogwild_blocks(spec: HogwildSpec, block_size: int = 16) -> int:
    """KV blocks a Hogwild run of `spec` may use (prompt, every worker's steps and headers, the final)."""
    W = spec.workers
    hint = len(spec.prompt_ids) + W * (spec.max_steps + 64) + 4 * W * (len(spec.check_ids) + 16)
    return _blocks_for(hint + len(spec.final_ids) + spec.final_tokens, block_size)


def _boxed_closed(text: str) -> bool:
    from ttscale.answers import extract_boxed

    return "boxed" in text and extract_boxed(text) is not None


# ---------------------------------------------------------------------------------------------- ParaThinker


@dataclass
class ParaThinkerSpec:
    prompt_ids: list[int]
    paths: int = 4
    path_starts: list[list[int]] = field(default_factory=list)  # per path forced start (<think_i>)
    summary_prefix: list[int] = field(default_factory=list)  # forced "<summary>...The final answer is"
    max_think: int = 1024
    max_summary: int = 256
    finish_share: float = 0.1
    end_ids: list[int] = field(default_factory=list)  # a path / the summary ends on these
    sampling: SamplingRow = field(default_factory=SamplingRow)
    summary_sampling: SamplingRow | None = None
    use_segment_ids: bool = True


@dataclass
class ParaThinkerOutcome:
    path_tokens: list[list[int]]  # everything written per path (forced start included)
    path_finished: list[bool]
    summary_tokens: list[int]  # generated after the forced prefix
    summary_finished: bool
    think_forwards: int
    summary_forwards: int
    prompt_tokens: int
    written: dict[str, int]  # tokens written into the cache per stage (prompt, think, summary)
    summary_offset: int
    peak_blocks: int


def parathinker_run(model: Model, spec: ParaThinkerSpec, cache: KVCache | None = None,
                    on_summary=None) -> ParaThinkerOutcome:
    """Run ParaThinker's two stages; see the module docstring. `on_summary(tokens, logits)` observes the
    summary's forwards (tests)."""
    P = spec.paths
    if P < 1:
        raise ConfigError(f"ParaThinker needs >= 1 path (got {P})")
    if not 0 < spec.finish_share <= 1:
        raise ConfigError(f"finish_share must be in (0, 1] (got {spec.finish_share})")
    hint = len(spec.prompt_ids) + P * (spec.max_think + 16) + spec.max_summary + len(spec.summary_prefix) + 64
    cache = cache or _cache_for(model, hint + P * 32)
    sid = (lambda i: i) if spec.use_segment_ids else (lambda i: None)
    written = {"prompt": 0, "think": 0, "summary": 0}
    segs: list[Segment] = []
    with torch.inference_mode():
        prompt = cache.new_segment(embed_id=sid(0))
        model.forward(cache, [ForwardItem([View(prompt, 0)], spec.prompt_ids, logits="none")])
        written["prompt"] = len(spec.prompt_ids)
        prompt.frozen = True
        L = prompt.length
        paths = [cache.new_segment(embed_id=sid(i + 1)) for i in range(P)]
        segs = [prompt, *paths]
        toks: list[list[int]] = [[] for _ in range(P)]
        pending: list[list[int]] = [list(spec.path_starts[i]) if i < len(spec.path_starts) else [] for i in range(P)]
        finished = [False] * P
        sampled = [0] * P
        need = max(1, math.ceil(spec.finish_share * P))
        end = set(spec.end_ids)
        s = spec.sampling
        forwards = 0
        peak = 0
        if any(not p for p in pending):
            raise ConfigError("every ParaThinker path needs a forced start (its control token)")
        while forwards < spec.max_think and sum(finished) < need:
            live = [i for i in range(P) if not finished[i]]
            items = []
            for i in live:
                items.append(ForwardItem([View(prompt, 0), View(paths[i], L)], pending[i], write=paths[i]))
            logits = torch.cat(model.forward(cache, items))
            forwards += 1
            peak = max(peak, cache.pool.num_used)
            rows = [(s.temperature, s.top_p, s.top_k, s.seed * 1009 + i, sampled[i]) for i in live]
            new, _ = _sample(model, logits, rows)
            for i, tok in zip(live, new):
                toks[i].extend(pending[i])
                written["think"] += len(pending[i])
                sampled[i] += 1
                if tok in end:
                    finished[i] = True
                    pending[i] = []
                else:
                    pending[i] = [tok]
        for p in paths:
            p.frozen = True
        offset = L + max(p.length for p in paths)
        summ = cache.new_segment(embed_id=sid(0))
        views = [View(prompt, 0)] + [View(p, L) for p in paths] + [View(summ, offset)]
        segs.append(summ)
        ss = spec.summary_sampling or SamplingRow(0.0, 1.0, 0, s.seed)
        out: list[int] = []
        done = False
        cur = list(spec.summary_prefix)
        if not cur:
            raise ConfigError("the ParaThinker summary needs a forced prefix (<summary>...)")
        sforwards = 0
        for t in range(spec.max_summary + 1):
            [lg] = model.forward(cache, [ForwardItem(views, cur, logits="all" if t == 0 else "last")])
            written["summary"] += len(cur)
            sforwards += 1
            peak = max(peak, cache.pool.num_used)
            if on_summary is not None:
                on_summary(list(cur), lg)
            if t == spec.max_summary:
                break
            [tok], _ = _sample(model, lg[-1:], [(ss.temperature, ss.top_p, ss.top_k, ss.seed * 7 + 1, t)])
            if tok in end:
                done = True
                break
            out.append(tok)
            cur = [tok]
        outcome = ParaThinkerOutcome(
            path_tokens=toks, path_finished=finished, summary_tokens=out, summary_finished=done,
            think_forwards=forwards, summary_forwards=sforwards, prompt_tokens=len(spec.prompt_ids),
            written=written, summary_offset=offset, peak_blocks=peak,
        )
    for sg in segs:
        sg.release()
    return outcome


# ------------------------------------------------------------------------------------ checkpoint helpers


SEGMENT_KEYS = ("self_attn.segment_k_embed.weight", "self_attn.segment_v_embed.weight")


def load_segment_embeddings(folder, num_layers: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """ParaThinker segment embeddings from a checkpoint folder, `[layers, ids, kv_heads*head_dim]` each.

    Assumed layout (the ParaThinker weights' names are not public to us): per layer
    `model.layers.{i}.self_attn.segment_k_embed.weight` and `...segment_v_embed.weight` `[ids, kv_dim]`.
    None when the checkpoint has none.
    """
    from pathlib import Path

    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    found: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open handles are not mappings
                if "segment_k_embed" in k or "segment_v_embed" in k:
                    found[k] = h.get_tensor(k)
    if not found:
        return None
    ks, vs = [], []
    for i in range(num_layers):
        kk = [v for k, v in found.items() if f"layers.{i}.{SEGMENT_KEYS[0]}" in k]
        vv = [v for k, v in found.items() if f"layers.{i}.{SEGMENT_KEYS[1]}" in k]
        if not kk or not vv:
            raise ConfigError(f"segment embeddings missing for layer {i} in {folder}")
        ks.append(kk[0])
        vs.append(vv[0])
    return torch.stack(ks), torch.stack(vs)


def control_token_ids(tokenizer, paths: int) -> tuple[list[int], int] | None:
    """(`<think1>`..`<thinkP>` ids, `<summary>` id) when the tokenizer has them as single tokens."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    names = [f"<think{i}>" for i in range(1, paths + 1)] + ["<summary>"]
    if not all(n in vocab for n in names):
        return None
    ids = [vocab[n] for n in names]
    return ids[:-1], ids[-1]


__all__ = [
    "HogwildOutcome", "HogwildRun", "HogwildSpec", "ParaThinkerOutcome", "ParaThinkerSpec", "SamplingRow",
    "Workspaces", "control_token_ids", "hogwild_blocks", "is_step_end", "load_segment_embeddings", "parathinker_run",
]

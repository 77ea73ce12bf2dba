"""The engine: the request API, the command queue and the step loop.

Everything that touches the KV cache runs on the engine's own thread (`start()`), or in the caller's
thread when driven by `step()` / `generate()` directly (tests, benchmarks). Other threads talk to it
through commands (`add_request`, `abort`, `fork`) that take effect at the start of the next step, so an
aborted request's blocks are free after the next step and a fork copies the branch exactly as it was
after the last step.

Decode steps run one ahead (with `overlap`, the default): step i+1 is launched before step i's tokens are
read on the host, its input tokens taken on device from step i's samples, so the host's work per step
(reading tokens, detokenising, stop checks, callbacks, planning the next step) overlaps the device's. A
request that ends in step i has one more token computed in step i+1, which is dropped; a command that
needs a request exactly as it is (a fork) reads the step in flight first.

Split as nano-vllm's engine is: the `Scheduler` owns the queues, admission, preemption and finish checks;
the `ModelRunner` owns the metadata, forward, CUDA graphs and sampling; the `Detokenizer` turns tokens
into text and finds stop strings; this file steps them and delivers outputs: a `RequestOutput` per token
to a callback, or, for an `OutputSink` (what `EngineBackend` streams use), the request's state published
after each token for the reader to slice when it likes (no object per live request per step).
Longer than our other files (~580 lines) for a reason: the step loop's parts (launch ahead, read, accept,
drain before a fork) share the step in flight and are only safe read together.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ttscale.backends.engine import precompile as compile_ahead
from ttscale.backends.engine.detokenizer import Detokenizer
from ttscale.backends.engine.kv_cache import KVCache, OutOfKVBlocks, Sequence
from ttscale.backends.engine.model import Model
from ttscale.backends.engine.model_runner import DecodePlan, Launched, ModelRunner
from ttscale.backends.engine.native_common import NativeCallback, NativeDriver, NativeJob, RunnerPool
from ttscale.backends.engine.prefix_cache import PrefixCache
from ttscale.backends.engine.quiet_gc import QuietGC
from ttscale.backends.engine.request import M63, OutputSink, Request, RequestOutput, derive_seed
from ttscale.backends.engine.scheduler import Scheduler
from ttscale.errors import ConfigError, ContextOverflow
from ttscale.types import SamplingSpec

log = logging.getLogger("ttscale.engine")

SamplingParams = SamplingSpec  # the engine's former name for its sampling parameters (`ttscale.types`)

__all__ = ["Engine", "OutputSink", "Request", "RequestOutput", "SamplingParams"]


@dataclass
class InFlight:
    """A launched decode step whose tokens the host has not read yet, and each request's row in it."""

    reqs: list[Request]
    out: Launched
    row: dict[int, int]


class Engine:
    """Continuous-batching generation over a paged, segment-shared KV cache."""

    def __init__(
        self,
        model: Model,
        tokenizer: Any = None,
        num_blocks: int | None = None,
        block_size: int = 16,
        kv_memory_gb: float | None = None,
        prefill_chunk: int | None = None,
        max_running: int = 1024,
        cuda_graphs: bool | None = None,
        prefix_cache: bool = True,
        fused_kernels: bool | None = None,
        overlap: bool = True,
        precompile: bool | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        cfg = model.cfg
        if fused_kernels or (fused_kernels is None and cfg.device.type == "cuda"):
            model.use_kernels(True)
        elif fused_kernels is False:
            model.use_kernels(False)
        if num_blocks is None:
            per_block = 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim
            per_block *= torch.finfo(cfg.dtype).bits // 8
            gb = kv_memory_gb if kv_memory_gb is not None else (8.0 if cfg.device.type == "cuda" else 1.0)
            num_blocks = max(16, int(gb * 2**30 // per_block))
        self.cache = KVCache.for_model(cfg, num_blocks=num_blocks, block_size=block_size)
        self.cache.scratch_slot  # noqa: B018 - keep the padding block aside from the start
        self.prefix = PrefixCache(self.cache, enabled=prefix_cache)
        if prefill_chunk is None:
            prefill_chunk = 2048 if cfg.device.type == "cuda" else 512
        self.max_context = cfg.max_position
        self.eos = set(cfg.eos_token_ids)
        self.scheduler = Scheduler(block_size, prefill_chunk, max_running, eos=self.eos,
                                   max_context=self.max_context)
        use_graphs = cfg.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.runner = ModelRunner(model, self.cache, self.prefix, cuda_graphs=use_graphs, overlap=overlap)
        self.detokenizer = Detokenizer(tokenizer)
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._seed_rng = itertools.count(int(time.time_ns()) & 0xFFFFFFFF)
        self.stats = {"steps": 0, "decode_steps": 0, "prefill_steps": 0, "prefill_tokens": 0, "decode_tokens": 0,
                      "peak_blocks": 0, "preemptions": 0, "prefills_released": 0, "launched_ahead": 0,
                      "dropped_rows": 0}
        self.failure: BaseException | None = None
        self._saved_switch: float | None = None
        self._quiet_gc = False
        self._inflight: InFlight | None = None
        self._launches = 0
        self.native = NativeDriver(tokenizer)  # Hogwild / ParaThinker runs, stepped with the requests
        self.native_runners = RunnerPool(model, self.cache)  # their CUDA-graph runners on this cache
        # What compiling the Triton kernels before the first step did (None: not done; `precompile` None:
        # on CUDA with the fused kernels, unless TTSCALE_PRECOMPILE=0).
        self.kernel_compiles: dict[str, Any] | None = None
        if precompile is None:
            precompile = cfg.device.type == "cuda" and model.kernels is not None and compile_ahead.enabled()
        if precompile:
            self.precompile_kernels()

    def precompile_kernels(self) -> dict[str, Any]:
        """Compile the Triton kernels every kind of step uses, in parallel, before the first step (a process
        on a machine with an empty Triton cache otherwise compiles them one by one at its first steps)."""
        with torch.inference_mode():
            try:
                self.kernel_compiles = compile_ahead.precompile(self.runner.kinds_of_step, self.cache.pool.device)
            except Exception as exc:  # an optimisation only: the kernels still compile at their first launch
                log.warning("compiling the Triton kernels ahead failed (%s: %s); they compile at first use",
                            type(exc).__name__, exc)
                self.kernel_compiles = {"kernels": 0, "threads": 0, "seconds": 0.0, "error": repr(exc)}
        return self.kernel_compiles

    # ---- views of the parts -------------------------------------------------------------------------------
    @property
    def requests(self) -> dict[str, Request]:
        return self.scheduler.requests

    @property
    def waiting(self) -> list[Request]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def graphs(self) -> Any:
        """The CUDA-graph runner of decode steps (None: eager)."""
        return self.runner.graphs

    @property
    def overlap(self) -> bool:
        return self.runner.overlap

    @overlap.setter
    def overlap(self, on: bool) -> None:
        self.runner.overlap = on

    @property
    def last_decode_jobs(self) -> dict[int, int]:
        """Queries per segment job in the last decode step (a shared prompt is one job for all its views)."""
        return self.runner.last_decode_jobs

    # ---- commands (any thread) ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingSpec | None = None,
        callback: Callable[[RequestOutput], None] | OutputSink | None = None,
    ) -> None:
        """Queue a generation. `params` are the public `SamplingSpec` (its defaults when None); fields
        the engine cannot apply (penalties, min_p, min_tokens, logit_bias) are refused here. `callback`:
        called with each token's `RequestOutput`, or an `OutputSink` that reads the output itself."""
        params = params or SamplingSpec()
        if unsupported := params.penalties_set():
            raise ConfigError(f"the engine does not apply {', '.join(unsupported)}; leave them unset "
                              "or use a vLLM backend")
        if not prompt_ids:
            raise ConfigError("a request needs at least one prompt token")
        bad = [t for t in prompt_ids if not 0 <= t < self.model.cfg.vocab_size]
        if bad:
            raise ConfigError(f"token ids out of the vocabulary (size {self.model.cfg.vocab_size}): {bad[:5]}")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise ContextOverflow(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.max_context}"
            )
        seed = params.seed if params.seed is not None else next(self._seed_rng) * 7919
        if isinstance(callback, OutputSink):
            req = Request(request_id, list(prompt_ids), params, None, seed=seed & M63, sink=callback)
            callback.bind(req)
        else:
            req = Request(request_id, list(prompt_ids), params, callback, seed=seed & M63)
        self._command(("add", req))

    def abort(self, request_id: str) -> None:
        """Stop a request or native run; its blocks are free after the next step."""
        self._command(("abort", request_id))

    def add_native(self, run_id: str, job: NativeJob, callback: NativeCallback,
                   max_generated: int | None = None, max_steps: int | None = None) -> None:
        """Step a native run (`native_common`) in this engine's loop, one forward per engine step, on this
        engine's KV cache. `callback` gets each step's tokens per stream and the run's end; the run ends
        by itself, by `abort(run_id)`, or after the step that reaches `max_generated` tokens (all streams)
        or `max_steps` forwards."""
        self._command(("native", run_id, job, callback, max_generated, max_steps))

    def fork(
        self,
        request_id: str,
        child_ids: list[str],
        callbacks: list[Callable[[RequestOutput], None] | OutputSink | None] | None = None,
        params: SamplingSpec | None = None,
    ) -> None:
        """Branch a running request into `len(child_ids)` new ones sharing its KV so far.

        Children inherit the parent's generated tokens (not re-emitted) and sampling parameters
        (`params` overrides them); each gets its own seed derived from the parent's.
        """
        if params is not None and (unsupported := params.penalties_set()):
            raise ConfigError(f"the engine does not apply {', '.join(unsupported)}; leave them unset "
                              "or use a vLLM backend")
        if callbacks is not None and len(callbacks) != len(child_ids):
            raise ConfigError(f"fork got {len(callbacks)} callbacks for {len(child_ids)} children")
        self._command(("fork", request_id, list(child_ids), callbacks, params))

    def score(self, context_ids: list[int], continuation_ids: list[int],
              callback: Callable[[list[float] | BaseException], None]) -> None:
        """Logprobs of `continuation_ids` given `context_ids` (one prefill; the context may hit the
        prefix cache). `callback` gets the list, or the exception."""
        if not context_ids or not continuation_ids:
            raise ConfigError("score needs a non-empty context and continuation")
        if len(context_ids) + len(continuation_ids) > self.max_context:
            raise ContextOverflow(
                f"context + continuation ({len(context_ids) + len(continuation_ids)} tokens) exceeds the "
                f"model's context of {self.max_context}"
            )
        self._command(("score", list(context_ids), list(continuation_ids), callback))

    def _command(self, cmd: tuple[Any, ...]) -> None:
        self._commands.put(cmd)
        self._wake.set()

    # ---- the loop ---------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return (self.scheduler.has_work() or self._inflight is not None or bool(self.native.runs)
                or not self._commands.empty())

    @torch.inference_mode()
    def step(self) -> bool:
        """Run one step (commands, prefill chunks, one decode). Returns False when idle."""
        self._process_commands()
        did = False
        if self.scheduler.waiting:
            did |= self._prefill_step()
        if self.scheduler.running or self._inflight is not None:
            did |= self._decode_step()
        if self.native.runs:
            did |= self.native.step()
        if did:
            self.stats["steps"] += 1
            self.stats["peak_blocks"] = max(self.stats["peak_blocks"], self.cache.pool.num_used)
        return did

    def start(self, switch_interval_s: float | None = None, gc_gen0: int | None = None) -> None:
        """Run the step loop in a background thread.

        `switch_interval_s` lowers Python's GIL switch interval while the thread runs (restored by
        `stop`). The step loop releases the GIL at every CUDA call and must win it back from the event
        loop's thread; at the default 5 ms a busy event loop made each of those waits up to 5 ms.
        `gc_gen0` freezes the objects that exist now and raises the young-generation GC threshold to
        it while the thread runs (`QuietGC`; None: leave the GC alone)."""
        if self._thread is not None:
            return
        self._stop = False
        if switch_interval_s is not None and self._saved_switch is None:
            self._saved_switch = sys.getswitchinterval()
            sys.setswitchinterval(min(self._saved_switch, switch_interval_s))
        if gc_gen0 is not None and not self._quiet_gc:
            QuietGC.enter(gc_gen0)
            self._quiet_gc = True
        self._thread = threading.Thread(target=self._loop, name="ttscale-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._saved_switch is not None:
            sys.setswitchinterval(self._saved_switch)
            self._saved_switch = None
        if self._quiet_gc:
            QuietGC.exit()
            self._quiet_gc = False

    def _loop(self) -> None:
        while not self._stop:
            try:
                busy = self.step()
            except BaseException as e:  # noqa: BLE001 - every request learns why the engine died
                self.failure = e
                self._inflight = None
                for r in list(self.requests.values()):
                    self._finish(r, "error", error=f"engine failure: {type(e).__name__}: {e}")
                self.native.end_all("error", f"engine failure: {type(e).__name__}: {e}")
                busy = False
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def generate(self, prompts: list[list[int]], params: SamplingSpec | list[SamplingSpec]) -> list[Request]:
        """Blocking convenience: run the given prompts to completion in this thread."""
        ps = params if isinstance(params, list) else [params] * len(prompts)
        if len(ps) != len(prompts):
            raise ConfigError(f"generate got {len(ps)} sampling params for {len(prompts)} prompts")
        ids = [f"gen-{next(self._seed_rng)}-{i}" for i in range(len(prompts))]
        for rid, p, sp in zip(ids, prompts, ps, strict=True):
            self.add_request(rid, p, sp)
        self._process_commands()
        reqs = [self.scheduler.requests[i] for i in ids]
        while any(not r.finished for r in reqs):
            self.step()
        return reqs

    # ---- internals ----------------------------------------------------------------------------------------
    def _process_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            self.runner.drop_spec()  # a command may change sequences: undo the speculative next step first
            kind = cmd[0]
            if kind == "add":
                req = cmd[1]
                if not self.scheduler.add(req):
                    self._emit(req, RequestOutput(req.request_id, [], [], finished=True, finish_reason="error",
                                                  error=f"duplicate request id {req.request_id!r}"))
            elif kind == "abort":
                r = self.scheduler.requests.get(cmd[1])
                if r is not None:
                    self._finish(r, "abort")
                else:
                    self.native.abort(cmd[1])
            elif kind == "native":
                while self.cache.pool.num_free < cmd[2].blocks_hint and self.prefix.evict_one():
                    pass  # cached prefixes make room for the run's KV
                self.native.add(*cmd[1:])
            elif kind == "fork":
                self._drain()  # the children copy the parent as it is after its last launched step
                self._do_fork(*cmd[1:])
            elif kind == "score":
                self._do_score(*cmd[1:])

    def _do_score(self, ctx: list[int], cont: list[int],
                  callback: Callable[[list[float] | BaseException], None]) -> None:
        res: list[float] | BaseException
        try:
            res = self.runner.score(ctx, cont)
        except Exception as e:  # noqa: BLE001 - handed to the caller
            res = e
        callback(res)

    def _do_fork(self, rid: str, child_ids: list[str],
                 callbacks: list[Callable[[RequestOutput], None] | OutputSink | None] | None,
                 params: SamplingSpec | None) -> None:
        parent = self.scheduler.requests.get(rid)
        cbs = callbacks or [None] * len(child_ids)
        if parent is None or parent.finished or parent.seq is None or parent.prefilled < len(parent.prefill_ids):
            why = "not running" if parent is None or parent.finished else "still prefilling"
            for cid, cb in zip(child_ids, cbs, strict=True):
                out = RequestOutput(cid, [], [], finished=True, finish_reason="error",
                                    error=f"cannot fork {rid!r}: {why}")
                if isinstance(cb, OutputSink):  # a request that never ran, to carry the error
                    failed = Request(cid, [], params or SamplingSpec(), None, seed=0, sink=cb)
                    cb.bind(failed)
                    self._emit(failed, out)
                elif cb:
                    cb(out)
            return
        seqs = parent.seq.fork(len(child_ids))
        parent.n_forks += 1
        for k, (cid, cb, seq) in enumerate(zip(child_ids, cbs, seqs, strict=True)):
            sink = cb if isinstance(cb, OutputSink) else None
            callback = None if isinstance(cb, OutputSink) else cb
            child = Request(
                cid, parent.prompt_ids, params or parent.params, callback,
                seed=derive_seed(parent.seed, parent.n_forks, k + 1), seq=seq,
                prefilled=parent.prefilled, cached_tokens=parent.cached_tokens,
                output_ids=list(parent.output_ids), logprobs=list(parent.logprobs),
                top_logprobs=list(parent.top_logprobs), pending=parent.pending, text=parent.text.copy(),
                emitted_text=len(parent.text), prefix_offset=parent.prefix_offset,
                read_offset=parent.read_offset, detok=Detokenizer.fork_state(parent),
                sink=sink, published=(len(parent.output_ids), len(parent.text), None, None),
            )
            if sink is not None:
                sink.bind(child)
            self.scheduler.add_running(child)

    def _setup(self, r: Request) -> None:
        views, n, logits = self.prefix.lookup(r.prefill_ids)
        r.seq = Sequence.new(self.cache, views, offset=n)
        r.prefilled = r.cached_tokens = n
        r.cached_logits = logits

    def _prefill_step(self) -> bool:
        work = self.scheduler.plan_prefill(self._setup, self.prefix)
        if not work:
            return False
        while True:
            try:
                rows, done = self.runner.prefill(work)
                break
            except OutOfKVBlocks as e:
                if self.scheduler.running:  # wait: running branches free blocks as they finish (or get preempted)
                    return False
                if len(work) > 1:  # fewer prompts at once (the oldest, which hold what was reserved); others wait
                    work = work[:len(work) // 2]
                    continue
                if self._release_prefills(keep=work[0].request):  # others' partial prefills held it
                    continue
                self._finish(work[0].request, "error", error=str(e))  # its prompt alone does not fit
                return True
        self.stats["prefill_steps"] += 1
        for w in work:
            w.request.prefilled += w.count
            self.stats["prefill_tokens"] += w.count
        resumed = [r for r in done if r.resume_ids is not None]
        for r in resumed:  # recomputed after a preemption: its next token is already sampled
            r.seq.fork(0)  # type: ignore[union-attr]  # prefilled: it has a sequence
            r.resume_ids, r.cached_logits = None, None
            self.scheduler.admit(r)
        resumed_ids = {id(r) for r in resumed}
        done = [r for r in done if id(r) not in resumed_ids]
        if not done:
            return True
        stacked = torch.stack([rows.get(id(r), r.cached_logits) for r in done])  # type: ignore[misc]
        toks, lps, ti, tl = self.runner.sample(stacked, done)
        for r in done:
            if id(r) in rows:
                # Freeze the prompt's full blocks so later requests with this prompt can share them.
                r.seq.fork(0)  # type: ignore[union-attr]  # prefilled: it has a sequence
                self.prefix.insert(r.prompt_ids, r.seq.views[:-1], rows[id(r)])  # type: ignore[union-attr]
            r.cached_logits = None
            self.scheduler.admit(r)
        self._accept_sampled(done, toks, lps, ti, tl)
        return True

    def _release_prefills(self, keep: Request | None = None) -> int:
        """The scheduler's `release_prefills`, counted in the stats; how many were freed."""
        freed = self.scheduler.release_prefills(keep)
        self.stats["prefills_released"] += freed
        return freed

    def _decode_batch(self) -> tuple[list[Request], list[int], list[int], list[int]]:
        return self.scheduler.decode_batch(self._inflight.row if self._inflight is not None else {})

    def _plan(self, reqs: list[Request], tokens: list[int], src: list[int], ahead: list[int]) -> DecodePlan | None:
        """Plan a decode step; when the KV pool is full, read the in-flight step and preempt the newest
        requests until it fits (None: nothing left to run)."""
        try:
            return self.runner.plan(reqs, tokens, src, ahead)
        except OutOfKVBlocks:
            pass
        self._drain()
        reqs, tokens, src, ahead = self._decode_batch()
        while reqs:
            try:
                return self.runner.plan(reqs, tokens, src, ahead)
            except OutOfKVBlocks as e:
                if self._release_prefills():
                    continue
                if len(reqs) <= 1:
                    for r in reqs:
                        self._finish(r, "error", error=str(e))
                    return None
                self.scheduler.preempt(reqs.pop())
                tokens.pop(), src.pop(), ahead.pop()
                self.stats["preemptions"] += 1
        return None

    def _decode_step(self) -> bool:
        """Launch the next decode step, then read the previous one while the device runs it (with
        `overlap`; otherwise read this one at once). A request that ended in the previous step has one
        more token computed in this one, which is dropped."""
        key = (self.scheduler.version, self._launches)
        plan = self.runner.take_spec_at(key)  # planned after the last read, and no request came or went since
        if plan is None:
            reqs, tokens, src, ahead = self._decode_batch()
            if not reqs:
                return self._drain()
            plan = self.runner.take_spec(reqs) or self._plan(reqs, tokens, src, ahead)
            if plan is None:
                return True
        launched = self.runner.launch(plan)
        prev = self._inflight
        rows = dict(zip(map(id, plan.reqs), range(len(plan.reqs)), strict=True))  # id(request) -> row, at C speed
        self._inflight = InFlight(plan.reqs, launched, rows)
        for r in plan.reqs:
            r.pending = None
        self.stats["decode_steps"] += 1
        self._launches += 1
        if prev is not None:
            self.stats["launched_ahead"] += 1
            self._read(prev)
        if not self.runner.overlap:
            self._drain()
            return True
        nxt = self._decode_batch()
        if nxt[0]:
            with contextlib.suppress(OutOfKVBlocks):  # planned again (reading the step first) when it is its turn
                spec = self.runner.plan(*nxt)
                spec.key = (self.scheduler.version, self._launches)
                self.runner.set_spec(spec)
        return True

    def _drain(self) -> bool:
        """Read the in-flight decode step, if any (afterwards every running request's next token is on the
        host again); drops the plan prepared ahead, whose rows referred to it."""
        self.runner.drop_spec()
        fl, self._inflight = self._inflight, None
        if fl is None:
            return False
        self._read(fl)
        return True

    def _read(self, fl: InFlight) -> None:
        """Accept a launched step's tokens. Requests in the step now in flight were given their token there
        on device; the others keep it as pending."""
        toks, lps, top_ids, top_lps = fl.out.lists()
        fed = self._inflight.row if self._inflight is not None else {}
        live = sum(not r.finished for r in fl.reqs)
        self.stats["decode_tokens"] += live
        self.stats["dropped_rows"] += len(fl.reqs) - live  # ended in the step before, computed once more
        self._accept(fl.reqs, toks, lps, top_ids, top_lps, fed)

    def _accept_sampled(self, reqs: list[Request], toks: torch.Tensor, lps: torch.Tensor, ti: torch.Tensor | None,
                        tl: torch.Tensor | None) -> None:
        self._accept(reqs, *Launched(len(reqs), toks, lps, ti, tl).lists(), {})

    def _accept(self, reqs: list[Request], tok_list: list[int], lp_list: list[float],
                top_ids: list[list[int]] | None, top_lps: list[list[float]] | None, fed: dict[int, int]) -> None:
        """Append each request's sampled token, detokenise, check whether it finished, emit its output.
        A request in `fed` already has this token as the input of a launched step (not pending).

        Runs for every row of every step (512 rows at a time on the engine thread, which the event loop
        waits for): the lookups every row makes are taken once."""
        detok = self.tokenizer is not None
        sched = self.scheduler
        token_stop, length_stop, detok_step = sched.token_stop, sched.length_stop, self.detokenizer.step
        publish = self._publish
        for i, r in enumerate(reqs):
            if r.finished:
                continue
            t = tok_list[i]
            r.output_ids.append(t)
            r.logprobs.append(lp_list[i])
            p = r.params
            tops = None
            if p.logprobs and top_ids is not None and top_lps is not None:
                k = p.logprobs
                tops = [dict(zip(top_ids[i][:k], top_lps[i][:k], strict=True))]
                r.top_logprobs.extend(tops)
            text = detok_step(r) if detok and p.detokenize else ""
            reason = token_stop(r, t)
            if reason is None and p.stop and detok:
                reason, text = self.detokenizer.check_stop(r, text)
            if reason is None:
                reason = length_stop(r)
            if reason is not None:
                sched.release(r, reason)
            elif id(r) not in fed:
                r.pending = t
            if r.sink is not None:
                publish(r, reason)
            elif r.callback is not None:
                out = RequestOutput(r.request_id, [t], [lp_list[i]], tops, text,
                                    prompt_tokens=len(r.prompt_ids), cached_tokens=r.cached_tokens)
                if reason is not None:
                    out.finished, out.finish_reason = True, reason
                r.callback(out)

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        if r.finished:
            return
        self.scheduler.release(r, reason)
        self._emit(r, RequestOutput(r.request_id, [], [], finished=True, finish_reason=reason, error=error,
                                    prompt_tokens=len(r.prompt_ids), cached_tokens=r.cached_tokens))

    def _emit(self, r: Request, out: RequestOutput) -> None:
        """`out` to `r`'s callback; to a sink, `r`'s state as published (its finish, error) instead."""
        if r.sink is not None:
            self._publish(r, out.finish_reason if out.finished else None, out.error)
        elif r.callback is not None:
            r.callback(out)

    @staticmethod
    def _publish(r: Request, reason: str | None, error: str | None = None) -> None:
        """`r`'s output so far for its sink (`OutputSink`), flagged to the reader once until it looks."""
        assert r.sink is not None
        # `text.length`, not len(): a Python-level __len__ cost ~0.1 us a token here
        r.published = (len(r.output_ids), r.text.length, reason, error)
        if not r.queued:
            r.queued = True
            r.sink.ready(r)

    def close(self) -> None:
        self.stop()
        self._drain()
        for r in list(self.scheduler.requests.values()):
            self._finish(r, "abort")
        self.native.end_all("abort")
        self.prefix.clear()

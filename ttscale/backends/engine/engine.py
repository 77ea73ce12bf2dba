"""The engine's core loop: requests in, one step at a time, outputs out through callbacks.

Everything that touches the KV cache runs on the engine's own thread (`start()`), or in the caller's
thread when driven by `step()` / `generate()` directly (tests, benchmarks). Other threads talk to it
through commands (`add_request`, `abort`, `fork`) that take effect at the start of the next step, so an
aborted request's blocks are free after the next step and a fork copies the branch exactly as it was
after the last step.
"""

from __future__ import annotations

import copy
import gc
import itertools
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ttscale.backends.engine.kv_cache import KVCache, OutOfKVBlocks, Sequence
from ttscale.backends.engine.model import ForwardItem, Model
from ttscale.backends.engine.native_common import NativeCallback, NativeDriver, NativeJob, RunnerPool
from ttscale.backends.engine.sampler import SamplingTensors, sample
from ttscale.backends.engine.scheduler import PrefixCache, Scheduler
from ttscale.errors import ConfigError, ContextOverflow

_M63 = (1 << 63) - 1


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    include_stop_str: bool = False
    ignore_eos: bool = False
    detokenize: bool = True


@dataclass
class RequestOutput:
    """New tokens of one request since its last output (`finished` on the last one)."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None = None
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    callback: Callable[[RequestOutput], None] | None
    seed: int
    seq: Sequence | None = None
    prefilled: int = 0
    cached_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    pending: int | None = None  # sampled, not yet written to KV
    text: str = ""
    emitted_text: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    detok: object = None  # incremental detokeniser (tokenizers' DecodeStream); False: tokenizer has none
    finished: bool = False
    finish_reason: str | None = None
    n_forks: int = 0
    cached_logits: object = None
    resume_ids: list[int] | None = None  # prompt + generated tokens to recompute after a preemption
    block_hashes: tuple | None = None  # (prefill ids, their chained block hashes): the scheduler's cache

    @property
    def prefill_ids(self) -> list[int]:
        return self.resume_ids if self.resume_ids is not None else self.prompt_ids


class _QuietGC:
    """Process-wide cyclic-GC settings while any engine thread runs (counted over engines).

    Imports and the model leave ~0.5M objects that are never garbage; a full collection walks them all
    (~1 s on a 2-core CPU, with the GIL held, so the engine thread and the event loop both stop), and at
    512 live branches the allocations of metadata, outputs and Deltas set one off every few seconds, plus
    a young collection every 700 allocations. So while engines run, what exists at the first start is
    frozen (`gc.freeze`: reference counting still frees it, the cycle collector skips it) and the
    young-generation threshold is raised; the last `stop` restores both."""

    lock = threading.Lock()
    users = 0
    saved: tuple[int, int, int] | None = None

    @classmethod
    def enter(cls, gen0: int) -> None:
        with cls.lock:
            cls.users += 1
            if cls.users == 1:
                cls.saved = gc.get_threshold()
                gc.freeze()
                gc.set_threshold(max(cls.saved[0], gen0), *cls.saved[1:])

    @classmethod
    def exit(cls) -> None:
        with cls.lock:
            cls.users -= 1
            if cls.users == 0 and cls.saved is not None:
                gc.set_threshold(*cls.saved)
                gc.unfreeze()
                cls.saved = None


def _derive_seed(seed: int, *salt: int) -> int:
    return hash((seed, *salt)) & _M63


def _fast_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` under a transformers fast tokenizer, when DecodeStream can use it."""
    inner = getattr(tokenizer, "_tokenizer", None)
    if inner is None or _decode_stream() is None:
        return None
    return inner


def _decode_stream():
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21
        return None
    return DecodeStream(skip_special_tokens=True)


class Engine:
    """Continuous-batching generation over a paged, segment-shared KV cache."""

    def __init__(
        self,
        model: Model,
        tokenizer=None,
        num_blocks: int | None = None,
        block_size: int = 16,
        kv_memory_gb: float | None = None,
        prefill_chunk: int | None = None,
        max_running: int = 1024,
        cuda_graphs: bool | None = None,
        prefix_cache: bool = True,
        fused_kernels: bool | None = None,
        overlap: bool = True,
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
        self.scheduler = Scheduler(block_size, prefill_chunk, max_running)
        use_graphs = cfg.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs = None
        if use_graphs:
            from ttscale.backends.engine.cuda_graphs import GraphRunner

            self.graphs = GraphRunner(model, self.cache)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._seed_rng = itertools.count(int(time.time_ns()) & 0xFFFFFFFF)
        self.stats = {"steps": 0, "decode_steps": 0, "prefill_tokens": 0, "decode_tokens": 0,
                      "peak_blocks": 0, "preemptions": 0}
        self.max_context = cfg.max_position
        self.eos = set(cfg.eos_token_ids)
        self.failure: BaseException | None = None
        self.last_decode_jobs: dict[int, int] = {}
        self._spec: tuple | None = None
        self.overlap = overlap
        self._pad = self.graphs is not None
        self._fast_tok = _fast_tokenizer(tokenizer)
        self._saved_switch: float | None = None
        self._quiet_gc = False
        self.native = NativeDriver(tokenizer)  # Hogwild / ParaThinker runs, stepped with the requests
        self.native_runners = RunnerPool(model, self.cache)  # their CUDA-graph runners on this cache

    # ---- commands (any thread) ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        callback: Callable[[RequestOutput], None] | None = None,
    ) -> None:
        params = params or SamplingParams()
        if not prompt_ids:
            raise ConfigError("a request needs at least one prompt token")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise ContextOverflow(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.max_context}"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.model.cfg.vocab_size]
        if bad:
            raise ConfigError(f"token ids out of the vocabulary (size {self.model.cfg.vocab_size}): {bad[:5]}")
        seed = params.seed if params.seed is not None else next(self._seed_rng) * 7919
        req = Request(request_id, list(prompt_ids), params, callback, seed=seed & _M63)
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
        callbacks: list[Callable[[RequestOutput], None] | None] | None = None,
        params: SamplingParams | None = None,
    ) -> None:
        """Branch a running request into `len(child_ids)` new ones sharing its KV so far.

        Children inherit the parent's generated tokens (not re-emitted) and sampling parameters
        (`params` overrides them); each gets its own seed derived from the parent's.
        """
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

    def _do_score(self, ctx: list[int], cont: list[int], callback) -> None:
        seq = None
        try:
            views, n, cached = self.prefix.lookup(ctx)
            seq = Sequence.new(self.cache, views, offset=n)
            toks = ctx[n:] + cont
            items = [ForwardItem(seq.views, toks, logits="all")]
            meta = self._with_blocks(lambda: self.model.build_meta(self.cache, items))
            logits = self.model.forward_meta(self.cache, meta)
            start = len(ctx) - n - 1
            if cached is not None:  # the whole context was cached: its last logits predict cont[0]
                logits, start = torch.cat([cached[None].float(), logits]), 0
            lp = torch.log_softmax(logits[start:start + len(cont)].float(), -1)
            res = lp.gather(-1, torch.tensor(cont, device=lp.device)[:, None]).squeeze(-1).tolist()
        except Exception as e:  # noqa: BLE001 - handed to the caller
            res = e
        finally:
            if seq is not None:
                seq.release()
        callback(res)

    def _command(self, cmd) -> None:
        self._commands.put(cmd)
        self._wake.set()

    # ---- the loop ---------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.native.runs) or not self._commands.empty()

    @torch.inference_mode()
    def step(self) -> bool:
        """Run one step (commands, prefill chunks, one decode). Returns False when idle."""
        self._process_commands()
        did = False
        if self.waiting:
            did |= self._prefill_step()
        if self.running:
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
        it while the thread runs (`_QuietGC`; None: leave the GC alone)."""
        if self._thread is not None:
            return
        self._stop = False
        if switch_interval_s is not None and self._saved_switch is None:
            self._saved_switch = sys.getswitchinterval()
            sys.setswitchinterval(min(self._saved_switch, switch_interval_s))
        if gc_gen0 is not None and not self._quiet_gc:
            _QuietGC.enter(gc_gen0)
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
            _QuietGC.exit()
            self._quiet_gc = False

    def _loop(self) -> None:
        while not self._stop:
            try:
                busy = self.step()
            except BaseException as e:  # noqa: BLE001 - every request learns why the engine died
                self.failure = e
                for r in list(self.requests.values()):
                    self._finish(r, "error", error=f"engine failure: {type(e).__name__}: {e}")
                self.native.end_all("error", f"engine failure: {type(e).__name__}: {e}")
                busy = False
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Request]:
        """Blocking convenience: run the given prompts to completion in this thread."""
        ps = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{next(self._seed_rng)}-{i}" for i in range(len(prompts))]
        for rid, p, sp in zip(ids, prompts, ps):
            self.add_request(rid, p, sp)
        self._process_commands()
        reqs = [self.requests[i] for i in ids]
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
            self._drop_spec()  # a command may change sequences: undo the speculative next step first
            kind = cmd[0]
            if kind == "add":
                req = cmd[1]
                if req.request_id in self.requests:
                    self._emit(req, RequestOutput(req.request_id, [], [], finished=True, finish_reason="error",
                                                  error=f"duplicate request id {req.request_id!r}"))
                    continue
                self.requests[req.request_id] = req
                self.waiting.append(req)
            elif kind == "abort":
                r = self.requests.get(cmd[1])
                if r is not None:
                    self._finish(r, "abort")
                else:
                    self.native.abort(cmd[1])
            elif kind == "native":
                while self.cache.pool.num_free < cmd[2].blocks_hint and self.prefix.evict_one():
                    pass  # cached prefixes make room for the run's KV
                self.native.add(*cmd[1:])
            elif kind == "fork":
                self._do_fork(*cmd[1:])
            elif kind == "score":
                self._do_score(*cmd[1:])

    def _do_fork(self, rid, child_ids, callbacks, params) -> None:
        parent = self.requests.get(rid)
        cbs = callbacks or [None] * len(child_ids)
        if parent is None or parent.finished or parent.seq is None or parent.prefilled < len(parent.prefill_ids):
            why = "not running" if parent is None or parent.finished else "still prefilling"
            for cid, cb in zip(child_ids, cbs):
                out = RequestOutput(cid, [], [], finished=True, finish_reason="error",
                                    error=f"cannot fork {rid!r}: {why}")
                if cb:
                    cb(out)
            return
        seqs = parent.seq.fork(len(child_ids))
        parent.n_forks += 1
        for k, (cid, cb, seq) in enumerate(zip(child_ids, cbs, seqs)):
            child = Request(
                cid, parent.prompt_ids, params or parent.params, cb,
                seed=_derive_seed(parent.seed, parent.n_forks, k + 1), seq=seq,
                prefilled=parent.prefilled, cached_tokens=parent.cached_tokens,
                output_ids=list(parent.output_ids), logprobs=list(parent.logprobs),
                top_logprobs=list(parent.top_logprobs), pending=parent.pending, text=parent.text,
                emitted_text=len(parent.text), prefix_offset=parent.prefix_offset,
                read_offset=parent.read_offset, detok=copy.copy(parent.detok) if parent.detok else parent.detok,
            )
            self.requests[cid] = child
            self.running.append(child)

    def _setup(self, r: Request) -> None:
        views, n, logits = self.prefix.lookup(r.prefill_ids)
        r.seq = Sequence.new(self.cache, views, offset=n)
        r.prefilled = r.cached_tokens = n
        r.cached_logits = logits

    def _with_blocks(self, fn):
        """Run `fn`, evicting prefix-cache entries while the pool is short of blocks."""
        while True:
            try:
                return fn()
            except OutOfKVBlocks:
                if not self.prefix.evict_one():
                    raise

    def _prefill_step(self) -> bool:
        work = self.scheduler.plan_prefill(self.waiting, len(self.running), self._setup, self.prefix)
        if not work:
            return False
        items, computed, done = [], [], []
        for w in work:
            r = w.request
            if w.count == 0:  # whole prompt in the prefix cache, with its last logits
                done.append(r)
                continue
            last = w.start + w.count == len(r.prefill_ids)
            items.append(ForwardItem(r.seq.views, r.prefill_ids[w.start:w.start + w.count],
                                     logits="last" if last else "none"))
            if last:
                computed.append(r)
                done.append(r)
        rows: dict[int, torch.Tensor] = {}
        if items:
            try:
                meta = self._with_blocks(lambda: self.model.build_meta(self.cache, items))
            except OutOfKVBlocks as e:
                if self.running:  # wait: running branches free blocks as they finish (or get preempted)
                    return False
                for w in work:
                    self._finish(w.request, "error", error=str(e))
                return True
            logits = self.model.forward_meta(self.cache, meta)
            for i, r in enumerate(computed):
                rows[id(r)] = logits[i]
            for w in work:
                w.request.prefilled += w.count
                self.stats["prefill_tokens"] += w.count
        resumed = [r for r in done if r.resume_ids is not None]
        for r in resumed:  # recomputed after a preemption: its next token is already sampled
            self.waiting.remove(r)
            r.seq.fork(0)
            r.resume_ids, r.cached_logits = None, None
            self.running.append(r)
        resumed_ids = {id(r) for r in resumed}
        done = [r for r in done if id(r) not in resumed_ids]
        if not done:
            return True
        stacked = torch.stack([rows.get(id(r), r.cached_logits) for r in done])
        toks, lps, ti, tl = self._sample(stacked, done)
        for r in done:
            self.waiting.remove(r)
            if id(r) in rows:
                # Freeze the prompt's full blocks so later requests with this prompt can share them.
                r.seq.fork(0)
                self.prefix.insert(r.prompt_ids, r.seq.views[:-1], rows[id(r)])
            r.cached_logits = None
            self.running.append(r)
        self._accept(done, toks, lps, ti, tl)
        return True

    def _sample(self, logits: torch.Tensor, reqs: list[Request], pad_to: int | None = None):
        rows = [(r.params.temperature, r.params.top_p, r.params.top_k, r.seed, len(r.output_ids)) for r in reqs]
        st = SamplingTensors.build(rows, pad_to or len(rows), logits.device)
        filtered = any(r.params.top_p < 1.0 or r.params.top_k > 0 for r in reqs)
        n_top = 20 if any(r.params.logprobs for r in reqs) else 0
        return sample(logits, st, filtered, n_top)

    def _drop_spec(self) -> None:
        """Undo the speculatively prepared next decode step (its write segments' lengths)."""
        if self._spec is not None:
            for seg in self._spec[2]:
                seg.length -= 1
            self._spec = None

    def _decode_step(self) -> bool:
        reqs = [r for r in self.running if r.pending is not None]
        spec, self._spec = self._spec, None
        if spec is not None and len(spec[0]) == len(reqs) and all(a is b for a, b in zip(spec[0], reqs)):
            meta = spec[1]  # prepared while the previous step ran: only the tokens were unknown
            meta.flat[:len(reqs)].copy_(torch.tensor([r.pending for r in reqs], dtype=torch.long))
        else:
            if spec is not None:
                self._spec = spec
                self._drop_spec()
            if not reqs:
                return False
            while True:
                items = [ForwardItem(r.seq.views, [r.pending]) for r in reqs]
                try:
                    meta = self._with_blocks(lambda items=items: self.model.build_meta(self.cache, items, pad=self._pad))
                    break
                except OutOfKVBlocks as e:
                    if len(reqs) <= 1:
                        for r in reqs:
                            self._finish(r, "error", error=str(e))
                        return True
                    self._preempt(reqs.pop())
        for r in reqs:
            r.pending = None
        self.last_decode_jobs = meta.jobs_per_segment
        if self.graphs is not None:
            rows = [(r.params.temperature, r.params.top_p, r.params.top_k, r.seed, len(r.output_ids))
                    for r in reqs]
            st = SamplingTensors.build(rows, meta.tokens.shape[0], self.cache.pool.device)
            filtered = any(r.params.top_p < 1.0 or r.params.top_k > 0 for r in reqs)
            n_top = 20 if any(r.params.logprobs for r in reqs) else 0
            toks, lps, ti, tl = self.graphs.run(meta, st, filtered, n_top)
        else:
            logits = self.model.forward_meta(self.cache, meta)
            toks, lps, ti, tl = self._sample(logits, reqs)
        if self.overlap:
            # Prepare the next step's metadata while the GPU works on this one (token ids patched in later).
            try:
                nxt = self.model.build_meta(self.cache, [ForwardItem(r.seq.views, [0]) for r in reqs],
                                            pad=self._pad)
                self._spec = (reqs, nxt, [r.seq.write for r in reqs])
            except OutOfKVBlocks:
                self._spec = None
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(reqs)
        self._accept(reqs, toks, lps, ti, tl)
        if self._spec is not None and any(r.finished for r in reqs):
            self._drop_spec()
        return True

    def _preempt(self, r: Request) -> None:
        """Free a running request's KV and queue it for recomputation (prompt + tokens so far)."""
        r.seq.release()
        r.seq = None
        r.prefilled = 0
        r.resume_ids = r.prompt_ids + r.output_ids[:-1]
        self.running.remove(r)
        self.waiting.insert(0, r)
        self.stats["preemptions"] += 1

    def _accept(self, reqs: list[Request], toks, lps, ti, tl) -> None:
        n = len(reqs)
        toks = toks[:n].tolist()
        lps = lps[:n].tolist()
        tops = None
        if ti is not None:
            ti, tl = ti[:n].tolist(), tl[:n].tolist()
        for i, r in enumerate(reqs):
            if r.finished:
                continue
            t = toks[i]
            r.output_ids.append(t)
            r.logprobs.append(lps[i])
            if r.params.logprobs and ti is not None:
                k = r.params.logprobs
                tops = [dict(zip(ti[i][:k], tl[i][:k]))]
                r.top_logprobs.extend(tops)
            else:
                tops = None
            p = r.params
            reason = None
            text = ""
            if p.detokenize and self.tokenizer is not None:
                text = self._detok(r)
            if (t in self.eos and not p.ignore_eos) or t in p.stop_token_ids:
                reason = "stop"
            elif p.stop and self.tokenizer is not None:
                reason, text = self._check_stop(r, text)
            if reason is None and len(r.output_ids) >= p.max_tokens:
                reason = "length"
            if reason is None and r.seq.length + 1 > self.max_context:
                reason = "length"
            out = RequestOutput(r.request_id, [t], [lps[i]], tops, text, prompt_tokens=len(r.prompt_ids),
                                cached_tokens=r.cached_tokens)
            if reason is not None:
                out.finished, out.finish_reason = True, reason
                self._release(r, reason)
            else:
                r.pending = t
            self._emit(r, out)

    def _detok(self, r: Request) -> str:
        """Incremental detokenisation (text only once a multi-byte character is complete).

        With a fast tokenizer, `tokenizers`' DecodeStream does it in Rust (about 1 us a token); otherwise
        two decodes of a short window (about 20 us), which at hundreds of branches a step is what costs."""
        if r.detok is None:
            r.detok = _decode_stream() if self._fast_tok is not None else False
        if r.detok is not False:
            new = r.detok.step(self._fast_tok, r.output_ids[-1])
            if new:
                r.text += new
                return new
            return ""
        tok, ids = self.tokenizer, r.output_ids
        prefix = tok.decode(ids[r.prefix_offset:r.read_offset], skip_special_tokens=True)
        full = tok.decode(ids[r.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            r.prefix_offset, r.read_offset = r.read_offset, len(ids)
            r.text += new
            return new
        return ""

    def _check_stop(self, r: Request, new: str) -> tuple[str | None, str]:
        if not new:
            return None, new
        longest = max(len(s) for s in r.params.stop)
        start = max(0, len(r.text) - len(new) - longest + 1)
        hits = [(r.text.find(s, start), s) for s in r.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None, new
        i, s = min(hits)
        cut = i + (len(s) if r.params.include_stop_str else 0)
        before = len(r.text) - len(new)
        r.text = r.text[:cut]
        return "stop", r.text[before:] if cut > before else ""

    def _release(self, r: Request, reason: str) -> None:
        r.finished, r.finish_reason = True, reason
        r.pending = None
        if r.seq is not None:
            r.seq.release()
            r.seq = None
        if r in self.running:
            self.running.remove(r)
        if r in self.waiting:
            self.waiting.remove(r)
        self.requests.pop(r.request_id, None)

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        if r.finished:
            return
        self._release(r, reason)
        self._emit(r, RequestOutput(r.request_id, [], [], finished=True, finish_reason=reason, error=error,
                                    prompt_tokens=len(r.prompt_ids), cached_tokens=r.cached_tokens))

    def _emit(self, r: Request, out: RequestOutput) -> None:
        if r.callback is not None:
            r.callback(out)

    def close(self) -> None:
        self.stop()
        self._drop_spec()
        for r in list(self.requests.values()):
            self._finish(r, "abort")
        self.native.end_all("abort")
        self.prefix.clear()

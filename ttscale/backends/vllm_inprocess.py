"""vLLM's engine core and model in this process (the CPU build's path in `ttscale.backends.vllm`).

`AsyncLLM` cannot run its engine core in-process (vLLM raises NotImplementedError) and on the CPU build it
spawns an EngineCore and a Worker process that each import vLLM again; `InprocessEngine` drives vLLM's
synchronous `LLMEngine` from one thread instead, behind the calls `VLLMBackend` makes. Beside it, the
start-up and exit helpers that keep the collector from walking vLLM's heap.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import gc
import logging
import os
import queue
import random
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

_UNFREED: list[Any] = []  # engines stopped without their teardown (`InprocessEngine.shutdown(free=False)`)


def free_stopped_engines() -> int:
    """Tear down the engines stopped without freeing (before another is built in this process); how many."""
    count = 0
    while _UNFREED:
        _UNFREED.pop().engine_core.shutdown()
        count += 1
    return count


@functools.cache
def freeze_heap_at_exit() -> None:
    """At interpreter exit, move every object to the collector's permanent generation (`gc.freeze`).

    With vLLM, torch and transformers loaded in this process the interpreter's own collections while it
    shuts down took 2.6-3.8 s on 2 cores (0.4-0.6 s frozen), after the eval was done. Nothing changes
    before exit; registered once per process (cached)."""
    atexit.register(gc.freeze)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic collector off inside the block (explicit `gc.collect()` calls still run).

    Importing vLLM and building its engine allocate millions of objects and few cycles: the collections
    they trigger took ~1.5 s of the ~10 s import on 2 cores. Restored as it was found."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def quiet_start() -> Iterator[None]:
    """vLLM's start in this process without its chatter on our stdout, where an eval prints its results: the
    INFO lines, the configuration warnings every CPU start repeats (eager mode, no Triton, the seed) and one
    warning per weight that our float32 checkpoint is cast to bfloat16 (~150 lines before the results table
    for SmolLM2), the FutureWarnings vLLM's imports raise, and torch's "Triton not available" warning (the CPU
    build has none, by design). vLLM logs errors only while it starts, then warnings and errors. A
    `VLLM_LOGGING_LEVEL` the user set leaves vLLM's logging as vLLM sets it."""
    with warnings.catch_warnings(), _logger_level("torch._library.triton", logging.ERROR):
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm(\.|$)")
        if os.environ.get("VLLM_LOGGING_LEVEL"):
            yield
            return
        # vLLM applies its logging config (level from this variable) when it builds an engine's config
        with _environ("VLLM_LOGGING_LEVEL", "ERROR"):
            try:
                yield
            finally:
                _set_level(logging.getLogger("vllm"), logging.WARNING)


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    """The named logger at `level` inside the block, as it was after."""
    log = logging.getLogger(name)
    old = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(old)


def _set_level(log: logging.Logger, level: int) -> None:
    """The logger's level and its handlers' (vLLM's handler has the configured level too)."""
    log.setLevel(level)
    for handler in log.handlers:
        handler.setLevel(level)


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """`os.environ[name] = value` inside the block only."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class InprocessEngine:
    """vLLM's `LLMEngine` in this process, stepped by one thread, behind the part of vLLM's `EngineClient`
    that `VLLMBackend` calls (`generate`, `abort`, `get_num_unfinished_requests`, `model_config`, `shutdown`).

    `AsyncLLM` cannot run its engine core in-process (vLLM raises NotImplementedError), so this drives the
    synchronous engine instead. `LLMEngine` is not thread-safe: every call into it (add, abort, step) is
    made by the engine thread, fed through a command queue, and each step's outputs reach the event loop
    in one hand-off. The thread blocks on the queue while nothing is live (no busy loop). An aborted
    request's stream ends at once with an output whose finish_reason is "abort", as with `AsyncLLM`.
    """

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop, threads: int | None = None) -> None:
        self._engine = engine
        self._threads = threads
        self.model_config = engine.model_config
        self._loop = loop
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.Queue[Any], Any]] = {}  # touched on the loop thread only
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: Any, stat_loggers: list[Any], threads: int | None = None) -> InprocessEngine:
        """Build the engine in this process with the uni-process executor.

        `threads`: torch's thread count for this process, as vLLM's worker process would have it (set here
        and in the engine thread: OpenMP keeps it per thread). It decides the summation order of vLLM-CPU's
        kernels, so it must match for the same tokens as a vLLM server; left at the count torch picked when
        it was imported first (2 here, before `OMP_NUM_THREADS=1` could apply), outputs differed.

        The CPU platform swaps `uni` for `mp` unless VLLM_ENABLE_V1_MULTIPROCESSING is "0" while the
        config is made (read there only). vLLM's default stat logger (a throughput line every 10 s) is
        left out, as `AsyncLLM` leaves it out when only custom loggers are given. Start-up side effects
        on this process are undone: the stdlib `random` state vLLM reseeds, and `torch.set_num_threads`,
        which the CPU worker replaces with a no-op."""
        import torch
        from vllm.v1.engine.llm_engine import LLMEngine
        from vllm.v1.executor import Executor

        free_stopped_engines()  # vLLM's process-wide state (its process group) must be torn down first

        args.distributed_executor_backend = "uni"
        with _environ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"):
            config = args.create_engine_config()
        stats_log = logging.getLogger("vllm.v1.metrics.loggers")
        level, py_random, set_threads = stats_log.level, random.getstate(), torch.set_num_threads
        if threads is not None:  # while it is built too: its CPU attention checks the count it started with
            torch.set_num_threads(threads)
        stats_log.setLevel(logging.WARNING)
        # vLLM collects garbage 5 times while it starts (1.6 s over a heap holding torch, transformers and
        # vLLM) and then freezes the heap itself (`freeze_gc_heap`, undone at shutdown); freezing first
        # spares those collections what is already imported.
        gc.freeze()
        try:
            engine = LLMEngine(vllm_config=config, executor_class=Executor.get_class(config), log_stats=True,
                               stat_loggers=stat_loggers, multiprocess_mode=False)
        except BaseException:
            gc.unfreeze()
            raise
        finally:
            stats_log.setLevel(level)
            random.setstate(py_random)
            torch.set_num_threads = set_threads
        freeze_heap_at_exit()
        return cls(engine, asyncio.get_running_loop(), threads)

    # ----------------------------------------------------------------- engine thread
    def _run(self) -> None:
        engine = self._engine
        if self._threads is not None:  # OpenMP's thread count is per thread: a new thread starts at the default
            import torch

            torch.set_num_threads(self._threads)
        try:
            while True:
                busy = engine.has_unfinished_requests()
                try:
                    cmd: tuple[Any, ...] | None = self._commands.get(block=not busy)
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if cmd[0] == "stop":
                        return
                    self._apply(cmd)
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = None
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    if outputs:
                        self._to_loop(self._deliver, outputs)
        except BaseException as e:  # the engine is dead: every live stream gets the error
            self._error = e
            self._to_loop(self._fail_all, e)

    def _apply(self, cmd: tuple[Any, ...]) -> None:
        if cmd[0] == "add":
            _, rid, prompt, params = cmd
            try:
                self._engine.add_request(rid, prompt, params)
            except Exception as e:  # a request vLLM rejects fails that request only
                self._to_loop(self._put, rid, e)
        elif cmd[0] == "abort":
            self._engine.abort_request(cmd[1])

    def _to_loop(self, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to read
            self._loop.call_soon_threadsafe(fn, *args)

    # ----------------------------------------------------------------- event-loop side
    def _put(self, rid: str, item: Any) -> None:
        if (entry := self._streams.get(rid)) is not None:
            entry[0].put_nowait(item)

    def _deliver(self, outputs: list[Any]) -> None:
        for out in outputs:
            self._put(out.request_id, out)

    def _fail_all(self, error: BaseException) -> None:
        for q, _ in self._streams.values():
            q.put_nowait(error)

    @staticmethod
    def _aborted(rid: str, params: Any) -> Any:
        from vllm.outputs import CompletionOutput, RequestOutput

        logprobs: list[Any] | None = [] if getattr(params, "logprobs", None) is not None else None
        done = CompletionOutput(index=0, text="", token_ids=[], cumulative_logprob=None, logprobs=logprobs,
                                finish_reason="abort")
        return RequestOutput(request_id=rid, prompt=None, prompt_token_ids=None, prompt_logprobs=None,
                             outputs=[done], finished=True, num_cached_tokens=0)

    @property
    def error(self) -> BaseException | None:
        """What stopped the engine thread (it serves nothing after), or None while it runs."""
        return self._error

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Any]:
        """vLLM's outputs for one request (`params.output_kind` decides deltas or the final one only)."""
        if self._error is not None:
            raise RuntimeError(f"the vLLM engine thread died: {self._error!r}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already live")
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request_id] = (q, params)
        self._commands.put(("add", request_id, prompt, params))
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            self._streams.pop(request_id, None)

    async def abort(self, request_id: str | list[str]) -> None:
        """End these requests' streams now (an "abort" output) and drop them from the engine."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            if (entry := self._streams.get(rid)) is not None:
                entry[0].put_nowait(self._aborted(rid, entry[1]))
        self._commands.put(("abort", ids))

    def get_num_unfinished_requests(self) -> int:
        return int(self._engine.get_num_unfinished_requests())

    def shutdown(self, free: bool = True) -> None:
        """Stop the thread after its current step, then (`free`) free the model, KV cache and process group.

        Not freeing is for a process about to exit: vLLM's teardown unfreezes the heap and collects it whole
        twice (1.6 of its 1.8 s on 2 cores), which gives back nothing the exit would not. Should the process
        build another engine after all, the teardown runs first (`free_stopped_engines`)."""
        self._commands.put(("stop",))
        self._thread.join()
        self._fail_all(RuntimeError("the vLLM engine was shut down"))
        if free:
            self._engine.engine_core.shutdown()
        else:  # and vLLM's exit-time finalizer must not run the teardown then (it unfreezes the heap first)
            for owner in (self._engine.engine_core, self._engine):
                if (finalizer := getattr(owner, "_finalizer", None)) is not None:
                    finalizer.detach()
            _UNFREED.append(self._engine)

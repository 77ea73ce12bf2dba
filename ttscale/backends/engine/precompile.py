"""Compiling the engine's Triton kernels in parallel before its first step.

On a machine whose Triton cache is empty, a process's first steps wait on Triton's JIT: each kernel
specialisation is compiled, and its C launcher built with gcc, one after another at its first launch (on an
H200 host the smollm2 shape produced nothing for 22 s, `benchmarks/results/cold_start_h200.txt`). Here the
engine's steps are run once per kind (prefill; decode at each attention tile size; sampling with and without
top-p) with every Triton launch turned into Triton's `warmup` (compile, no launch) inside its
`AsyncCompileMode`: the very specialisations the real steps will meet are compiled on a thread pool, and
each one's launcher is built in the same worker. Triton's disk cache makes a later process's pass cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any

import torch

log = logging.getLogger("ttscale.engine")

_DRY: ContextVar[dict[Any, int] | None] = ContextVar("ttscale_dry_launch", default=None)


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)`, or only its compile while `dry_launches` is active."""
    touched = _DRY.get()
    if touched is None:
        kernel[grid](*args, **kwargs)
        return
    if kernel not in touched:
        touched[kernel] = _specialisations(kernel)
    kernel.warmup(*args, grid=grid, **kwargs)


def compiling() -> bool:
    """True inside `dry_launches` (a launcher may then also compile the variants that other batches pick)."""
    return _DRY.get() is not None


def _specialisations(kernel: Any) -> int:
    """How many specialisations of `kernel` this process holds compiled (Triton's per-device JIT caches)."""
    try:
        return sum(len(c[0]) for c in kernel.device_caches.values())
    except (AttributeError, TypeError, IndexError):
        return 0


@contextlib.contextmanager
def dry_launches() -> Iterator[dict[Any, int]]:
    """Triton launches inside compile their kernel and skip running it (outputs stay uninitialised). Yields
    the kernels launched so far, each with how many specialisations it held before."""
    touched: dict[Any, int] = {}
    token = _DRY.set(touched)
    try:
        yield touched
    finally:
        _DRY.reset(token)


class _LoadingExecutor(Executor):
    """Runs Triton's compile jobs on `inner` and, in the same worker, loads the compiled kernel and builds
    its launcher (a gcc run per new signature), which Triton would otherwise do at the first launch, one
    after another, on the engine's thread. `device`: the CUDA device index Triton compiles for (the calling
    thread's current device; a new thread's would be 0), None off CUDA."""

    def __init__(self, inner: Executor, device: int | None) -> None:
        self.inner, self.device = inner, device

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        def compile_and_load() -> Any:
            kernel = fn(*args, **kwargs)
            init = getattr(kernel, "_init_handles", None)
            if init is not None:
                with torch.cuda.device(self.device) if self.device is not None else contextlib.nullcontext():
                    init()
            return kernel

        return self.inner.submit(compile_and_load)


def _async_compile_mode() -> Any:
    """Triton's `AsyncCompileMode` (Triton >= 3.4), or None."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return None
    return AsyncCompileMode


def enabled() -> bool:
    """Off with `TTSCALE_PRECOMPILE=0` (to time the JIT as it comes) and under Triton's interpreter."""
    return os.environ.get("TTSCALE_PRECOMPILE", "1") != "0" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def precompile(steps: Callable[[], None], device: torch.device, workers: int | None = None) -> dict[str, Any]:
    """Run `steps` (the engine's forwards and samplings, once per kind) with Triton launches dry, compiling
    what they launch on `workers` threads (default: the usable cores). Returns what it did: kernel
    specialisations made ready (compiled, or read from Triton's disk cache), failed ones (they compile again
    at their first launch), threads, seconds.

    Threads overlap Triton's ptxas and the launchers' gcc runs; its Python front end holds the GIL (2 threads
    on a 2-core VM: 1.4x one, `tests/engine/test_precompile_triton.py`'s compiles)."""
    t0 = time.perf_counter()
    mode_cls = _async_compile_mode()
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, workers)
    failed = 0
    if mode_cls is None or workers == 1:
        workers = 1
        with dry_launches() as touched:
            steps()
    else:
        index = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        with ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool:
            mode = _make_mode(mode_cls, _LoadingExecutor(pool, index))
            try:
                with mode, dry_launches() as touched:
                    steps()
                    futures = list(getattr(mode, "raw_futures", ()))
            finally:
                _deactivate(mode)
        failed = sum(1 for f in futures if f.done() and f.exception() is not None)
    ready = sum(max(0, _specialisations(k) - before) for k, before in touched.items())
    info = {"kernels": ready, "failed": failed, "threads": workers, "seconds": round(time.perf_counter() - t0, 2)}
    log.info("Triton kernels ready: %d specialisations (%d failed) on %d threads in %.1f s", ready, failed,
             workers, info["seconds"])
    return info


def _make_mode(mode_cls: Any, executor: Executor) -> Any:
    """The compile mode, told to keep going past a failed compile (that kernel then compiles at its first
    launch, as without this module): without it Triton 3.6 re-raises in `__exit__` before deactivating."""
    try:
        return mode_cls(executor, ignore_errors=True)
    except TypeError:
        return mode_cls(executor)


def _deactivate(mode: Any) -> None:
    """Leave no compile mode active on this thread whatever happened (Triton 3.6's `__exit__` leaves it set
    when a compile failed, and every later launch on the thread would then go to the closed pool)."""
    from triton.runtime import _async_compile

    if _async_compile.active_mode.get() is mode:
        _async_compile.active_mode.set(None)

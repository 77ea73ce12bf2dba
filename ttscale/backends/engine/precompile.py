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

_DRY: ContextVar[bool] = ContextVar("ttscale_dry_launch", default=False)


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)`, or only its compile while `dry_launches` is active."""
    if _DRY.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def dry_launches() -> Iterator[None]:
    """Triton launches inside compile their kernel and skip running it (outputs stay uninitialised)."""
    token = _DRY.set(True)
    try:
        yield
    finally:
        _DRY.reset(token)


class _LoadingExecutor(Executor):
    """Runs Triton's compile jobs on `inner` and, in the same worker, loads the compiled kernel and builds
    its launcher (a gcc run per new signature), which Triton would otherwise do at the first launch, one
    after another, on the engine's thread."""

    def __init__(self, inner: Executor, device: torch.device) -> None:
        self.inner, self.device = inner, device

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        def compile_and_load() -> Any:
            kernel = fn(*args, **kwargs)
            init = getattr(kernel, "_init_handles", None)
            if init is not None:
                with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
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
    specialisations prepared (compiled, or read from Triton's disk cache), threads, seconds."""
    t0 = time.perf_counter()
    mode_cls = _async_compile_mode()
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, workers)
    submitted = 0
    if mode_cls is None or workers == 1:
        with dry_launches():
            steps()
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool:
            mode = mode_cls(_LoadingExecutor(pool, device))
            with mode, dry_launches():
                steps()
                submitted = len(getattr(mode, "raw_futures", ()))
    info = {"kernels": submitted, "threads": workers if mode_cls is not None else 1,
            "seconds": round(time.perf_counter() - t0, 2)}
    log.info("Triton kernels ready: %d specialisations on %d threads in %.1f s", info["kernels"], info["threads"],
             info["seconds"])
    return info

"""The backends `solve()` / `asolve()` keep between calls, so a loop of `solve(q, backend="vllm:...")` starts
vLLM once, not once per question.

A backend given to `solve` as a spec string is built on first use, started, and kept here under its spec
(normalised by `spec_key`; different specs never share a backend). It lives on one
event loop that runs in a daemon thread of its own ("ttscale-shared-backends"): HTTP clients and in-process
engines are bound to the loop they started on, and `solve()` runs `asyncio.run` per call, whose loop dies
with the call. So every `solve`/`asolve` with a spec runs its whole Pipeline on that loop (listeners are
called there too); a Backend object passed in is used as it is, on the caller's loop, and never kept.

`close_shared_backends()` closes them all (the next call builds afresh; a closed backend is never handed
out again); it runs by itself at interpreter exit. `shared_backend_specs()` lists what is kept. For many
problems with one backend under your own control, build a `Pipeline` once instead.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ttscale.backends import make_backend, parse_backend_spec
from ttscale.backends.base import Backend
from ttscale.specs import format_spec

log = logging.getLogger("ttscale")

T = TypeVar("T")

CLOSE_TIMEOUT_S = 60.0  # at most this long to close every kept backend (vLLM shuts its processes down)


def spec_key(spec: str) -> str:
    """The cache key of a backend spec: its parsed form written back with options sorted, so spellings of
    one spec (`engine` / `engine:`, options in any order, the older `?k=v` form) share it."""
    parsed = parse_backend_spec(spec)
    return format_spec(parsed.model_copy(update={"options": dict(sorted(parsed.options.items()))}), also_quote="?")


class SharedBackends:
    """Backends kept by spec on one event loop thread; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._backends: dict[str, Backend] = {}
        self._building: dict[str, asyncio.Lock] = {}

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="ttscale-shared-backends", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def specs(self) -> list[str]:
        """The keys of the backends kept now."""
        return sorted(self._backends)

    async def get(self, spec: str) -> Backend:
        """The started backend for `spec`, built and started on first use (runs on the shared loop only).

        A backend whose build or start fails is closed and not kept, so the next call tries again."""
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("SharedBackends.get runs on the shared loop: use run() / arun()")
        key = spec_key(spec)
        lock = self._building.setdefault(key, asyncio.Lock())
        async with lock:  # concurrent first calls with one spec build it once
            backend = self._backends.get(key)
            if backend is not None and (dead := getattr(backend, "dead", None)) is not None:
                log.warning("backend %s died (%r); starting a new one", spec, dead)
                del self._backends[key]
                with contextlib.suppress(Exception):
                    await backend.close()
                backend = None
            if backend is None:
                backend = make_backend(spec)
                try:
                    await backend.start()
                except BaseException:
                    await backend.close()
                    raise
                if asyncio.get_running_loop() is self._loop:  # not closed meanwhile: keep it
                    self._backends[key] = backend
            return backend

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the shared loop and block until it ends; Ctrl-C cancels it there."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` run on the shared loop; cancelling the caller cancels it there."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._ensure_loop()))

    @staticmethod
    async def _close_all(backends: list[Backend]) -> None:
        await asyncio.gather(*(b.close() for b in backends), return_exceptions=True)

    def close(self) -> None:
        """Close every kept backend and stop the loop thread; the next `solve` starts a new one."""
        with self._lock:  # from here on, callers get a new loop and build new backends
            loop, thread = self._loop, self._thread
            backends = list(self._backends.values())
            self._loop = self._thread = None
            self._backends, self._building = {}, {}
        if loop is None or loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close_all(backends), loop).result(CLOSE_TIMEOUT_S)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass  # exiting anyway: a backend that does not close in time is left to the OS
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(CLOSE_TIMEOUT_S)
            if not loop.is_running():
                loop.close()

    def _forget_after_fork(self) -> None:
        """In a forked child the loop thread does not exist: start from nothing (the parent owns them)."""
        self._lock = threading.Lock()
        self._loop = self._thread = None
        self._backends = {}
        self._building = {}


SHARED = SharedBackends()
atexit.register(SHARED.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=SHARED._forget_after_fork)


def close_shared_backends() -> None:
    """Close the backends `solve()` / `asolve()` kept (see the module docstring)."""
    SHARED.close()


def shared_backend_specs() -> list[str]:
    """The specs of the backends `solve()` / `asolve()` keep now."""
    return SHARED.specs()

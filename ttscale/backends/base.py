"""The Backend protocol every model source implements, and its Capabilities.

A backend generates one branch per request as an async stream of Deltas. Cancelling the consumer of
`generate()` (closing the async generator, or cancelling the task that iterates it) must abort the
request on the server: in-process engines call their abort, HTTP backends call the server's abort
endpoint when it has one and close the stream as the last resort.

`start()` is part of the protocol: it loads the model or connects to the server, it is idempotent, and the
Pipeline (or whoever builds a Context) awaits it once before the first request, so a missing capability
fails before anything runs. The optional parts (`fork`, `chat_ids`, `run_native`, the in-process engine)
are announced by `Capabilities` fields, never found with `getattr`: `BackendBase` gives every backend
versions that raise `CapabilityError`, and `engine_parts` hands a typed view of an engine-native backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, cast, runtime_checkable

from pydantic import BaseModel

from ttscale.errors import CapabilityError
from ttscale.types import Delta, GenerationRequest, SamplingSpec, ScoreRequest, ScoreResult

if TYPE_CHECKING:
    from ttscale.backends.engine.backend import NativeHandle
    from ttscale.backends.engine.engine import Engine
    from ttscale.backends.engine.native_common import NativeJob

# One branch's deltas. An async generator, not any async iterator: whoever consumes it closes it (`aclose`)
# to stop the generation early, which aborts the request (see the module docstring).
DeltaStream = AsyncGenerator[Delta, None]
# A forked child: the request id the backend gave it and its delta stream.
ForkedStream = tuple[str, DeltaStream]

_PROCESS_ENDING: ContextVar[bool] = ContextVar("ttscale_process_ending", default=False)


@contextlib.contextmanager
def process_ending() -> Iterator[None]:
    """Backends closed inside the block need not give memory back: the process ends right after (the CLI's
    last close). An in-process engine then only stops its thread instead of tearing the model down, which
    for vLLM collects the whole heap twice (1.6 s on 2 cores, `ttscale.backends.vllm_inprocess`)."""
    token = _PROCESS_ENDING.set(True)
    try:
        yield
    finally:
        _PROCESS_ENDING.reset(token)


def is_process_ending() -> bool:
    """Whether this close is the process's last (see `process_ending`)."""
    return _PROCESS_ENDING.get()


class Capabilities(BaseModel):
    """What a backend can do. Strategies check these before starting (see `require`)."""

    streaming: bool = True
    abort: bool = False
    n_per_request: bool = False
    token_ids: bool = False
    top_logprobs: int = 0
    score: bool = False
    tokenize: bool = False
    prefix_cache: bool = False
    shared_kv_fork: bool = False  # `fork(request_id, n)` branches a running request on shared KV
    kv_merge: bool = False
    concurrent_views: bool = False  # `run_native(...)` steps a native job (Hogwild, ParaThinker) in its loop
    parallel_streams: bool = False
    chat_ids: bool = False  # `chat_ids(messages)` renders a chat to token ids with the model's own template
    engine_native: bool = False  # `engine` and `tokenizer` are our in-process engine's (see `engine_parts`)
    chat: bool = True
    completion: bool = True
    max_context: int | None = None

    def missing(self, *needs: str) -> list[str]:
        """Names of the needed capabilities this backend lacks (`top_logprobs` counts as having ≥1)."""
        out = []
        for n in needs:
            if not hasattr(self, n):
                raise ValueError(f"unknown capability {n!r}")
            if not getattr(self, n):
                out.append(n)
        return out


@runtime_checkable
class Backend(Protocol):
    """A source of generations. See the module docstring for the cancellation contract."""

    name: str

    @property
    def capabilities(self) -> Capabilities:
        """What this backend can do (exact once `start` has run); a plain attribute satisfies it."""
        ...

    async def start(self) -> Backend:
        """Load the model / connect to the server; capabilities are exact only after this. Idempotent."""
        ...

    def generate(self, request: GenerationRequest) -> DeltaStream:
        """Stream one branch. The last delta has `finished=True`."""
        ...

    async def abort(self, request_id: str) -> None:
        """Abort one request by id (no-op when it is already done)."""
        ...

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Logprobs of the continuation's tokens given the context (needs `capabilities.score`)."""
        ...

    async def tokenize(self, text: str) -> list[int]:
        """Token ids of plain text, no special tokens (needs `capabilities.tokenize`)."""
        ...

    def fork(self, request_id: str, n: int, sampling: SamplingSpec | None = None) -> list[ForkedStream]:
        """Branch a running request into n children on shared KV (needs `capabilities.shared_kv_fork`)."""
        ...

    def chat_ids(self, messages: list[dict[str, Any]], continue_final_message: bool = False) -> list[int]:
        """Token ids of a chat in the model's template (needs `capabilities.chat_ids`)."""
        ...

    def run_native(self, run_id: str, job: NativeJob, *, max_generated: int | None = None,
                   max_steps: int | None = None) -> NativeHandle:
        """Step a native job in the backend's own loop (needs `capabilities.concurrent_views`)."""
        ...

    async def close(self) -> None:
        """Release connections / engines."""
        ...


class EngineNative(Backend, Protocol):
    """A backend whose `capabilities.engine_native` is set: its in-process engine and tokenizer."""

    engine: Engine
    tokenizer: Any


def engine_parts(backend: Backend, who: str) -> EngineNative:
    """`backend` as an engine-native backend, or a CapabilityError naming `who` needs it and what it got."""
    if not backend.capabilities.engine_native:
        raise CapabilityError(f"{who} needs the engine backend's model and tokenizer; {backend.name!r} does "
                              "not expose them (capability `engine_native`)")
    return cast("EngineNative", backend)


class BackendBase:
    """Defaults for the optional parts of the protocol; concrete backends subclass it."""

    name: str = "backend"
    capabilities: Capabilities = Capabilities()

    async def start(self) -> Self:
        """Start engines / connect to servers; capabilities are exact only after this. Idempotent."""
        return self

    async def abort(self, request_id: str) -> None:
        return None

    async def score(self, request: ScoreRequest) -> ScoreResult:
        raise CapabilityError(f"backend {self.name!r} cannot score continuations (no prompt logprobs)")

    async def tokenize(self, text: str) -> list[int]:
        raise CapabilityError(f"backend {self.name!r} cannot tokenize")

    def fork(self, request_id: str, n: int, sampling: SamplingSpec | None = None) -> list[ForkedStream]:
        raise CapabilityError(f"backend {self.name!r} cannot fork a running request on shared KV")

    def chat_ids(self, messages: list[dict[str, Any]], continue_final_message: bool = False) -> list[int]:
        raise CapabilityError(f"backend {self.name!r} does not render chats to token ids itself")

    def run_native(self, run_id: str, job: NativeJob, *, max_generated: int | None = None,
                   max_steps: int | None = None) -> NativeHandle:
        raise CapabilityError(f"backend {self.name!r} cannot run native jobs (needs the engine backend)")

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class WrappingBackend(BackendBase):
    """A backend in front of another (`inner`): start, abort, score, tokenize, close and the optional parts
    (fork, chat_ids, run_native, the engine, stats, ...) go to it, and its capabilities are read from it, so
    they are the exact ones once `start` has run. Subclasses override what they change (generate, request
    ids). A subclass whose `generate` must see every generation (a recorder) lists in `withheld` the
    capabilities whose parts would bypass it (`shared_kv_fork`: forked children; `concurrent_views`,
    `engine_native`: native runs): they read False, so the Context falls back to plain requests (a fork
    re-prefills through `generate`) or a strategy that cannot fall back fails at its check, by name."""

    withheld: ClassVar[tuple[str, ...]] = ()

    def __init__(self, inner: Backend, name: str | None = None) -> None:
        self.inner = inner
        self.name = name or inner.name

    # BackendBase's plain attribute becomes a read-only view of the inner backend's: mypy flags a property
    # over a writable attribute, which is the point here (the protocol asks only for reading it).
    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        caps = self.inner.capabilities
        return caps.model_copy(update=dict.fromkeys(self.withheld, False)) if self.withheld else caps

    async def start(self) -> Self:
        await self.inner.start()
        return self

    def generate(self, request: GenerationRequest) -> DeltaStream:
        return self.inner.generate(request)

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        return await self.inner.score(request)

    async def tokenize(self, text: str) -> list[int]:
        return await self.inner.tokenize(text)

    def fork(self, request_id: str, n: int, sampling: SamplingSpec | None = None) -> list[ForkedStream]:
        if "shared_kv_fork" in self.withheld:
            return super().fork(request_id, n, sampling)
        return self.inner.fork(request_id, n, sampling)

    def chat_ids(self, messages: list[dict[str, Any]], continue_final_message: bool = False) -> list[int]:
        return self.inner.chat_ids(messages, continue_final_message)

    def run_native(self, run_id: str, job: NativeJob, *, max_generated: int | None = None,
                   max_steps: int | None = None) -> NativeHandle:
        if "concurrent_views" in self.withheld:
            return super().run_native(run_id, job, max_generated=max_generated, max_steps=max_steps)
        return self.inner.run_native(run_id, job, max_generated=max_generated, max_steps=max_steps)

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        if name in ("engine", "tokenizer") and "engine_native" in self.withheld:
            raise AttributeError(f"{type(self).__name__} withholds the engine of {self.inner.name!r}")
        return getattr(self.inner, name)

"""The Backend protocol every model source implements, and its Capabilities.

A backend generates one branch per request as an async stream of Deltas. Cancelling the consumer of
`generate()` (closing the async generator, or cancelling the task that iterates it) must abort the
request on the server: in-process engines call their abort, HTTP backends call the server's abort
endpoint when it has one and close the stream as the last resort.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel

from ttscale.types import Delta, GenerationRequest, ScoreRequest, ScoreResult


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
    shared_kv_fork: bool = False
    kv_merge: bool = False
    concurrent_views: bool = False
    parallel_streams: bool = False
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
    capabilities: Capabilities

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
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

    async def close(self) -> None:
        """Release connections / engines."""
        ...


class BackendBase:
    """Defaults for the optional parts of the protocol; concrete backends subclass it."""

    name: str = "backend"
    capabilities: Capabilities = Capabilities()

    async def start(self) -> BackendBase:
        """Start engines / connect to servers; capabilities are exact only after this. Idempotent."""
        return self

    async def abort(self, request_id: str) -> None:
        return None

    async def score(self, request: ScoreRequest) -> ScoreResult:
        from ttscale.errors import CapabilityError

        raise CapabilityError(f"backend {self.name!r} cannot score continuations (no prompt logprobs)")

    async def tokenize(self, text: str) -> list[int]:
        from ttscale.errors import CapabilityError

        raise CapabilityError(f"backend {self.name!r} cannot tokenize")

    async def close(self) -> None:
        return None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class WrappingBackend(BackendBase):
    """A backend in front of another (`inner`): start, abort, score, tokenize, close and the engine-only
    extras (fork, stats, ...) go to it, and its capabilities are read from it, so they are the exact ones
    once `start` has run. Subclasses override what they change (generate, request ids)."""

    def __init__(self, inner: Backend, name: str | None = None) -> None:
        self.inner = inner
        self.name = name or inner.name

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return self.inner.capabilities

    async def start(self) -> WrappingBackend:
        start = getattr(self.inner, "start", None)
        if start is not None:
            await start()
        return self

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        return self.inner.generate(request)

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        return await self.inner.score(request)

    async def tokenize(self, text: str) -> list[int]:
        return await self.inner.tokenize(text)

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

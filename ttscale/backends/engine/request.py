"""A request's state inside the engine and the outputs it streams back.

`Request` is the engine thread's record of one generation (its sequence of KV views, tokens so far,
incremental-detokenisation state); only the engine thread changes it. Its output reaches the caller one of
two ways: a callback given a `RequestOutput` per token, or an `OutputSink` that reads the request's
published state itself, as often as it likes (no object per token; what `EngineBackend` uses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ttscale.backends.engine.kv_cache import Sequence
from ttscale.types import SamplingSpec

M63 = (1 << 63) - 1


def derive_seed(seed: int, *salt: int) -> int:
    """A child's seed from its parent's (forks): independent streams, reproducible from the parent's."""
    return hash((seed, *salt)) & M63


@dataclass(slots=True)
class RequestOutput:
    """New tokens of one request since its last output (`finished` on the last one).

    Slotted: one is made per live request per step on the engine thread and read on the event loop."""

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


class OutputSink:
    """A reader of one request's output on another thread, instead of a per-token callback.

    After each token (and when the request ends) the engine sets `Request.published` to (tokens, text
    characters, finish reason, error), one tuple written last so a reader never sees a finish before the
    tokens it covers, and calls `ready(r)` once until the reader clears `Request.queued`. The lists and text
    it counts only grow while the request runs (text can be cut back to a stop string; a reader slices what
    is there). At hundreds of live requests, a `RequestOutput` and a callback per token were a large part of
    the engine thread's host time, and merging them again a large part of the event loop's."""

    __slots__ = ()

    def bind(self, r: Request) -> None:
        """`r` is the request this sink reads (called before `r` first publishes)."""

    def ready(self, r: Request) -> None:
        """Engine thread: `r` published new output since the reader last cleared `r.queued`."""
        raise NotImplementedError


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingSpec
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
    detok: Any = None  # incremental detokeniser (tokenizers' DecodeStream); False: tokenizer has none
    finished: bool = False
    finish_reason: str | None = None
    n_forks: int = 0
    cached_logits: torch.Tensor | None = None
    resume_ids: list[int] | None = None  # prompt + generated tokens to recompute after a preemption
    block_hashes: tuple[list[int], list[int]] | None = None  # (prefill ids, their chained block hashes)
    sink: OutputSink | None = None
    published: tuple[int, int, str | None, str | None] = (0, 0, None, None)  # see OutputSink
    queued: bool = False  # `sink.ready` called and not yet taken by the reader

    @property
    def prefill_ids(self) -> list[int]:
        return self.resume_ids if self.resume_ids is not None else self.prompt_ids

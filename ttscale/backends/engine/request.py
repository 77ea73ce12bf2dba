"""A request's state inside the engine and the outputs it streams back.

`Request` is the engine thread's record of one generation (its sequence of KV views, tokens so far,
incremental-detokenisation state); only the engine thread touches it. `RequestOutput` is what crosses to
the caller's callback.
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

    @property
    def prefill_ids(self) -> list[int]:
        return self.resume_ids if self.resume_ids is not None else self.prompt_ids

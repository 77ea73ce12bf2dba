"""A request's state inside the engine and the outputs it streams back.

`Request` is the engine thread's record of one generation (its sequence of KV views, tokens so far,
incremental-detokenisation state); only the engine thread changes it. Its output reaches the caller one of
two ways: a callback given a `RequestOutput` per token, or an `OutputSink` that reads the request's
published state itself, as often as it likes (no object per token; what `EngineBackend` uses).
"""

from __future__ import annotations

import bisect
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


class Text:
    """A request's generated text, grown a token's piece at a time on the engine thread and sliced by a
    reader on another thread.

    `str +=` on an attribute copies the whole text every token: 64 branches x 32k tokens (128k characters
    each) spent 4.3 s in it against 0.1 s of list appends, a cost per token that grows with the text, so
    long reasoning slowed as it went. Here the pieces of the newest tokens sit in a tail; every `FOLD` of
    them are joined into one block, appended to a list of blocks with their end offsets (nothing already
    there is copied again). `state` is replaced whole when the tail folds (the block lists are only ever
    appended to, and a state counts the blocks it covers), so a reader that takes it once sees a
    consistent prefix of the text while the engine thread goes on appending.
    """

    FOLD = 16
    __slots__ = ("state", "length")

    def __init__(self, text: str = "") -> None:
        blocks, ends = ([text], [len(text)]) if text else ([], [])
        self.state: tuple[list[str], list[int], int, list[str]] = (blocks, ends, len(blocks), [])
        self.length = len(text)

    def append(self, piece: str) -> None:
        blocks, ends, nb, tail = self.state
        tail.append(piece)
        self.length += len(piece)
        if len(tail) >= self.FOLD:
            blocks.append("".join(tail))
            ends.append(self.length)
            self.state = (blocks, ends, nb + 1, [])

    def __len__(self) -> int:
        return self.length

    def slice(self, start: int, stop: int) -> str:
        """text[start:stop] (`stop` at most the length when the caller read it)."""
        blocks, ends, nb, tail = self.state
        folded = ends[nb - 1] if nb else 0
        out: list[str] = []
        if start < folded:
            i = bisect.bisect_right(ends, start, 0, nb)
            base = ends[i - 1] if i else 0
            j = min(bisect.bisect_left(ends, stop, i, nb) + 1, nb)
            out.append("".join(blocks[i:j])[start - base:stop - base])
        if stop > folded:
            out.append("".join(tail)[max(0, start - folded):stop - folded])
        return "".join(out) if len(out) > 1 else out[0] if out else ""

    def cut(self, n: int) -> None:
        """Keep the first `n` characters (a stop string's end)."""
        kept = self.slice(0, min(n, self.length))
        self.state = ([kept], [len(kept)], 1, []) if kept else ([], [], 0, [])
        self.length = len(kept)

    def copy(self) -> Text:
        """An independent copy (a fork's child goes on from its parent's text)."""
        return Text(str(self))

    def __str__(self) -> str:
        return self.slice(0, self.length)

    def __repr__(self) -> str:
        return f"Text({str(self)!r})"


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
    text: Text = field(default_factory=Text)
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

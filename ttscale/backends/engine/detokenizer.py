"""Incremental detokenisation and stop strings, per request, on the engine thread.

They stay on the step thread: with a fast tokenizer a token costs about 1 us here (`tokenizers`'
DecodeStream, in Rust), far below what a hand-off to another thread per step would cost, and a stop
string must end its request in the same step so that no token past it is generated or emitted.
"""

from __future__ import annotations

import copy
from typing import Any

from ttscale.backends.engine.request import Request


def _decode_stream() -> Any:
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21
        return None
    return DecodeStream(skip_special_tokens=True)


def fast_tokenizer(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` under a transformers fast tokenizer, when DecodeStream can use it."""
    inner = getattr(tokenizer, "_tokenizer", None)
    if inner is None or _decode_stream() is None:
        return None
    return inner


class Detokenizer:
    """Turns each request's newest token into new text, and finds its stop strings."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._fast = fast_tokenizer(tokenizer) if tokenizer is not None else None

    def step(self, r: Request) -> str:
        """Text of `r`'s newest token (text only once a multi-byte character is complete), appended to
        `r.text`.

        With a fast tokenizer, `tokenizers`' DecodeStream does it in Rust (about 1 us a token); otherwise
        two decodes of a short window (about 20 us), which at hundreds of branches a step is what costs."""
        if r.detok is None:
            r.detok = _decode_stream() if self._fast is not None else False
        if r.detok is not False:
            new = r.detok.step(self._fast, r.output_ids[-1])
            if new:
                r.text.append(new)
                return new
            return ""
        tok, ids = self.tokenizer, r.output_ids
        prefix = tok.decode(ids[r.prefix_offset:r.read_offset], skip_special_tokens=True)
        full = tok.decode(ids[r.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            r.prefix_offset, r.read_offset = r.read_offset, len(ids)
            r.text.append(new)
            return new
        return ""

    @staticmethod
    def fork_state(r: Request) -> Any:
        """A child's copy of `r`'s incremental-decoder state (a fork continues from the same text)."""
        return copy.copy(r.detok) if r.detok else r.detok

    @staticmethod
    def check_stop(r: Request, new: str) -> tuple[str | None, str]:
        """("stop", the part of `new` to emit) when `r.text` now holds one of its stop strings (the text is
        cut there, the stop string kept with `include_stop_str`); else (None, `new`). Only the window that
        `new` can have completed is searched."""
        if not new:
            return None, new
        longest = max(len(s) for s in r.params.stop)
        end = r.text.length
        start = max(0, end - len(new) - longest + 1)
        window = r.text.slice(start, end)
        hits = [(window.find(s), s) for s in r.params.stop]
        hits = [(start + i, s) for i, s in hits if i >= 0]
        if not hits:
            return None, new
        i, s = min(hits)
        cut = i + (len(s) if r.params.include_stop_str else 0)
        before = end - len(new)
        r.text.cut(cut)
        return "stop", r.text.slice(before, cut) if cut > before else ""

"""Reading OpenAI-compatible stream chunks into Deltas: token counts (estimated from the text when the
server sends none), logprobs and their top candidates, thinking sent apart from the content, stream errors,
and the live state of one streamed request."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ttscale.answers import THINK_CLOSE, THINK_OPEN
from ttscale.backends.http_transport import Endpoint, is_context_error
from ttscale.errors import BackendError, ContextOverflow
from ttscale.types import Delta

CHARS_PER_TOKEN = 4
# Estimated counts may run ahead of the server's real ones (long tokens, another tokenizer, pieces encoded
# apart), so a stream counted only from its text is cut at this multiple of max_tokens: an honest server
# stops first, one ignoring max_tokens still ends.
ESTIMATE_CUT_FACTOR = 1.5


def estimate_tokens(chars: int) -> int:
    """Tokens in `chars` characters of text when the server gives no counts (about 4 characters a token)."""
    return math.ceil(chars / CHARS_PER_TOKEN)


def reasoning_piece(choice: dict[str, Any]) -> str:
    """The thinking a chat delta carries apart from its content: vLLM's `reasoning_content` (older) or
    `reasoning` (newer) field, set when the server runs a reasoning parser."""
    delta = choice.get("delta") or {}
    return str(delta.get("reasoning_content") or delta.get("reasoning") or "")


def think_tagged(reasoning: str, content: str, thinking: bool) -> tuple[str, bool]:
    """A delta's text for the branch, with separately sent thinking wrapped in `<think>…</think>` so that a
    trace has one shape whether the server splits reasoning or not (`answers.split_reasoning` reads it);
    returns the text and whether the branch is still inside `<think>`."""
    out = ""
    if reasoning:
        out += "" if thinking else THINK_OPEN
        out += reasoning
        thinking = True
    if content and thinking:
        out += THINK_CLOSE
        thinking = False
    return out + content, thinking


def stream_error(base_url: str, request_id: str, err: Any) -> BackendError | ContextOverflow:
    """The error for an `error` object sent inside a stream (ContextOverflow when it says so)."""
    msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    return (ContextOverflow if is_context_error(msg) else BackendError)(
        f"{base_url} failed request {request_id!r}: {msg}")


@dataclass
class LiveStream:
    """Live state of one streamed request (so `abort(id)` can reach it from another task)."""

    request_id: str
    endpoint: Endpoint
    wire_id: str = ""  # unique per request on the server: callers' ids may repeat across Contexts
    # One slot: the reader waits for the consumer (back-pressure), so an abort never finds a backlog of
    # already-streamed deltas that would still "arrive" after it.
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=1))
    inflight: Any = None
    task: asyncio.Task | None = None
    aborted: bool = False
    done: bool = False
    released: bool = False  # its endpoint's outstanding count and the `_streams` entry are given back


def distinct_keys(pairs: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Candidate token -> logprob with one key per candidate: servers may send several candidates with the
    same text (byte pieces of one UTF-8 character); later ones get a `#k` suffix instead of overwriting."""
    out: dict[str, float] = {}
    for tok, lp in pairs:
        key, k = tok, 1
        while key in out:
            key, k = f"{tok}#{k}", k + 1
        out[key] = lp
    return out


def choice_delta(rid: str, choice: dict[str, Any], top_k: int) -> Delta:
    """One chat or completions choice of a stream chunk as a Delta: text, token ids (vLLM's field or
    `token_id:N` tokens), logprobs and the `top_k` best candidates per token."""
    if "delta" in choice:  # chat
        text = (choice.get("delta") or {}).get("content") or ""
        content = (choice.get("logprobs") or {}).get("content") or []
        lps = [float(c["logprob"]) for c in content]
        tokens = [c.get("token", "") for c in content]
        tops = [distinct_keys((t["token"], float(t["logprob"])) for t in (c.get("top_logprobs") or []))
                for c in content]
    else:  # completions
        text = choice.get("text") or ""
        lp = choice.get("logprobs") or {}
        lps = [float(x) for x in (lp.get("token_logprobs") or []) if x is not None]
        tokens = list(lp.get("tokens") or [])
        tops = [dict(t or {}) for t in (lp.get("top_logprobs") or [])]
    token_ids = choice.get("token_ids")
    if not isinstance(token_ids, list):
        token_ids = [int(t[9:]) for t in tokens if t.startswith("token_id:")]
        if len(token_ids) != len(tokens):
            token_ids = []
    num = None if token_ids or not lps else len(lps)
    top = None
    if top_k and tops:
        top = [dict(sorted(t.items(), key=lambda kv: -kv[1])[:top_k]) for t in tops]
    return Delta(
        request_id=rid, text=text, token_ids=list(token_ids), num_tokens=num,
        logprobs=lps or None, top_logprobs=top, tokens=tokens if lps and len(tokens) == len(lps) else None,
    )


def abort_delta(st: LiveStream) -> Delta:
    """The last Delta of an aborted stream, carrying whatever was received but not yet consumed."""
    pending: list[Delta] = []
    while not st.queue.empty():
        item = st.queue.get_nowait()
        if isinstance(item, Delta) and not item.finished:
            pending.append(item)
    if isinstance(st.inflight, Delta) and not st.inflight.finished:
        pending.append(st.inflight)
    st.inflight = None
    out = Delta(request_id=st.request_id, finished=True, finish_reason="abort")
    for d in pending:
        out.text += d.text
        out.token_ids += d.token_ids
        if d.num_tokens is not None or out.num_tokens is not None:
            out.num_tokens = (out.num_tokens or 0) + d.n_tokens
        if d.logprobs:
            out.logprobs = (out.logprobs or []) + d.logprobs
        if d.top_logprobs:
            out.top_logprobs = (out.top_logprobs or []) + d.top_logprobs
        if d.prompt_tokens is not None:
            out.prompt_tokens, out.cached_prompt_tokens = d.prompt_tokens, d.cached_prompt_tokens
    return out

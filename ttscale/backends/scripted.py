"""A scripted backend: plays back given texts token by token. For unit tests of strategy logic only.

Aborts, completions and token counts are recorded under the branch id (the request id without the
Context's unique prefix, `<uid>-b3` -> `b3`), so tests can name branches.

Each request gets a `Script` (from a list, in spawn order, or from a function of the request). Tokens
are the script's words (or given token strings); `delay_s` spaces them out in simulated time so races
have a known winner. Aborts are recorded so tests can check that losers were really stopped.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Sequence

from pydantic import BaseModel

from ttscale.backends.base import BackendBase, Capabilities, DeltaStream
from ttscale.types import Delta, GenerationRequest, ScoreRequest, ScoreResult


class Script(BaseModel):
    """What one request will produce."""

    text: str = ""
    tokens: list[str] | None = None
    delay_s: float = 0.0
    finish_reason: str = "stop"
    logprob: float = -0.5
    logprobs: list[float] | None = None
    top_logprobs: int = 0
    error: str | None = None

    def token_strings(self) -> list[str]:
        if self.tokens is not None:
            return list(self.tokens)
        parts = self.text.split(" ")
        return [p if i == 0 else " " + p for i, p in enumerate(parts)] if self.text else []


ScriptSource = Sequence[Script | str] | Callable[[GenerationRequest, int], Script | str]


class ScriptedBackend(BackendBase):
    """Plays scripts; `yield_every` > 0 yields to the event loop every that many tokens when delay is 0."""

    name = "scripted"

    def __init__(self, scripts: ScriptSource, *, yield_every: int = 1, max_context: int | None = None,
                 score_fn: Callable[[ScoreRequest], list[float]] | None = None):
        self._scripts = scripts
        self._count = 0
        self.yield_every = yield_every
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.completed: list[str] = []
        self.tokens_sent: dict[str, int] = {}
        self._score_fn = score_fn
        self.capabilities = Capabilities(
            abort=True, token_ids=True, top_logprobs=20, score=score_fn is not None, tokenize=True,
            max_context=max_context,
        )

    def _script_for(self, request: GenerationRequest) -> Script:
        i = self._count
        self._count += 1
        s = self._scripts(request, i) if callable(self._scripts) else self._scripts[i % len(self._scripts)]
        return Script(text=s) if isinstance(s, str) else s

    async def generate(self, request: GenerationRequest) -> DeltaStream:
        script = self._script_for(request)
        self.requests.append(request)
        rid = request.request_id
        key = branch_key(rid)
        toks = script.token_strings()
        limit = request.sampling.max_tokens
        reason = script.finish_reason
        if len(toks) > limit:
            toks, reason = toks[:limit], "length"
        self.tokens_sent[key] = 0
        final_sent = False
        try:
            if script.error:
                yield Delta(request_id=rid, finished=True, finish_reason="error", error=script.error)
                return
            for i, tok in enumerate(toks):
                if script.delay_s > 0:
                    await asyncio.sleep(script.delay_s)
                elif self.yield_every and i % self.yield_every == 0:
                    await asyncio.sleep(0)
                lp = script.logprobs[i] if script.logprobs is not None else script.logprob
                top = None
                if request.sampling.logprobs:
                    k = request.sampling.logprobs
                    top = [{tok: lp, **{f"<alt{j}>": lp - 1.0 - j for j in range(k - 1)}}]
                self.tokens_sent[key] += 1
                last = i == len(toks) - 1
                final_sent = last
                yield Delta(
                    request_id=rid, text=tok, token_ids=[_token_id(tok)], logprobs=[lp], top_logprobs=top,
                    prompt_tokens=_prompt_len(request) if i == 0 else None,
                    finished=last, finish_reason=reason if last else None,
                )
            if not toks:
                final_sent = True
                yield Delta(request_id=rid, finished=True, finish_reason=reason, prompt_tokens=_prompt_len(request))
            self.completed.append(key)
        except (asyncio.CancelledError, GeneratorExit):
            # The consumer may close the stream right after the final delta: that request completed.
            (self.completed if final_sent else self.aborted).append(key)
            raise

    async def abort(self, request_id: str) -> None:
        self.aborted.append(branch_key(request_id))

    async def score(self, request: ScoreRequest) -> ScoreResult:
        if self._score_fn is None:
            return await super().score(request)
        lps = self._score_fn(request)
        return ScoreResult(token_ids=[0] * len(lps), logprobs=lps)

    async def tokenize(self, text: str) -> list[int]:
        return [_token_id(t) for t in text.split()]


def branch_key(request_id: str) -> str:
    """The branch id inside a Context request id (`<12 hex>-<branch id>`), or the id itself."""
    m = re.fullmatch(r"[0-9a-f]{12}-(.+)", request_id)
    return m.group(1) if m else request_id


def _token_id(tok: str) -> int:
    return abs(hash(tok)) % 50_000


def _prompt_len(request: GenerationRequest) -> int:
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    if request.prompt is not None:
        return len(request.prompt.split())
    return sum(len(str(m.get("content", "")).split()) for m in request.messages or [])


def uniform_logprob(p: float) -> float:
    return math.log(p)

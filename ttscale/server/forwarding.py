"""Request parameters forwarded to every generation a strategy starts, and the logprobs recorded for its
answer. A strategy builds its own requests from its config; the wrapper below adds what the client's request
asked for (stop strings, penalties, logprobs, `chat_template_kwargs`, ...) on their way to the backend, so no
strategy has to know about them. Scoring calls (verifiers, ATTS) get none of them.
`chat_template_kwargs` are template variables only: `apply_chat_template`'s own arguments are refused by name
before the run starts (`refused_template_kwargs`). A `/v1/completions` prompt goes to the model as it is
(`RawPrompt`): the strategy still builds chat messages from the problem, and the wrapper sends those as the
raw prompt instead."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ttscale.backends.base import Backend, DeltaStream, WrappingBackend
from ttscale.backends.vllm import reserved_chat_template_keys
from ttscale.server.errors import ApiError
from ttscale.types import Delta, GenerationRequest, ScoreRequest, ScoreResult


@dataclass
class TokenRecord:
    """What a backend streamed for one request: token strings (when it sent them), logprobs and top-k."""

    tokens: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)

    def add(self, d: Delta) -> None:
        if d.logprobs:
            self.logprobs += d.logprobs
            self.token_ids += d.token_ids
            self.tokens += getattr(d, "tokens", None) or []
            self.top_logprobs += d.top_logprobs or [{} for _ in d.logprobs]

    def token_strings(self) -> list[str]:
        """The tokens as text; `token_id:N` (vLLM's `return_tokens_as_token_ids` form) where the backend
        sent ids only."""
        if len(self.tokens) == len(self.logprobs):
            return self.tokens
        return [f"token_id:{t}" for t in self.token_ids]


def refused_template_kwargs(chat_template_kwargs: dict[str, Any] | None) -> ApiError | None:
    """A 400 naming the first key of a request's `chat_template_kwargs` that is an argument of
    `apply_chat_template` (the template's source, `tokenize`, the conversation, ...) rather than a variable of
    the template; None when every key is a template variable."""
    reserved = reserved_chat_template_keys(chat_template_kwargs)
    if not reserved:
        return None
    key = reserved[0]
    return ApiError(400, f"'chat_template_kwargs.{key}' cannot be set: chat_template_kwargs holds the chat "
                    f"template's own variables (e.g. enable_thinking), and '{key}' is an argument of "
                    "apply_chat_template that the server sets itself", param=f"chat_template_kwargs.{key}",
                    code="unsupported_parameter")


def merge_sampling(request: GenerationRequest, updates: dict[str, Any],
                   chat_template_kwargs: dict[str, Any] | None) -> GenerationRequest:
    """`request` with the client's parameters added: stop strings and ids join the strategy's own, logprobs
    take the larger top-k, every other field is the client's."""
    s = request.sampling
    merged: dict[str, Any] = dict(updates)
    if "stop" in updates:
        merged["stop"] = list(dict.fromkeys([*s.stop, *updates["stop"]]))
    if "stop_token_ids" in updates:
        merged["stop_token_ids"] = list(dict.fromkeys([*s.stop_token_ids, *updates["stop_token_ids"]]))
    if "logprobs" in updates and s.logprobs is not None:
        merged["logprobs"] = max(s.logprobs, updates["logprobs"])
    out: dict[str, Any] = {"sampling": s.model_copy(update=merged)}
    if chat_template_kwargs and request.messages is not None:
        out["chat_template_kwargs"] = {**(request.chat_template_kwargs or {}), **chat_template_kwargs}
    return request.model_copy(update=out)


@dataclass(frozen=True)
class RawPrompt:
    """A `/v1/completions` prompt, which clients expect to reach the model unchanged. Strategies build chat
    messages from a problem (`Strategy.messages`: a system prompt, the prompt as a user message); a request
    whose messages are exactly those is sent as `text` instead, with no chat template and no system prompt.
    Any other request (an LLM judge's own conversation) is left as it is."""

    messages: list[dict[str, Any]]
    text: str

    def generation(self, request: GenerationRequest) -> GenerationRequest:
        if request.messages != self.messages or request.continue_final_message:
            return request
        return request.model_copy(update={"messages": None, "prompt": self.text, "chat_template_kwargs": None})

    def scoring(self, request: ScoreRequest) -> ScoreRequest:
        """A verifier scores the answer after the prompt the answer was generated from."""
        if request.messages != self.messages or request.continue_final_message:
            return request
        return request.model_copy(update={"messages": None, "prompt": self.text})


class ForwardedParams(WrappingBackend):
    """`inner` with the client's parameters added to every generation, the problem's messages sent as the
    raw prompt when there is one, and (when logprobs are asked) each request's streamed tokens recorded in
    `records` by request id. Never closes `inner`: the server reuses it across requests."""

    def __init__(self, inner: Backend, updates: dict[str, Any], chat_template_kwargs: dict[str, Any] | None,
                 record_logprobs: bool, raw_prompt: RawPrompt | None = None) -> None:
        super().__init__(inner)
        self.updates, self.chat_template_kwargs, self.raw_prompt = updates, chat_template_kwargs, raw_prompt
        self.records: dict[str, TokenRecord] | None = {} if record_logprobs else None

    def generate(self, request: GenerationRequest) -> DeltaStream:
        if self.raw_prompt is not None:
            request = self.raw_prompt.generation(request)
        request = merge_sampling(request, self.updates, self.chat_template_kwargs)
        stream = self.inner.generate(request)
        if self.records is None:
            return stream
        return self._recorded(request.request_id, stream)

    async def _recorded(self, request_id: str, stream: DeltaStream) -> DeltaStream:
        assert self.records is not None
        record = self.records.setdefault(request_id, TokenRecord())
        try:
            async for d in stream:
                record.add(d)
                yield d
        finally:
            await stream.aclose()

    async def score(self, request: ScoreRequest) -> ScoreResult:
        if self.raw_prompt is not None:
            request = self.raw_prompt.scoring(request)
        return await self.inner.score(request)

    async def close(self) -> None:
        """The inner backend belongs to the server; nothing of its own to close."""

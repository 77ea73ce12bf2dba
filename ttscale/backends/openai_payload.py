"""The body an OpenAI-compatible server gets for a GenerationRequest: the standard fields, vendor fields
(vLLM / SGLang) only for servers that accepted them in the probe, and the context-length check."""

from __future__ import annotations

from typing import Any

from ttscale.errors import ConfigError, ContextOverflow
from ttscale.types import GenerationRequest, SamplingSpec


def request_payload(request: GenerationRequest, *, model: str | None, server: str, vendor_fields: bool,
                    token_ids: bool, rid: str | None, top_logprobs: int) -> tuple[str, dict[str, Any]]:
    """The path and streamed body for `request` at `server`: vendor fields (`vendor_fields`: top_k,
    stop_token_ids, chat_template_kwargs, ...; `token_ids`: return_token_ids) only where the probe saw them
    accepted, SGLang's `rid` when given, logprobs up to the server's `top_logprobs`."""
    s: SamplingSpec = request.sampling
    p: dict[str, Any] = {
        "model": model, "stream": True, "max_tokens": s.max_tokens, "temperature": s.temperature,
        "top_p": s.top_p, "stream_options": {"include_usage": True},
    }
    if s.seed is not None:
        p["seed"] = s.seed
    if s.stop:
        p["stop"] = list(s.stop)
    if s.presence_penalty:
        p["presence_penalty"] = s.presence_penalty
    if s.frequency_penalty:
        p["frequency_penalty"] = s.frequency_penalty
    if s.logit_bias:
        p["logit_bias"] = {str(k): v for k, v in s.logit_bias.items()}
    vllm_only = {k: v for k, v in (("repetition_penalty", s.repetition_penalty), ("min_p", s.min_p),
                                    ("min_tokens", s.min_tokens)) if k in s.penalties_set()}
    if vllm_only and not vendor_fields:
        raise ConfigError(f"{server} does not accept {', '.join(vllm_only)} (not a vLLM/SGLang server)")
    p.update(vllm_only)
    if vendor_fields:
        if s.top_k:
            p["top_k"] = s.top_k
        if s.stop_token_ids:
            p["stop_token_ids"] = list(s.stop_token_ids)
        if s.include_stop_str:
            p["include_stop_str_in_output"] = True
        if s.ignore_eos:
            p["ignore_eos"] = True
    elif s.top_k or s.stop_token_ids or s.ignore_eos:
        raise ConfigError(
            f"{server} does not accept top_k / stop_token_ids / ignore_eos (not a vLLM/SGLang server)"
        )
    if token_ids:
        p["return_token_ids"] = True
    if rid is not None:
        p["rid"] = rid
    k = s.logprobs or 0
    if request.messages is not None:
        if top_logprobs:
            p["logprobs"] = True
            # vLLM's chat list holds the sampled token first, then the best ones, cut at k: ask one
            # more and keep the k best (see openai_stream.choice_delta) so the result is the true top-k.
            p["top_logprobs"] = min(k + 1, top_logprobs) if k and vendor_fields else k
        p["messages"] = request.messages
        if request.chat_template_kwargs:
            if not vendor_fields:
                raise ConfigError(f"{server} does not accept chat_template_kwargs (not a vLLM/SGLang server)")
            p["chat_template_kwargs"] = request.chat_template_kwargs
        if request.continue_final_message:
            if not vendor_fields:
                raise ConfigError(f"{server} does not support continue_final_message")
            p["continue_final_message"] = True
            p["add_generation_prompt"] = False
        return "/v1/chat/completions", p
    if top_logprobs:
        p["logprobs"] = k
    p["prompt"] = request.prompt if request.prompt is not None else list(request.prompt_token_ids or [])
    return "/v1/completions", p

def check_context(request: GenerationRequest, *, max_context: int | None, model: str | None, server: str) -> None:
    """ContextOverflow when a tokenized prompt plus max_tokens cannot fit the model's context."""
    ctx = max_context
    if ctx is None or request.prompt_token_ids is None:
        return  # text prompts are measured by the server (it answers 400 when the prompt is too long)
    n = len(request.prompt_token_ids)
    if n + request.sampling.max_tokens > ctx:
        raise ContextOverflow(
            f"the prompt has {n} tokens and max_tokens={request.sampling.max_tokens}; together they exceed "
            f"the model's context of {ctx} tokens ({model} at {server})"
        )

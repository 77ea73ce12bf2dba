"""SGLang's native API: streaming `/generate` with our own `rid`, and `/abort_request`.

The native API returns token ids and logprobs for every token and aborts by request id, which the
OpenAI-compatible routes only do partly. It does not apply chat templates: chat requests are rendered
with the model's Hugging Face tokenizer (pass `tokenizer=` a folder or hub id available offline).

Wire format (SGLang ≥ 0.4): each SSE `data:` line is `{"text", "output_ids", "meta_info": {"id",
"finish_reason": null | {"type": "stop" | "length" | "abort", ...}, "prompt_tokens", "completion_tokens",
"cached_tokens", "output_token_logprobs": [[logprob, token_id, text], ...], "output_top_logprobs":
[[[logprob, token_id, text], ...], ...]}}`. By default `text`, `output_ids` and the logprob lists are
cumulative; with `--incremental-streaming-output` they are per chunk. Both are handled.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ttscale.backends.base import Capabilities
from ttscale.backends.openai import OpenAIBackend, _Stream, stream_error
from ttscale.errors import BackendError, ConfigError
from ttscale.types import Delta, GenerationRequest, SamplingSpec, ScoreRequest, ScoreResult


class SGLangBackend(OpenAIBackend):
    """An SGLang server through its native `/generate`; retries, endpoints, timeouts, reply checks and the
    release of every stream's bookkeeping as OpenAIBackend."""

    name = "sglang"

    def __init__(self, base_url: str | list[str], *, tokenizer: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("abort_method", "sglang")
        kwargs.setdefault("detect", False)
        super().__init__(base_url, **kwargs)
        self._tokenizer_name = tokenizer
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self._tokenizer_name is None:
                raise ConfigError(
                    "SGLang's /generate takes no chat messages: pass tokenizer= (a local model folder) to "
                    "render the chat template, or use the OpenAI-compatible backend"
                )
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_name)
        return self._tokenizer

    async def _detect(self) -> None:
        _ep, models = await self._get_models()
        data = models.get("data") or []
        info = next((m for m in data if m.get("id") == self.model), data[0] if data else {})
        if self.model is None:
            self.model = info.get("id")
        max_ctx = None
        for key in ("max_model_len", "context_length"):
            if isinstance(info.get(key), int):
                max_ctx = int(info[key])
                break
        self.capabilities = Capabilities(
            streaming=True, abort=True, n_per_request=False, token_ids=True, top_logprobs=20, score=True,
            tokenize=self._tokenizer_name is not None, prefix_cache=True, chat=self._tokenizer_name is not None,
            completion=True, max_context=max_ctx,
        )

    # ----------------------------------------------------------------- request mapping
    def _input(self, prompt: str | None, messages: list[dict[str, Any]] | None, ids: list[int] | None,
               continue_final_message: bool) -> dict[str, Any]:
        if ids is not None:
            return {"input_ids": list(ids)}
        if messages is not None:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=not continue_final_message,
                continue_final_message=continue_final_message,
            )
            return {"input_ids": list(self.tokenizer.encode(text, add_special_tokens=False))}
        return {"text": prompt}

    @staticmethod
    def sampling_params(s: SamplingSpec) -> dict[str, Any]:
        """SamplingSpec -> SGLang `sampling_params` (top_k=-1 means off in SGLang)."""
        out: dict[str, Any] = {
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k if s.top_k else -1,
            "max_new_tokens": s.max_tokens,
        }
        if s.stop:
            out["stop"] = list(s.stop)
        if s.stop_token_ids:
            out["stop_token_ids"] = list(s.stop_token_ids)
        if s.seed is not None:
            out["sampling_seed"] = s.seed
        if s.include_stop_str:
            out["no_stop_trim"] = True
        if s.ignore_eos:
            out["ignore_eos"] = True
        return out

    def generate_payload(self, request: GenerationRequest, wire_id: str | None = None) -> dict[str, Any]:
        p = self._input(request.prompt, request.messages, request.prompt_token_ids, request.continue_final_message)
        p.update(
            rid=wire_id or request.request_id, stream=True, sampling_params=self.sampling_params(request.sampling),
            return_logprob=True, top_logprobs_num=request.sampling.logprobs or 0, logprob_start_len=-1,
        )
        return p

    # ----------------------------------------------------------------- generate
    async def _pump_request(self, st: _Stream, request: GenerationRequest) -> None:
        await self._pump_native(st, self.generate_payload(request, st.wire_id), request.sampling.logprobs or 0)

    async def _pump_native(self, st: _Stream, payload: dict[str, Any], top_k: int) -> None:
        n_tok = 0
        text_so_far = ""
        first = True
        finish: str | None = None
        prompt_tokens = cached = None
        async with contextlib.aclosing(self._stream_chunks(st, "/generate", payload)) as chunks:
            async for chunk in chunks:
                if "error" in chunk:
                    raise stream_error(st.endpoint.base_url, st.request_id, chunk["error"])
                meta = chunk.get("meta_info") or {}
                prompt_tokens = meta.get("prompt_tokens", prompt_tokens)
                cached = meta.get("cached_tokens", cached)
                total = meta.get("completion_tokens")
                out_lps = meta.get("output_token_logprobs") or []
                out_top = meta.get("output_top_logprobs") or []
                ids = chunk.get("output_ids")
                if not isinstance(total, int):
                    total = n_tok + len(out_lps)
                new = total - n_tok
                # Cumulative lists hold every token so far; incremental ones only this chunk's.
                cumulative = len(out_lps) == total
                lps_new = out_lps[n_tok:] if cumulative else out_lps
                top_new = out_top[n_tok:] if len(out_top) == total else out_top
                token_ids = [int(x[1]) for x in lps_new]
                if not token_ids and isinstance(ids, list) and new > 0:
                    token_ids = [int(x) for x in (ids[n_tok:] if len(ids) == total else ids)]
                text = chunk.get("text") or ""
                if text.startswith(text_so_far):
                    piece, text_so_far = text[len(text_so_far):], text
                else:  # incremental streaming output
                    piece, text_so_far = text, text_so_far + text
                reason = meta.get("finish_reason")
                if isinstance(reason, dict):
                    finish = str(reason.get("type") or "stop")
                elif isinstance(reason, str):
                    finish = reason
                d = Delta(
                    request_id=st.request_id, text=piece, token_ids=token_ids,
                    num_tokens=None if len(token_ids) == new else new,
                    logprobs=[float(x[0]) for x in lps_new] or None,
                    top_logprobs=[
                        {str(c[2] if c[2] is not None else c[1]): float(c[0]) for c in (pos or [])[:top_k]}
                        for pos in top_new
                    ] if top_k and top_new else None,
                )
                if first and prompt_tokens is not None:
                    d.prompt_tokens, d.cached_prompt_tokens = prompt_tokens, cached
                    first = False
                n_tok = total
                if piece or new or d.prompt_tokens is not None:
                    await self._emit(st, d)
        await self._finish(st, finish, prompt_tokens if first else None, cached if first else None)

    # ----------------------------------------------------------------- score / tokenize
    async def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Continuation logprobs from `/generate` with `return_logprob` over the prompt (input_token_logprobs)."""
        await self.connect()
        ctx = self._input(request.prompt, request.messages, request.prompt_token_ids, request.continue_final_message)
        if "input_ids" not in ctx:
            ctx = {"input_ids": list(self.tokenizer.encode(ctx["text"]))}
        if request.continuation_token_ids is not None:
            cont = list(request.continuation_token_ids)
        else:
            cont = list(self.tokenizer.encode(request.continuation or "", add_special_tokens=False))
        if not cont:
            return ScoreResult(token_ids=[], logprobs=[])
        n_ctx = len(ctx["input_ids"])
        payload = {
            "input_ids": ctx["input_ids"] + cont, "return_logprob": True, "logprob_start_len": n_ctx,
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
        }
        body = await self._post_json("/generate", payload)
        if isinstance(body, list):
            body = body[0]
        entries = (body.get("meta_info") or {}).get("input_token_logprobs") or []
        if len(entries) < len(cont):
            raise BackendError(f"SGLang returned {len(entries)} input logprobs for {len(cont)} continuation tokens")
        tail = entries[-len(cont):]
        got = [int(e[1]) for e in tail]
        if got != cont:
            raise BackendError(f"SGLang scored tokens {got}, expected {cont}")
        return ScoreResult(token_ids=cont, logprobs=[float(e[0]) for e in tail])

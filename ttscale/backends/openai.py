"""Backend for any OpenAI-compatible server (vLLM, SGLang, llama.cpp, hosted APIs) over httpx.

`connect()` (run on first use otherwise) asks the server what it can do: the model and its context
(`/v1/models`, vLLM reports `max_model_len`), whether one probe completion returns token ids
(vLLM `return_token_ids`), prompt logprobs (vLLM `prompt_logprobs`) or echoed logprobs, `n>1`,
`/tokenize`, and how to abort (SGLang `/abort_request` with our own `rid`; otherwise closing the
stream, which vLLM turns into an abort of the request). Vendor fields are only sent to servers that
accepted them in the probe, so strict servers do not reject requests.

Requests are spread over several base URLs of one model (least outstanding requests first); a
connection error, 429 or 5xx before the stream starts is retried with exponential back-off, on another
endpoint when there is one. Once tokens have been streamed a request is never retried (that would
duplicate output): the stream ends with an error instead.

Every wait is bounded: `connect_timeout_s` (TCP connect), `first_token_timeout_s` (request sent until the
first stream chunk; also any non-streamed call), `idle_timeout_s` (between chunks) and `timeout_s` (the
whole request). A hang raises `BackendTimeout` naming the limit. Replies are checked: a stream line that
is not server-sent events, or a data line that is not JSON, is a `BackendError` (a proxy answers 502).

Token counts come from token ids or logprobs. A server that sends neither is counted from the text
(`tokenizer=` a local Hugging Face tokenizer folder, else `estimate_tokens`: 4 characters a token);
those Deltas say `estimated_tokens=True` and the server's final usage corrects them. A stream that runs
past `max_tokens` (a server ignoring it) is cut there (at `ESTIMATE_CUT_FACTOR` times it when counted
from the text) and ends with finish reason "length".

Reasoning models: thinking that a server sends apart from the content (vLLM's `reasoning_content` /
`reasoning` delta fields) goes into the branch text inside `<think>…</think>`, the shape models without a
reasoning parser produce, so answers are read from the section after `</think>` either way.

Split by job: `http_transport` (endpoints, retries, bounded and cancel-safe sends, SSE), `openai_payload`
(request bodies), `openai_stream` (chunks into Deltas); this module keeps probing, streaming and aborts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncGenerator
from typing import Any, Literal

import httpx

from ttscale.backends.base import BackendBase, Capabilities, DeltaStream
from ttscale.backends.http_transport import (
    Endpoint,
    EndpointPool,
    close_response,
    send_cancel_safe,
    sse_chunks,
    sse_payload,
)
from ttscale.backends.openai_payload import check_context, request_payload
from ttscale.backends.openai_stream import (
    CHARS_PER_TOKEN,
    ESTIMATE_CUT_FACTOR,
    LiveStream,
    abort_delta,
    choice_delta,
    distinct_keys,
    estimate_tokens,
    reasoning_piece,
    stream_error,
    think_tagged,
)
from ttscale.errors import BackendError, BackendTimeout, BackendUnavailable, ConfigError, ContextOverflow
from ttscale.types import Delta, GenerationRequest, ScoreRequest, ScoreResult

__all__ = [
    "CHARS_PER_TOKEN", "ESTIMATE_CUT_FACTOR", "AbortMethod", "Endpoint", "OpenAIBackend", "close_response",
    "distinct_keys", "estimate_tokens", "reasoning_piece", "send_cancel_safe", "sse_chunks", "sse_payload",
    "stream_error", "think_tagged",
]

AbortMethod = Literal["sglang", "disconnect"]
_Stream = LiveStream  # the name subclasses (sglang.py) import


class OpenAIBackend(EndpointPool, BackendBase):
    """An OpenAI-compatible HTTP server (or several replicas of one model)."""

    name = "openai"

    def __init__(
        self,
        base_url: str | list[str],
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float | None = 600.0,
        connect_timeout_s: float = 5.0,
        first_token_timeout_s: float | None = 300.0,
        idle_timeout_s: float | None = 300.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        max_connections: int = 256,
        abort_method: AbortMethod | None = None,
        detect: bool = True,
        headers: dict[str, str] | None = None,
        tokenizer: str | None = None,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        super().__init__(
            urls, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s,
            first_token_timeout_s=first_token_timeout_s, idle_timeout_s=idle_timeout_s, max_retries=max_retries,
            backoff_s=backoff_s, max_backoff_s=max_backoff_s, max_connections=max_connections, api_key=api_key,
            headers=headers,
        )
        self._count_tokenizer_name = tokenizer
        self._count_tokenizer: Any = None
        self.model = model
        self.detect = detect
        self.abort_method: AbortMethod = abort_method or "disconnect"
        self._abort_forced = abort_method is not None
        self._connected = False
        self._connect_lock: asyncio.Lock | None = None
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        # What the probe found (vendor extensions are sent only when accepted).
        self.ext_token_ids = False
        self.ext_prompt_logprobs = False
        self.ext_echo = False
        self.ext_sampling = False  # top_k, continue_final_message, add_generation_prompt
        self.server_info: dict[str, Any] = {}
        self.capabilities = Capabilities(streaming=True, abort=True, chat=True, completion=True)

    # ----------------------------------------------------------------- capability detection
    async def connect(self) -> OpenAIBackend:
        """Find the model, its context and the server's extensions (idempotent)."""
        if self._connected:
            return self
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if not self._connected:
                await self._detect()
                if self._count_tokenizer_name is not None:  # loaded here, off the event loop, not mid-stream
                    from transformers import AutoTokenizer

                    self._count_tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained,
                                                                    self._count_tokenizer_name)
                self._connected = True
        return self

    async def start(self) -> OpenAIBackend:
        """Same as `connect()` (the name in-process backends use)."""
        return await self.connect()

    async def _detect(self) -> None:
        ep, models = await self._get_models()
        data = models.get("data") or []
        names = [m.get("id") for m in data]
        info = next((m for m in data if m.get("id") == self.model), None) if self.model else (data[0] if data else None)
        if self.model is None:
            if info is None:
                raise BackendUnavailable(f"{ep.base_url} serves no model (empty /v1/models)")
            self.model = info["id"]
        elif info is None and names:
            raise ConfigError(f"model {self.model!r} is not served at {ep.base_url}; it serves: {', '.join(names)}")
        max_ctx = None
        if info:
            self.server_info = dict(info)
            for key in ("max_model_len", "context_length", "max_context_length", "max_total_tokens"):
                if isinstance(info.get(key), int):
                    max_ctx = int(info[key])
                    break
        caps: dict[str, Any] = {"streaming": True, "abort": True, "chat": True, "completion": True,
                                "max_context": max_ctx}
        if self.detect:
            caps.update(await self._probe(ep))
        self.capabilities = Capabilities(**caps)

    async def _probe(self, ep: Endpoint) -> dict[str, Any]:
        caps: dict[str, Any] = {}
        rich = {
            "model": self.model, "prompt": "Hello world", "max_tokens": 1, "temperature": 1.0, "n": 2, "logprobs": 1,
            "echo": True, "prompt_logprobs": 0, "return_token_ids": True, "top_k": 1,
        }
        try:
            body = await self._post_json("/v1/completions", rich, endpoint=ep, pinned=True)
            choices = body.get("choices") or []
            c0 = choices[0] if choices else {}
            self.ext_sampling = True
            self.ext_token_ids = isinstance(c0.get("token_ids"), list)
            self.ext_prompt_logprobs = isinstance(c0.get("prompt_logprobs"), list)
            lp = (c0.get("logprobs") or {}).get("token_logprobs") or []
            self.ext_echo = len(lp) > 1
            caps["n_per_request"] = len(choices) == 2
            caps["top_logprobs"] = 20
        except BackendTimeout:
            raise  # a server that does not answer a 1-token probe: no use asking it again now
        except (BackendError, ContextOverflow):
            plain = {"model": self.model, "prompt": "Hi", "max_tokens": 1, "logprobs": 1}
            try:
                await self._post_json("/v1/completions", plain, endpoint=ep, pinned=True)
                caps["top_logprobs"] = 5
            except (BackendError, ContextOverflow):
                caps["completion"] = False
                caps["top_logprobs"] = 0
        caps["token_ids"] = self.ext_token_ids
        caps["score"] = self.ext_prompt_logprobs or self.ext_echo
        try:
            resp = await self._bounded(self._client.post(
                f"{ep.base_url}/tokenize", json={"model": self.model, "prompt": "Hi"}), "/tokenize")
            caps["tokenize"] = resp.status_code == 200 and isinstance(resp.json().get("tokens"), list)
        except (httpx.HTTPError, ValueError, AttributeError, BackendTimeout):
            caps["tokenize"] = False
        if not self._abort_forced:
            try:
                resp = await self._bounded(self._client.post(
                    f"{ep.base_url}/abort_request", json={"rid": "ttscale-probe"}), "/abort_request")
                self.abort_method = "sglang" if resp.status_code < 400 else "disconnect"
            except (httpx.HTTPError, BackendTimeout):
                self.abort_method = "disconnect"
        caps["prefix_cache"] = self.ext_sampling  # vLLM / SGLang servers cache prefixes by default
        return caps

    # ----------------------------------------------------------------- generate
    def _payload(self, request: GenerationRequest, wire_id: str | None = None) -> tuple[str, dict[str, Any]]:
        return request_payload(
            request, model=self.model, server=self.urls[0], vendor_fields=self.ext_sampling,
            token_ids=self.ext_token_ids, top_logprobs=self.capabilities.top_logprobs,
            rid=(wire_id or request.request_id) if self.abort_method == "sglang" else None,
        )

    def _check_context(self, request: GenerationRequest) -> None:
        check_context(request, max_context=self.capabilities.max_context, model=self.model, server=self.urls[0])

    async def generate(self, request: GenerationRequest) -> DeltaStream:
        """Stream one branch. Cancelling the consumer aborts it on the server (see the module doc)."""
        await self.connect()
        self._check_context(request)
        rid = request.request_id
        ep = self._pick()
        st = _Stream(request_id=rid, endpoint=ep, wire_id=f"{rid}-{next(self._ids)}-{uuid.uuid4().hex[:6]}")
        self._streams[st.wire_id] = st
        ep.outstanding += 1
        st.task = asyncio.create_task(self._guarded(st, request))
        try:
            while True:
                item = await st.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            try:
                if not st.done:
                    await self._abort_stream(st)  # re-raises the consumer's own cancellation
            finally:
                self._release(st)

    def _release(self, st: _Stream) -> None:
        """Give back a stream's bookkeeping (once, on every exit path: end, abort, cancel, error)."""
        if st.released:
            return
        st.released = True
        self._streams.pop(st.wire_id, None)
        st.endpoint.outstanding -= 1

    async def _guarded(self, st: _Stream, request: GenerationRequest) -> None:
        """Run the reader (`_pump_request`) within `timeout_s`; every error reaches the consumer, never
        vanishes in a task. A broken connection becomes a BackendError naming the request and endpoint."""
        total = asyncio.timeout(self.timeout_s)
        try:
            async with total:
                await self._pump_request(st, request)
        except asyncio.CancelledError:
            st.done = True
            raise
        except TimeoutError as e:
            if not st.done:
                st.done = True
                await self._emit(st, BackendTimeout(
                    f"request {st.request_id!r} to {st.endpoint.base_url} did not finish within "
                    f"{self.timeout_s:g} s (timeout_s)") if total.expired() else e)
        except (httpx.TimeoutException, httpx.TransportError) as e:
            if not st.done:
                st.done = True
                await self._emit(st, BackendError(
                    f"stream of {st.request_id!r} from {st.endpoint.base_url} broke: {type(e).__name__}: {e}"
                ))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
            if not st.done:
                st.done = True
                await self._emit(st, e)

    async def _pump_request(self, st: _Stream, request: GenerationRequest) -> None:
        path, payload = self._payload(request, st.wire_id)
        await self._pump(st, path, payload, request.sampling.logprobs or 0, request.sampling.max_tokens)

    async def _stream_chunks(self, st: _Stream, path: str, payload: dict[str, Any]
                             ) -> AsyncGenerator[dict[str, Any], None]:
        """POST `payload` and yield the stream's JSON chunks, each wait bounded: the first chunk within
        `first_token_timeout_s` of sending, the next ones within `idle_timeout_s` of the one before (the
        time the consumer takes is not counted)."""
        loop = asyncio.get_running_loop()
        phase, limit = "first_token_timeout_s", self.first_token_timeout_s
        cm = asyncio.timeout_at(None if limit is None else loop.time() + limit)
        try:
            async with cm:
                resp, used = await self._open(path, payload, stream=True, endpoint=st.endpoint)
                self._move(st, used)
                try:
                    async for chunk in sse_chunks(resp, f"{st.endpoint.base_url}{path}"):
                        cm.reschedule(None)
                        yield chunk
                        phase, limit = "idle_timeout_s", self.idle_timeout_s
                        cm.reschedule(None if limit is None else loop.time() + limit)
                finally:
                    if not cm.expired():
                        cm.reschedule(None)
                    await close_response(resp)
        except TimeoutError as e:
            if not cm.expired():
                raise
            what = "no first token" if phase == "first_token_timeout_s" else "no token"
            raise BackendTimeout(f"{st.endpoint.base_url}{path}: {what} for request {st.request_id!r} within "
                                 f"{limit:g} s ({phase})") from e

    def _estimate(self, text: str, chars_so_far: int) -> int:
        """Tokens in `text` when the server sends no counts: the local tokenizer's when one is configured,
        else `estimate_tokens` of all text so far minus that of the text before (no per-piece rounding)."""
        if self._count_tokenizer is not None:
            return len(self._count_tokenizer.encode(text, add_special_tokens=False))
        return estimate_tokens(chars_so_far + len(text)) - estimate_tokens(chars_so_far)

    async def _pump(self, st: _Stream, path: str, payload: dict[str, Any], top_k: int,
                    max_tokens: int | None = None) -> None:
        """Read the SSE stream into the queue; ends with a finished Delta or an exception."""
        counted = 0
        estimated_chars = 0
        estimated = False
        prompt_tokens = cached = None
        finish: str | None = None
        first = True
        cut_at: float | None = max_tokens
        thinking = False  # inside reasoning deltas: the branch text has an open `<think>`
        async with contextlib.aclosing(self._stream_chunks(st, path, payload)) as chunks:
            async for chunk in chunks:
                if "error" in chunk and not chunk.get("choices"):
                    raise stream_error(st.endpoint.base_url, st.request_id, chunk["error"])
                if isinstance(chunk.get("prompt_token_ids"), list):  # vLLM chat puts it at top level
                    prompt_tokens = len(chunk["prompt_token_ids"])
                usage = chunk.get("usage")
                if usage:
                    prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
                    details = usage.get("prompt_tokens_details") or {}
                    cached = details.get("cached_tokens", cached)
                    total = usage.get("completion_tokens")
                    if isinstance(total, int) and (total > counted or estimated):
                        await self._emit(st, Delta(request_id=st.request_id, num_tokens=total - counted,
                                                   estimated_tokens=False if estimated else None))
                        counted = total
                for choice in chunk.get("choices") or []:
                    if isinstance(choice.get("prompt_token_ids"), list):  # vLLM completions: 1st chunk
                        prompt_tokens = len(choice["prompt_token_ids"])
                    d = choice_delta(st.request_id, choice, top_k)
                    reasoning = reasoning_piece(choice)
                    if reasoning or thinking:
                        d.text, thinking = think_tagged(reasoning, d.text, thinking)
                    if d.text and d.num_tokens is None and not d.token_ids:  # the server sent no counts
                        d.num_tokens = self._estimate(d.text, estimated_chars)
                        d.estimated_tokens = True
                        estimated_chars += len(d.text)
                        if not estimated and max_tokens is not None:
                            cut_at = max_tokens * ESTIMATE_CUT_FACTOR
                        estimated = True
                    if cut_at is not None and d.n_tokens and counted >= cut_at:
                        finish = "length"  # the server ignores max_tokens: cut it here
                        break
                    if first and prompt_tokens is not None:
                        d.prompt_tokens = prompt_tokens
                        first = False
                    counted += d.n_tokens
                    finish = choice.get("finish_reason") or finish
                    if d.text or d.n_tokens or d.prompt_tokens is not None:
                        await self._emit(st, d)
                else:
                    continue
                break
        await self._finish(st, finish, prompt_tokens if first else None, cached)
    @classmethod
    async def _finish(cls, st: _Stream, finish: str | None, prompt_tokens: int | None,
                      cached: int | None) -> None:
        """End a stream read to its close: the last Delta, with its finish reason ("stop" when the server
        gave none) and the prompt counts no earlier Delta carried."""
        st.done = True
        await cls._emit(st, Delta(request_id=st.request_id, finished=True, finish_reason=finish or "stop",
                                  prompt_tokens=prompt_tokens, cached_prompt_tokens=cached))

    @staticmethod
    async def _emit(st: _Stream, item: Delta | BaseException) -> None:
        st.inflight = item
        await st.queue.put(item)
        st.inflight = None

    @staticmethod
    def _move(st: _Stream, used: Endpoint) -> None:
        """A retry went to another replica: the outstanding count follows the request."""
        if used is not st.endpoint:
            st.endpoint.outstanding -= 1
            used.outstanding += 1
            st.endpoint = used

    async def _abort_stream(self, st: _Stream) -> None:
        """Abort on the server and stop the reader; re-raises when the calling task itself is cancelled
        (the reader is stopped first either way)."""
        st.aborted = True
        try:
            if self.abort_method == "sglang":
                with contextlib.suppress(httpx.HTTPError, BackendTimeout):  # closing the stream below is the fallback
                    await self._bounded(self._client.post(  # a hung server gets the stream closed instead
                        f"{st.endpoint.base_url}/abort_request", json={"rid": st.wire_id}), "/abort_request",
                        self.connect_timeout_s, "connect_timeout_s")
        finally:
            if st.task is not None and not st.task.done():
                st.task.cancel()  # closes the HTTP stream: vLLM aborts a request whose client went away
                try:
                    await st.task
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                st.queue.put_nowait(abort_delta(st))

    async def abort(self, request_id: str) -> None:
        """Abort one branch; its stream ends with a Delta whose finish_reason is "abort"."""
        for st in [st for st in self._streams.values() if st.request_id == request_id and not st.done]:
            await self._abort_stream(st)

    # ----------------------------------------------------------------- score / tokenize
    async def _tokenize_payload(self, payload: dict[str, Any]) -> list[int]:
        body = await self._post_json("/tokenize", {"model": self.model, **payload})
        return [int(t) for t in body["tokens"]]

    async def tokenize(self, text: str) -> list[int]:
        await self.connect()
        if not self.capabilities.tokenize:
            return await super().tokenize(text)
        return await self._tokenize_payload({"prompt": text, "add_special_tokens": False})

    async def _context_ids(self, r: ScoreRequest) -> list[int]:
        if r.prompt_token_ids is not None:
            return list(r.prompt_token_ids)
        if not self.capabilities.tokenize:
            raise ConfigError(f"{self.urls[0]} has no /tokenize: pass prompt_token_ids to score()")
        if r.messages is not None:
            return await self._tokenize_payload({
                "messages": r.messages, "add_generation_prompt": not r.continue_final_message,
                "continue_final_message": r.continue_final_message,
            })
        return await self._tokenize_payload({"prompt": r.prompt})

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Logprobs of the continuation via prompt logprobs (vLLM) or echo + logprobs (classic API)."""
        await self.connect()
        if not self.capabilities.score:
            return await super().score(request)
        ctx = await self._context_ids(request)
        if request.continuation_token_ids is not None:
            cont = list(request.continuation_token_ids)
        elif self.capabilities.tokenize:
            cont = await self._tokenize_payload({"prompt": request.continuation, "add_special_tokens": False})
        else:
            raise ConfigError(f"{self.urls[0]} has no /tokenize: pass continuation_token_ids to score()")
        if not cont:
            return ScoreResult(token_ids=[], logprobs=[])
        ids = ctx + cont
        p: dict[str, Any] = {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0}
        if self.ext_prompt_logprobs:
            p["prompt_logprobs"] = 0
        else:
            p.update(echo=True, logprobs=0)
        body = await self._post_json("/v1/completions", p)
        choice = body["choices"][0]
        if self.ext_prompt_logprobs:
            plp = choice["prompt_logprobs"]
            lps = [float(plp[len(ctx) + i][str(t)]["logprob"]) for i, t in enumerate(cont)]
        else:
            tl = choice["logprobs"]["token_logprobs"]
            lps = [float(x) for x in tl[len(ctx): len(ctx) + len(cont)]]
        return ScoreResult(token_ids=cont, logprobs=lps)

    async def close(self) -> None:
        for st in list(self._streams.values()):
            if not st.done:
                await self._abort_stream(st)
        await self._client.aclose()

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
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import httpx

from ttscale.answers import THINK_CLOSE, THINK_OPEN
from ttscale.backends.base import BackendBase, Capabilities
from ttscale.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    ContextOverflow,
    await_by,
)
from ttscale.types import Delta, GenerationRequest, SamplingSpec, ScoreRequest, ScoreResult

AbortMethod = Literal["sglang", "disconnect"]
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_CONTEXT_WORDS = ("maximum context length", "context length", "max_model_len", "too long", "context window")
_SSE_FIELDS = ("event:", "id:", "retry:")
CHARS_PER_TOKEN = 4
# Estimated counts may run ahead of the server's real ones (long tokens, another tokenizer, pieces encoded
# apart), so a stream counted only from its text is cut at this multiple of max_tokens: an honest server
# stops first, one ignoring max_tokens still ends.
ESTIMATE_CUT_FACTOR = 1.5


def estimate_tokens(chars: int) -> int:
    """Tokens in `chars` characters of text when the server gives no counts (about 4 characters a token)."""
    return math.ceil(chars / CHARS_PER_TOKEN)


def _is_context_error(message: str) -> bool:
    m = message.lower()
    return any(w in m for w in _CONTEXT_WORDS)


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(err)
    return str(body)[:500]


def sse_payload(line: str, where: str) -> Any:
    """The JSON of one SSE line; None for lines that carry no data; `...` at `data: [DONE]`.

    Anything that is not server-sent events (an HTML page, a bare JSON body) or a data line that is not
    JSON raises BackendError naming `where` and the line.
    """
    if not line or line.startswith(":") or line.startswith(_SSE_FIELDS):
        return None
    if not line.startswith("data:"):
        raise BackendError(f"{where} sent a line that is not server-sent events: {line[:200]!r}")
    data = line[5:].strip()
    if data == "[DONE]":
        return ...
    try:
        return json.loads(data)
    except ValueError as e:
        raise BackendError(f"{where} sent a stream line that is not JSON: {line[:200]!r}") from e


async def sse_chunks(resp: httpx.Response, where: str = "") -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a server-sent-events response, up to `data: [DONE]` (checked: `sse_payload`)."""
    where = where or str(resp.url)
    async for line in resp.aiter_lines():
        payload = sse_payload(line, where)
        if payload is ...:
            return
        if payload is None:
            continue
        if not isinstance(payload, dict):
            raise BackendError(f"{where} sent a stream chunk that is not a JSON object: {line[:200]!r}")
        yield payload


async def _until_done(fut: asyncio.Future, on_cancel: Callable[[], object] | None = None) -> bool:
    """Wait for `fut` to end however often the calling task is cancelled meanwhile (each time `on_cancel`
    runs); whether it was."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancelled = True
            if on_cancel is not None:
                on_cancel()
    return cancelled


async def close_response(resp: httpx.Response) -> None:
    """Close `resp` to the end even when the calling task is cancelled meanwhile (the cancellation is
    re-raised once it is closed).

    httpcore gives a connection back to its pool, or closes it, only at the end of `aclose()`, past awaits
    that `Task.cancel` interrupts (its shield guards against anyio's cancel scopes only). Cut short, the
    connection stays checked out for good: a socket left in CLOSE-WAIT once the server closes its side. A
    branch aborted while its reader closes a stream that just ended (ffs aborts its losers then) did that.
    """
    closing = asyncio.ensure_future(resp.aclose())
    if await _until_done(closing):
        raise asyncio.CancelledError
    closing.result()


async def send_cancel_safe(client: httpx.AsyncClient, request: httpx.Request, *, stream: bool) -> httpx.Response:
    """`client.send(request)` in a child task that `Task.cancel` never reaches: cancelling the caller (an
    abort, a timeout) cancels the send through an anyio cancel scope, which httpcore's shields honour, and
    waits for it to end (a response that arrived meanwhile is closed) before re-raising.

    Cancelled natively right after its TCP connect, httpcore leaves the new connection in its pool in state
    NEW, never used and never closed: one socket and one pool slot lost per cancellation landing there.
    """
    scope = anyio.CancelScope()

    async def send() -> httpx.Response | None:
        with scope:
            return await client.send(request, stream=stream)
        return None  # cancelled through the scope

    sending = asyncio.ensure_future(send())
    if not await _until_done(sending, scope.cancel):
        resp = sending.result()
        assert resp is not None
        return resp
    if not sending.cancelled() and sending.exception() is None and (resp := sending.result()) is not None:
        await close_response(resp)
    raise asyncio.CancelledError


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


def stream_error(base_url: str, request_id: str, err: Any) -> BackendError:
    """The error for an `error` object sent inside a stream (ContextOverflow when it says so)."""
    msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    return (ContextOverflow if _is_context_error(msg) else BackendError)(
        f"{base_url} failed request {request_id!r}: {msg}")


@dataclass
class Endpoint:
    base_url: str
    outstanding: int = 0
    failures: int = 0


@dataclass
class _Stream:
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

class OpenAIBackend(BackendBase):
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
        if not urls:
            raise ConfigError("OpenAIBackend needs at least one base URL")
        for name, value in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s),
                            ("first_token_timeout_s", first_token_timeout_s), ("idle_timeout_s", idle_timeout_s)):
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ConfigError(f"OpenAIBackend {name} must be a number of seconds > 0 (got {value!r})")
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.first_token_timeout_s, self.idle_timeout_s = first_token_timeout_s, idle_timeout_s
        self._count_tokenizer_name = tokenizer
        self._count_tokenizer: Any = None
        self.endpoints = [Endpoint(self._normalise(u)) for u in urls]
        self.model = model
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.detect = detect
        self.abort_method: AbortMethod = abort_method or "disconnect"
        self._abort_forced = abort_method is not None
        hdrs = {"Accept": "application/json"}
        if api_key:
            hdrs["Authorization"] = f"Bearer {api_key}"
        hdrs.update(headers or {})
        self._client = httpx.AsyncClient(
            headers=hdrs,
            # Only the connect is bounded by httpx; reads are bounded per phase (first token, idle, total).
            timeout=httpx.Timeout(None, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._connected = False
        self._connect_lock: asyncio.Lock | None = None
        self._streams: dict[str, _Stream] = {}
        self._rr = itertools.count()
        self._ids = itertools.count()
        # What the probe found (vendor extensions are sent only when accepted).
        self.ext_token_ids = False
        self.ext_prompt_logprobs = False
        self.ext_echo = False
        self.ext_sampling = False  # top_k, continue_final_message, add_generation_prompt
        self.server_info: dict[str, Any] = {}
        self.capabilities = Capabilities(streaming=True, abort=True, chat=True, completion=True)

    @staticmethod
    def _normalise(url: str) -> str:
        url = url.rstrip("/")
        url = url.removesuffix("/v1")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"base URL {url!r} must start with http:// or https://")
        return url

    @property
    def urls(self) -> list[str]:
        return [e.base_url for e in self.endpoints]

    # ----------------------------------------------------------------- transport
    def _pick(self, avoid: set[str] | None = None) -> Endpoint:
        """Least outstanding requests first; ties rotate so replicas share the load."""
        cands = [e for e in self.endpoints if not avoid or e.base_url not in avoid] or self.endpoints
        start = next(self._rr) % len(cands)
        rotated = cands[start:] + cands[:start]
        return min(rotated, key=lambda e: e.outstanding)

    def _delay(self, attempt: int, resp: httpx.Response | None) -> float:
        if resp is not None and (ra := resp.headers.get("retry-after")):
            try:
                return min(self.max_backoff_s, max(0.0, float(ra)))
            except ValueError:
                pass
        base = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        return base * (0.5 + random.random() / 2)

    async def _open(
        self, path: str, payload: dict[str, Any], *, stream: bool, endpoint: Endpoint | None = None,
        pinned: bool = False,
    ) -> tuple[httpx.Response, Endpoint]:
        """POST with retries (connect errors, 429, 5xx); returns an OK response and the endpoint used.

        `endpoint` is tried first; retries go to other endpoints when there are any (unless `pinned`).
        """
        last: str = ""
        tried: set[str] = set()
        for attempt in range(self.max_retries + 1):
            if attempt == 0 and endpoint is not None or pinned:
                ep = endpoint or self._pick(tried)
            else:
                ep = self._pick(tried)
                if len(tried) >= len(self.endpoints):
                    tried.clear()
            tried.add(ep.base_url)
            url = f"{ep.base_url}{path}"
            resp: httpx.Response | None = None
            try:
                req = self._client.build_request("POST", url, json=payload)
                resp = await send_cancel_safe(self._client, req, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as e:
                ep.failures += 1
                last = f"cannot reach {url}: {type(e).__name__}: {e}"
            except httpx.TimeoutException as e:
                raise BackendTimeout(f"request to {url} timed out ({type(e).__name__})") from e
            else:
                if resp.status_code < 400:
                    ep.failures = 0
                    return resp, ep
                if stream:
                    await resp.aread()
                msg = _error_message(resp)
                if resp.status_code in _RETRY_STATUS:
                    last = f"{url} answered {resp.status_code}: {msg}"
                    await resp.aclose()
                else:
                    await resp.aclose()
                    if resp.status_code in (400, 413, 422) and _is_context_error(msg):
                        raise ContextOverflow(f"{msg} (server {ep.base_url})")
                    if resp.status_code in (401, 403):
                        raise BackendError(f"{url} refused the request ({resp.status_code}): {msg}; check the API key")
                    raise BackendError(f"{url} answered {resp.status_code}: {msg}")
            if attempt < self.max_retries:
                await asyncio.sleep(self._delay(attempt, resp))
        if "cannot reach" in last:
            raise BackendUnavailable(f"{last} (after {self.max_retries + 1} attempts)")
        raise BackendError(f"{last} (after {self.max_retries + 1} attempts)")

    def _reply_limit(self) -> float | None:
        """How long a non-streamed call may wait for its whole answer (its first token is all of it)."""
        limits = [x for x in (self.first_token_timeout_s, self.timeout_s) if x is not None]
        return min(limits) if limits else None

    async def _bounded(self, aw: Any, what: str, limit: float | None = None, flag: str = "first_token_timeout_s"
                       ) -> Any:
        """Await `aw` within `limit` (default `_reply_limit()`); past it, BackendTimeout naming `what`."""
        limit = limit if limit is not None else self._reply_limit()
        if limit is None:
            return await aw
        return await await_by(aw, asyncio.get_running_loop().time() + limit,
                              lambda: f"{what} gave no answer within {limit:g} s ({flag})")

    async def _post_json(
        self, path: str, payload: dict[str, Any], endpoint: Endpoint | None = None, pinned: bool = False
    ) -> Any:
        resp, ep = await self._bounded(self._open(path, payload, stream=False, endpoint=endpoint, pinned=pinned),
                                       f"POST {path}")
        try:
            return resp.json()
        except ValueError as e:
            raise BackendError(f"{ep.base_url}{path} returned non-JSON: {resp.text[:200]!r}") from e

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

    async def _get_models(self) -> tuple[Endpoint, dict[str, Any]]:
        errors = []
        timed_out = 0
        for ep in self.endpoints:
            try:
                resp = await self._bounded(self._client.get(f"{ep.base_url}/v1/models"),
                                           f"{ep.base_url}/v1/models")
            except BackendTimeout as e:
                errors.append(str(e))
                timed_out += 1
                continue
            except httpx.HTTPError as e:
                errors.append(f"{ep.base_url}: {type(e).__name__}: {e}")
                continue
            if resp.status_code == 200:
                try:
                    body = resp.json()
                except ValueError:
                    errors.append(f"{ep.base_url}/v1/models answered 200 with a body that is not JSON: "
                                  f"{resp.text[:200]!r}")
                    continue
                if isinstance(body, dict):
                    return ep, body
                errors.append(f"{ep.base_url}/v1/models answered 200 with {type(body).__name__}, not an object")
                continue
            if resp.status_code in (401, 403):
                raise BackendError(
                    f"{ep.base_url}/v1/models refused the request ({resp.status_code}): {_error_message(resp)}; "
                    "check the API key"
                )
            errors.append(f"{ep.base_url}/v1/models answered {resp.status_code}: {_error_message(resp)}")
        if timed_out == len(self.endpoints):
            raise BackendTimeout("no OpenAI-compatible server answered in time: " + "; ".join(errors))
        raise BackendUnavailable("no OpenAI-compatible server reachable: " + "; ".join(errors))

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
        caps: dict[str, Any] = {"streaming": True, "abort": True, "chat": True, "completion": True, "max_context": max_ctx}
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
        s: SamplingSpec = request.sampling
        p: dict[str, Any] = {
            "model": self.model, "stream": True, "max_tokens": s.max_tokens, "temperature": s.temperature,
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
        if vllm_only and not self.ext_sampling:
            raise ConfigError(f"{self.urls[0]} does not accept {', '.join(vllm_only)} (not a vLLM/SGLang server)")
        p.update(vllm_only)
        if self.ext_sampling:
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
                f"{self.urls[0]} does not accept top_k / stop_token_ids / ignore_eos (not a vLLM/SGLang server)"
            )
        if self.ext_token_ids:
            p["return_token_ids"] = True
        if self.abort_method == "sglang":
            p["rid"] = wire_id or request.request_id
        k = s.logprobs or 0
        if request.messages is not None:
            if self.capabilities.top_logprobs:
                p["logprobs"] = True
                # vLLM's chat list holds the sampled token first, then the best ones, cut at k: ask one
                # more and keep the k best (see _choice_delta) so the result is the true top-k.
                p["top_logprobs"] = min(k + 1, self.capabilities.top_logprobs) if k and self.ext_sampling else k
            p["messages"] = request.messages
            if request.chat_template_kwargs:
                if not self.ext_sampling:
                    raise ConfigError(f"{self.urls[0]} does not accept chat_template_kwargs (not a vLLM/SGLang server)")
                p["chat_template_kwargs"] = request.chat_template_kwargs
            if request.continue_final_message:
                if not self.ext_sampling:
                    raise ConfigError(f"{self.urls[0]} does not support continue_final_message")
                p["continue_final_message"] = True
                p["add_generation_prompt"] = False
            return "/v1/chat/completions", p
        if self.capabilities.top_logprobs:
            p["logprobs"] = k
        p["prompt"] = request.prompt if request.prompt is not None else list(request.prompt_token_ids or [])
        return "/v1/completions", p

    def _check_context(self, request: GenerationRequest) -> None:
        ctx = self.capabilities.max_context
        if ctx is None or request.prompt_token_ids is None:
            return  # text prompts are measured by the server (it answers 400 when the prompt is too long)
        n = len(request.prompt_token_ids)
        if n + request.sampling.max_tokens > ctx:
            raise ContextOverflow(
                f"the prompt has {n} tokens and max_tokens={request.sampling.max_tokens}; together they exceed "
                f"the model's context of {ctx} tokens ({self.model} at {self.urls[0]})"
            )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
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

    async def _stream_chunks(self, st: _Stream, path: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
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
                    d = self._choice_delta(st.request_id, choice, top_k)
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

    def _choice_delta(self, rid: str, choice: dict[str, Any], top_k: int) -> Delta:
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
    def _abort_delta(st: _Stream) -> Delta:
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
                try:
                    await self._bounded(self._client.post(  # a hung server gets the stream closed instead
                        f"{st.endpoint.base_url}/abort_request", json={"rid": st.wire_id}), "/abort_request",
                        self.connect_timeout_s, "connect_timeout_s")
                except (httpx.HTTPError, BackendTimeout):
                    pass  # closing the stream below is the fallback
        finally:
            if st.task is not None and not st.task.done():
                st.task.cancel()  # closes the HTTP stream: vLLM aborts a request whose client went away
                try:
                    await st.task
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                st.queue.put_nowait(self._abort_delta(st))

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

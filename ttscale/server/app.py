"""OpenAI-compatible serving: a proxy in front of existing servers, or our own backend served directly.

Routes (`build_router`): `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`.

Routing a request:

- **strategy request**: the model name carries a strategy prefix, `STRATEGY[-N][:k=v,...]/MODEL`
  (`ffs-8/qwen`, `self-consistency-16/qwen`, `sc:n=4,temperature=0.8/qwen`), or the body has a
  `ttscale` object (`extra_body={"ttscale": {"strategy": "ffs", "n": 8}}` in the openai client). The
  strategy runs in a ttscale Context on an `OpenAIBackend` pointing at the upstream(s) (or on the
  configured backend) and the answer comes back as an ordinary completion.
- **pass-through**: any other model name. The body is forwarded unchanged to an upstream and the
  upstream's bytes are streamed back (status code included) through one pooled `aiohttp.ClientSession`
  (httpcore's pool scans every connection for every request: at 64 concurrent clients that scan was
  two thirds of the proxy's CPU, `benchmarks/serve_load.py`).

The `ttscale` request object: `strategy` (spec string), any field of the strategy's config (`n`, `k`, ...),
and server options: `budget` (`{"total_tokens", "sequential_tokens", "wall_time_s"}`), `kind`
(`math` | `choice` | `free`, default `math`: answers are extracted from `\\boxed{}`; `free` votes on
normalised last lines), `progress`
(`false` | `true` | `"deltas"`: progress events in streamed chunks), `include_traces` (bool).

Before anything starts, a request is held to the operator's choices: fields naming a server resource (ATTS
`target` and `calibration_file`, DeepPrune `judge`) take only names given to `ttscale serve`
(server/resources.py), and the calls and tokens its strategy may start (`Strategy.max_branches`,
`max_tokens_bound`) or a pass-through request's prompts × n must fit `max_branches` and `max_total_tokens`
(server/limits.py); the Host and Origin headers are checked first (server/guards.py).

Response extensions (extra keys the openai client keeps in `model_extra`):

- `usage.ttscale`: what the strategy spent: `generated_tokens` (all branches; also `completion_tokens`),
  `sequential_tokens` (critical path), `saved_tokens` (an estimate of what aborted branches would still
  have generated), `unspent_token_cap` (the ceiling: max_tokens - generated over aborted branches),
  `branches`, `aborted`, `calls`, `wall_time_s`.
- non-streamed: top-level `ttscale`: `strategy`, `answer`, `decision`, `usage`, (`traces`).
- streamed: every chunk may carry `ttscale`: `{"event": "spawned"|"finished"|"aborted"|"failed"|"budget"|
  "decision"|"delta", "branch": id, ...}` when progress is asked for; the last content chunk always has
  `ttscale: {"event": "done", "t_end": ..., "answer": ..., "usage": ...}` where `t_end` is the server's
  `time.monotonic()` when the strategy finished. Single-branch strategies (`single`, or a strategy class
  with `streams_answer = True`) stream the answer's text as it is generated; the others send it when the
  strategy has chosen it (progress events meanwhile, if asked).

The answer's text (`answer_choice`): the text the strategy chose, else a finished trace whose answer is the
chosen answer; a trace cut at `max_tokens` only when no trace that stopped by itself has that answer, and with
no answer at all (a haiku under `kind: math`) the first trace that stopped by itself, so content is never
empty while any trace has text. Chat responses carry the section after `</think>` as `content` and the
thinking as `reasoning_content`, as vLLM's reasoning parsers do; completions carry the whole text.

A client that disconnects cancels its request: the strategy's Context is closed (every branch aborted
upstream) or the pass-through upstream stream is closed (vLLM aborts a request whose client went away).
Errors use OpenAI's schema `{"error": {"message", "type", "param", "code"}}`. Upstream waits are bounded
(`ServeConfig.upstream_*timeout_s`: connect, first token, idle between chunks, total): past one, 504 with
code `upstream_timeout`; an upstream answer that is not JSON / not server-sent events is a 502 saying why
(inside a stream already under way: its last chunk). `GET /health` probes the upstreams (cached briefly).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import aiohttp
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ttscale.answers import same_answer, split_reasoning, split_reasoning_partial
from ttscale.backends.base import Backend
from ttscale.budget import Budget
from ttscale.controller import Context
from ttscale.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    CapabilityError,
    ConfigError,
    ContextOverflow,
    UnknownNameError,
    await_by,
)
from ttscale.server.guards import HostOriginGuard, request_headers
from ttscale.server.limits import check_passthrough, check_strategy
from ttscale.server.resources import ResourceRefused, ServerResources
from ttscale.strategies.base import Strategy
from ttscale.strategies.registry import get_strategy_class, parse_spec, strategies
from ttscale.types import BranchStatus, Event, Problem, Result, StrictModel, Trace, Usage

STATE_KEY = "ttscale_serving"
_SERVER_KEYS = {"strategy", "budget", "kind", "progress", "include_traces"}
_PROGRESS_KINDS = {"spawned", "finished", "aborted", "failed", "budget", "decision"}
_JSON = "application/json"
_SSE = "text/event-stream"


class ServeConfig(StrictModel):
    """Server limits and wiring. `upstreams` (proxy mode) or a backend passed to `Serving` is required."""

    upstreams: list[str] = Field(default_factory=list, description="OpenAI-compatible base URLs of one model set")
    upstream_api_key: str | None = Field(None, description="bearer token sent to the upstream(s)")
    api_key: str | None = Field(None, description="clients must send `Authorization: Bearer <api_key>`")
    served_model_name: str | None = Field(None, description="model name when serving a backend directly")
    max_n: int = Field(64, ge=1, description="largest `n` (OpenAI choices, or a strategy's branch count)")
    max_tokens: int = Field(8192, ge=1, description="largest `max_tokens` per generation")
    max_body_bytes: int = Field(2 * 2**20, ge=1024, description="largest request body")
    max_branches: int = Field(256, ge=1, description="most upstream calls (generations and scoring) one "
                              "request may start, over all its strategy's fields; pass-through: prompts x n")
    max_total_tokens: int = Field(2**20, ge=1, description="most tokens one request may generate (checked "
                                  "from its config before it starts, and the default budget of its Context)")
    targets: dict[str, str] = Field(default_factory=dict, description="ATTS target backends a request may "
                                    "name: NAME -> backend spec (requests never give specs)")
    judges: dict[str, str] = Field(default_factory=dict, description="DeepPrune judges a request may name "
                                   "besides the built-in ones: NAME -> judge spec (classifier:PATH)")
    calibrations: dict[str, str] = Field(default_factory=dict, description="ATTS offline calibration files a "
                                         "request may name as `calibration_file`: NAME -> PATH")
    allowed_hosts: list[str] = Field(["localhost", "127.0.0.1", "[::1]"], description="Host header names "
                                     "served (`*` = any, `*.example.com`); the CLI allows any off loopback")
    allowed_origins: list[str] = Field(default_factory=list, description="web origins whose pages may call "
                                       "the server (CORS); a request with another foreign Origin is refused")
    upstream_timeout_s: float = Field(600.0, gt=0, description="longest one upstream request may take in all")
    upstream_connect_timeout_s: float = Field(5.0, gt=0, description="TCP connect to an upstream")
    upstream_first_token_timeout_s: float = Field(
        300.0, gt=0, description="request sent until the upstream's first streamed chunk (a non-streamed "
        "answer: all of it)")
    upstream_idle_timeout_s: float = Field(120.0, gt=0, description="longest silence between streamed chunks")
    upstream_probe_timeout_s: float = Field(
        5.0, gt=0, description="how long /health and model-name lookups wait for an upstream's /v1/models")
    upstream_retries: int = Field(1, ge=0, description="retries of a strategy branch's upstream call")
    max_connections: int = Field(1024, ge=1, description="pooled upstream connections")


# --------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered to the client in OpenAI's error schema."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def api_error_from(exc: BaseException) -> ApiError:
    """Map a ttscale error (or anything else) to the HTTP error the client sees."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BackendUnavailable):
        return ApiError(502, f"upstream unavailable: {exc}", type="upstream_error", code="upstream_unavailable")
    if isinstance(exc, ContextOverflow):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, CapabilityError):
        return ApiError(400, str(exc), param="model", code="unsupported_strategy")
    if isinstance(exc, UnknownNameError):
        return ApiError(400, str(exc), param="model", code="unknown_strategy")
    if isinstance(exc, ConfigError):
        return ApiError(400, str(exc), param=None, code="invalid_value")
    if isinstance(exc, BackendTimeout):
        return ApiError(504, f"upstream timeout: {exc}", type="upstream_error", code="upstream_timeout")
    if isinstance(exc, BackendError):
        return ApiError(502, f"upstream error: {exc}", type="upstream_error", code="upstream_error")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
MAX_JSON_DEPTH = 128  # deeper bodies would hit Python's recursion limit later (encoding them upstream)


def json_depth(body: Any) -> int:
    """Nesting depth of parsed JSON (iterative: it must not recurse on the input it measures)."""
    deepest, stack = 0, [(body, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict | list):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (x.values() if isinstance(x, dict) else x))
    return deepest


def lone_surrogate_at(body: Any) -> str | None:
    """Dotted path of the first string (or key) in `body` that is not valid Unicode (a lone surrogate)."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return path or "(body)"
        elif isinstance(x, dict):
            for k, v in x.items():
                sub = f"{path}.{k}" if path else str(k)
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    return path or "(body)"
                stack.append((sub, v))
        elif isinstance(x, list):
            stack.extend((f"{path}.{i}", v) for i, v in enumerate(x))
    return None


def _validation_error(exc: ValidationError, prefix: str = "", *, source: str | None = None) -> ApiError:
    """A 400 naming the request field: `prefix` + the error's location, or `source` when the value came
    from elsewhere (a strategy config field set by the body's `max_tokens`, the model prefix, `ttscale`)."""
    e = exc.errors()[0]
    loc = ".".join(str(x) for x in e["loc"])
    if source is not None and source.startswith("ttscale.") and loc:
        param = f"ttscale.{loc}"
        what = f"'{param}'"
    elif source is not None:
        param = source
        what = f"'{loc}' (from {source})" if loc and loc != source else f"'{source}'"
    else:
        param = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or None)
        what = f"'{param}'"
    if e["type"] == "extra_forbidden":
        msg = f"{what} is not supported here"
        if not prefix and source is None:
            msg += " (strategy requests accept the sampling fields of the OpenAI API only)"
    else:
        msg = f"invalid {what}: {e['msg']}"
        if "input" in e and e["type"] != "missing":
            msg += f" (got {e['input']!r})"
    return ApiError(400, msg, param=param, code="invalid_value")


# --------------------------------------------------------------------------------------------- bodies


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _StrategyBody(BaseModel):
    """Fields a strategy request may carry (anything else is a 400 naming the field)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    stream: bool = False
    stream_options: _StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=1, description="strategies answer one choice; their branch count is ttscale.n")
    seed: int | None = None
    user: str | None = None
    ttscale: dict[str, Any] | None = None


class _ChatBody(_StrategyBody):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class _CompletionBody(_StrategyBody):
    prompt: str | list[str] = Field(min_length=1)
    echo: Literal[False] = False


class _ServerOptions(StrictModel):
    budget: Budget | None = None
    kind: Literal["math", "choice", "free"] = "math"
    progress: bool | Literal["deltas"] = False
    include_traces: bool = False


# --------------------------------------------------------------------------------------------- responses


class _Relay(Response):
    """An ASGI response whose status, headers and body come from `opener` (run when the response starts).

    The body is `bytes` (sent at once, with Content-Length) or an async iterator of chunks (streamed).
    The whole exchange, waiting for the upstream or the strategy included, is watched for the client's
    disconnect; when it goes away the work is cancelled (which aborts branches / closes upstream streams).
    """

    def __init__(self, opener: Callable[[], Awaitable[tuple[int, str, bytes | AsyncIterator[bytes]]]]):
        self.opener = opener
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        state = {"disconnected": False, "complete": False}

        async def watch() -> None:
            for _ in range(1000):  # a receive() that replays the body (some middlewares) must not spin
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    if not state["complete"]:
                        state["disconnected"] = True
                        task.cancel()
                    return

        watcher = asyncio.create_task(watch())
        chunks: bytes | AsyncIterator[bytes] | None = None
        try:
            try:
                status, media, chunks = await self.opener()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
                err = api_error_from(exc)
                status, media, chunks = err.status, _JSON, json.dumps(err.body()).encode()
            headers = [(b"content-type", media.encode())]
            if isinstance(chunks, bytes):
                headers.append((b"content-length", str(len(chunks)).encode()))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                state["complete"] = True
                await send({"type": "http.response.body", "body": chunks, "more_body": False})
                return
            await send({"type": "http.response.start", "status": status, "headers": headers})
            async for chunk in chunks:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            state["complete"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["disconnected"]:
                raise
            task.uncancel()
        except OSError:  # the client went away while we were writing
            pass
        finally:
            state["complete"] = True
            watcher.cancel()
            if chunks is not None and hasattr(chunks, "aclose"):
                with contextlib.suppress(Exception):
                    await chunks.aclose()  # type: ignore[union-attr]


_SSE_FIELDS = (b"event:", b"id:", b"retry:")
_MAX_SSE_LINE = 8 * 2**20


def json_problem(body: bytes) -> str | None:
    """What is wrong with an answer that should be a JSON object (None when it is one)."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return f"a body that is not JSON: {body[:200]!r}"
    return None if isinstance(obj, dict) else f"JSON that is not an object: {body[:200]!r}"


def check_sse(buffer: bytes, final: bool = False) -> tuple[bytes, bytes, str | None]:
    """Split relayed stream bytes into (whole lines that are valid server-sent events, the unfinished last
    line, what is wrong with the first bad line or None). `final`: the stream ended, the tail is a line."""
    cut = len(buffer) if final else buffer.rfind(b"\n") + 1
    good_end = 0
    for line in buffer[:cut].splitlines(keepends=True):
        text = line.rstrip(b"\r\n")
        if text and not text.startswith(b":") and not text.startswith(_SSE_FIELDS):
            if not text.startswith(b"data:"):
                return buffer[:good_end], b"", f"a line that is not server-sent events: {text[:200]!r}"
            data = text[5:].strip()
            if data != b"[DONE]":
                try:
                    json.loads(data)
                except (ValueError, UnicodeDecodeError):
                    return buffer[:good_end], b"", f"a stream line that is not JSON: {text[:200]!r}"
        good_end += len(line)
    tail = buffer[cut:]
    if len(tail) > _MAX_SSE_LINE:
        return buffer[:good_end], b"", f"a stream line longer than {_MAX_SSE_LINE} bytes"
    return buffer[:good_end], tail, None


async def _before(aw: Awaitable[Any], limit_at: float, deadline: float, what: str, flag: str) -> Any:
    """Await `aw` until `limit_at` (a phase's limit, set by `flag`) or `deadline` (the request's total),
    whichever is first; past it, BackendTimeout saying `what` and the flag that sets the limit."""
    return await await_by(aw, min(limit_at, deadline),
                          lambda: f"{what} in time ({'--upstream-timeout' if deadline <= limit_at else flag})")


class _Relayed:
    """A pass-through stream being relayed. `aclose` gives its upstream connection and outstanding count
    back even when it was never iterated (the client left before the first byte went out)."""

    def __init__(self, gen: AsyncIterator[bytes], release: Callable[[bool], None]):
        self._gen, self._release = gen, release

    def __aiter__(self) -> _Relayed:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        return self._gen.__anext__()

    async def aclose(self) -> None:
        try:
            await self._gen.aclose()  # type: ignore[attr-defined]
        finally:
            self._release(False)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n\n"


def usage_dict(u: Usage) -> dict[str, Any]:
    """OpenAI `usage` plus the `ttscale` extension (what the strategy spent)."""
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.generated_tokens,
        "total_tokens": u.prompt_tokens + u.generated_tokens,
        "ttscale": {
            "generated_tokens": u.generated_tokens, "sequential_tokens": u.sequential_tokens,
            "saved_tokens": u.saved_tokens, "unspent_token_cap": u.unspent_token_cap,
            "cached_prompt_tokens": u.cached_prompt_tokens,
            "branches": u.branches, "aborted": u.aborted, "calls": u.calls,
            "wall_time_s": round(u.wall_time_s, 4),
        },
    }


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


# --------------------------------------------------------------------------------------------- strategy runs


def answer_choice(result: Result, kind: str = "math") -> tuple[str, str]:
    """The text a strategy's answer is given as, and its finish reason ("stop" | "length"); see the module
    docstring for the order of preference."""
    with_text: list[Trace] = sorted((t for t in result.traces if t.status is BranchStatus.finished and t.text),
                                    key=lambda t: (t.finish_order is None, t.finish_order or 0))
    stopped = [t for t in with_text if t.finish_reason != "length"]
    own = result.text or None
    if own is not None and not any(t.text == own for t in result.traces):
        return own, "stop"  # composed by the strategy (a distilled or summarised answer)
    if own is not None and any(t.text == own for t in stopped):
        return own, "stop"
    if result.answer is not None:
        for t in [*stopped, *with_text]:  # a cut trace only when no stopped one has the answer
            if same_answer(t.answer, result.answer, kind):
                return t.text, "length" if t.finish_reason == "length" else "stop"
    if own is not None:
        cut = any(t.text == own and t.finish_reason == "length" for t in result.traces)
        return own, "length" if cut else "stop"
    if stopped or with_text:
        t = (stopped or with_text)[0]
        return t.text, "length" if t.finish_reason == "length" else "stop"
    return (f"\\boxed{{{result.answer}}}" if result.answer is not None else ""), "stop"


class StrategyRun:
    """One strategy request: its problem, strategy, backend and the events it produces."""

    def __init__(self, serving: Serving, kind: Literal["chat", "completion"], body: _StrategyBody,
                 strategy: Strategy, options: _ServerOptions, base_model: str, problem: Problem):
        self.serving, self.kind, self.body, self.strategy = serving, kind, body, strategy
        self.options, self.base_model, self.problem = options, base_model, problem
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.t_end: float | None = None

    @property
    def streams_answer(self) -> bool:
        return self.strategy.name == "single" or bool(getattr(self.strategy, "streams_answer", False))

    async def execute(self, listener: Callable[[Event], None] | None = None) -> Result:
        backend = await self.serving.backend_for(self.base_model)
        self.strategy.check(backend)
        ctx = Context(backend, budget=self.options.budget, listeners=[listener] if listener else (),
                      id_prefix=f"{uuid.uuid4().hex[:12]}-b")
        try:
            result = await self.strategy.run(self.problem, ctx)
        finally:
            await ctx.aclose()
        self.t_end = time.monotonic()
        branches = list(ctx.branches.values())
        if branches and not any(b.status is BranchStatus.finished for b in branches):
            failed = [b for b in branches if b.status is BranchStatus.failed]
            if failed:
                exc = failed[0].meta.get("exception")
                if isinstance(exc, BaseException):
                    raise exc
                raise BackendError(failed[0].error or "every branch failed")
        return result

    def answer_parts(self, result: Result) -> tuple[str, str | None, str]:
        """(content, reasoning_content or None, finish reason) of the response: chat splits the chosen text
        on `</think>`, completions keep it whole."""
        text, reason = answer_choice(result, self.problem.kind)
        if self.kind != "chat":
            return text, None, reason
        thinking, content = split_reasoning(text)
        return content, thinking or None, reason

    def extension(self, result: Result) -> dict[str, Any]:
        ext: dict[str, Any] = {
            "strategy": self.strategy.spec, "answer": result.answer,
            "decision": _jsonable({k: v for k, v in result.decision.items()}),
            "fallbacks": result.fallbacks, "usage": usage_dict(result.usage)["ttscale"],
        }
        if self.options.include_traces:
            ext["traces"] = [_jsonable(t.model_dump(exclude={"token_ids", "logprobs", "token_times"}))
                             for t in result.traces]
        return ext

    def response_body(self, result: Result) -> dict[str, Any]:
        text, thinking, reason = self.answer_parts(result)
        if self.kind == "chat":
            message = {"role": "assistant", "content": text}
            if thinking is not None:
                message["reasoning_content"] = thinking
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.body.model,
                "choices": [choice], "usage": usage_dict(result.usage), "ttscale": self.extension(result)}

    def chunk(self, text: str | None = None, *, finish: str | None = None, role: bool = False,
              ext: dict[str, Any] | None = None, usage: dict[str, Any] | None = None,
              no_choice: bool = False, reasoning: str | None = None) -> bytes:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
                delta["content"] = ""
            if reasoning:
                delta["reasoning_content"] = reasoning
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        out: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.body.model,
                               "choices": [] if no_choice else [choice]}
        if usage is not None:
            out["usage"] = usage
        if ext is not None:
            out["ttscale"] = ext
        return _sse(out)

    async def stream(self) -> AsyncIterator[bytes]:
        """SSE chunks: the answer as produced (single-branch strategies), progress, then the result."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        progress = self.options.progress
        answer_branch: list[str] = []
        task = asyncio.create_task(self.execute(queue.put_nowait))
        task.add_done_callback(lambda _t: queue.put_nowait(done))
        sent = ""
        raw = sent_thinking = ""  # the answer branch's text so far, and the thinking sent of it (chat)
        try:
            if self.kind == "chat":
                yield self.chunk(role=True)
            while True:
                ev = await queue.get()
                if ev is done:
                    break
                if ev.kind == "spawned" and not answer_branch:
                    answer_branch.append(ev.branch_id)
                if ev.kind == "delta":
                    if self.streams_answer and ev.branch_id == answer_branch[0]:
                        raw += ev.text
                        if self.kind != "chat":
                            sent += ev.text
                            yield self.chunk(ev.text)
                            continue
                        thinking, content = split_reasoning_partial(raw)
                        more_thinking = thinking.removeprefix(sent_thinking) if thinking.startswith(
                            sent_thinking) else ""
                        more = content.removeprefix(sent) if content.startswith(sent) else ""
                        sent_thinking += more_thinking
                        sent += more
                        if more or more_thinking:
                            yield self.chunk(more or None, reasoning=more_thinking or None)
                    elif progress == "deltas":
                        yield self.chunk(ext={"event": "delta", "branch": ev.branch_id, "text": ev.text,
                                              "n_tokens": ev.n_tokens})
                elif progress and ev.kind in _PROGRESS_KINDS:
                    yield self.chunk(ext={"event": ev.kind, "branch": ev.branch_id, "text": ev.text,
                                          "data": _jsonable(ev.data)})
            try:
                result = task.result()
            except Exception as exc:  # noqa: BLE001 - reported in the stream, OpenAI-shaped
                yield _sse(api_error_from(exc).body())
                yield b"data: [DONE]\n\n"
                return
            text, thinking, reason = self.answer_parts(result)
            rest = text.removeprefix(sent)
            ext = {"event": "done", "t_end": self.t_end, **self.extension(result)}
            if sent and not text.startswith(sent):
                ext["streamed_text_replaced"] = True
            yield self.chunk(rest or None, finish=reason, ext=ext,
                             reasoning=None if sent_thinking or sent else thinking)
            opts = self.body.stream_options
            if opts is not None and opts.include_usage:
                yield self.chunk(usage=usage_dict(result.usage), no_choice=True)
            yield b"data: [DONE]\n\n"
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task


# --------------------------------------------------------------------------------------------- serving


class Serving:
    """What the routes need: upstreams for pass-through, backends for strategies, limits and the key.

    Proxy mode: `Serving(config)` with `config.upstreams`. Backend mode: `Serving(config, backend=...)`
    (our engine, or vLLM's in-process engine in the endpoint plugin): plain model names then run the
    `single` strategy on that backend.
    """

    def __init__(self, config: ServeConfig, backend: Backend | None = None):
        if not config.upstreams and backend is None:
            raise ConfigError("serve needs --upstream URL (proxy) or --backend SPEC (serve a backend directly)")
        self.config = config
        self.backend = backend
        self.upstreams = [u.rstrip("/").removesuffix("/v1") for u in config.upstreams]
        for u in self.upstreams:
            if not u.startswith(("http://", "https://")):
                raise ConfigError(f"upstream {u!r} must start with http:// or https://")
        self._outstanding = [0] * len(self.upstreams)
        self._rr = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._backends: dict[str, Backend] = {}
        # One connection check per model at a time, shared by its waiters; other models never wait on it.
        self._connecting: dict[str, asyncio.Task] = {}
        self._models: set[str] | None = None
        self._models_at = 0.0
        self._models_task: asyncio.Task | None = None
        self._health: tuple[float, int, dict[str, Any]] | None = None  # (when, status, body) of the last probe
        self._health_task: asyncio.Task | None = None
        self.resources = ServerResources(config.targets, config.judges, config.calibrations)  # operator-named

    # ------------------------------------------------------------------ lifecycle
    @property
    def session(self) -> aiohttp.ClientSession:
        """The upstream connection pool (made on first use, inside the server's event loop)."""
        if self._session is None or self._session.closed:
            c = self.config
            headers = {"Accept-Encoding": "identity"}  # bytes are relayed as they come, never re-encoded
            if c.upstream_api_key:
                headers["Authorization"] = f"Bearer {c.upstream_api_key}"
            self._session = aiohttp.ClientSession(
                headers=headers, auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=c.max_connections, limit_per_host=0, ttl_dns_cache=300),
                # Reads are bounded per phase in `passthrough` / `_relay` (first token, idle, total).
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=c.upstream_connect_timeout_s),
            )
        return self._session

    async def _get_json(self, url: str, timeout_s: float | None = None) -> tuple[int, Any]:
        """GET `url` within `timeout_s` (default `upstream_probe_timeout_s`): (status, JSON body or None)."""
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.config.upstream_probe_timeout_s)
        async with self.session.get(url, timeout=timeout) as resp:
            body = await resp.read()
            try:
                return resp.status, json.loads(body)
            except ValueError:
                return resp.status, None

    async def aclose(self) -> None:
        for t in [*self._connecting.values(), self._models_task, self._health_task]:
            if t is not None and not t.done():
                t.cancel()
        self._connecting.clear()
        for b in self._backends.values():
            await b.close()
        self._backends.clear()
        await self.resources.aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ checks
    def check_auth(self, authorization: str | None) -> None:
        """`authorization`: the request's Authorization header (None when absent)."""
        key = self.config.api_key
        if not key:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def read_body(self, content_length: str | None, chunks: AsyncIterator[bytes]) -> bytes:
        """The request body, refused (413) past `max_body_bytes` whether declared or streamed."""
        limit = self.config.max_body_bytes
        if content_length is not None and content_length.isdigit() and int(content_length) > limit:
            raise ApiError(413, f"request body of {content_length} bytes exceeds the limit of {limit} bytes",
                           code="body_too_large")
        raw = bytearray()
        async for part in chunks:
            raw += part
            if len(raw) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
        return bytes(raw)

    @staticmethod
    def parse_body(raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw)
        except RecursionError as e:
            raise ApiError(400, "request body is nested too deeply to parse", code="invalid_json") from e
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from e
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(body) > MAX_JSON_DEPTH:
            raise ApiError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep",
                           code="invalid_json")
        if b"\\u" in raw and _SURROGATE_ESCAPE.search(raw):  # rare: only then walk the body
            where = lone_surrogate_at(body)
            if where is not None:
                raise ApiError(400, f"'{where}' holds a lone UTF-16 surrogate escape (\\ud800-\\udfff "
                               "without its pair), which is not Unicode text", param=where,
                               code="invalid_json")
        return body

    async def completion(self, kind: Literal["chat", "completion"], path: str, authorization: str | None,
                         content_length: str | None, chunks: AsyncIterator[bytes]) -> Response:
        """The response (an ASGI app) to a completion request: pass-through relay, strategy run or error."""
        try:
            self.check_auth(authorization)
            raw = await self.read_body(content_length, chunks)
            body = self.parse_body(raw)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise ApiError(400, "'model' is required (a model name, or STRATEGY/MODEL)", param="model",
                               code="invalid_value")
            self.check_limits(body)
            spec, base = await self.route(model)
            if spec is None and "ttscale" not in body:
                return _Relay(lambda: self.passthrough("POST", path, raw))
            run = self.build_run(kind, body, spec, base)
            return _Relay(lambda: self.strategy_response(run))
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            return api_error_from(exc).response()

    def check_limits(self, body: dict[str, Any]) -> None:
        """Limits that hold for pass-through and strategy requests alike."""
        n = body.get("n")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n > self.config.max_n or n < 1):
            raise ApiError(400, f"'n' must be an integer between 1 and {self.config.max_n} (got {n!r})",
                           param="n", code="invalid_value")
        for field in ("max_tokens", "max_completion_tokens"):
            v = body.get(field)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v > self.config.max_tokens):
                raise ApiError(400, f"'{field}' must be an integer of at most {self.config.max_tokens} (got {v!r})",
                               param=field, code="invalid_value")
        best_of = body.get("best_of")
        if best_of is not None and (not isinstance(best_of, int) or isinstance(best_of, bool) or best_of < 1):
            raise ApiError(400, f"'best_of' must be a positive integer (got {best_of!r})", param="best_of",
                           code="invalid_value")
        over = check_passthrough(body, max_branches=self.config.max_branches,
                                 max_total_tokens=self.config.max_total_tokens)
        if over is not None:
            raise ApiError(400, over.message, param=over.param, code="fan_out_limit")

    # ------------------------------------------------------------------ models
    async def served_models(self, refresh: bool = False) -> set[str] | None:
        """Names the upstreams (or the backend) serve; None when no upstream answers."""
        if self.backend is not None:
            return {self.backend_model_name}
        since = time.monotonic() - self._models_at  # the last lookup, answered or not
        if self._models is not None and not (refresh and since > 5.0):
            return self._models
        if self._models is None and since < 1.0:
            return None  # no upstream answered a moment ago: do not make every request wait for it again
        if self._models_task is None or self._models_task.done():  # one lookup at a time, shared
            self._models_task = asyncio.create_task(self._lookup_models())
        await asyncio.shield(self._models_task)
        return self._models

    async def _lookup_models(self) -> None:
        """Ask every upstream's /v1/models at once (each within `upstream_probe_timeout_s`)."""
        answers = await asyncio.gather(*(self._get_json(f"{u}/v1/models") for u in self.upstreams),
                                       return_exceptions=True)
        names: set[str] = set()
        reached = False
        for a in answers:
            if isinstance(a, tuple) and a[0] == 200 and isinstance(a[1], dict):
                reached = True
                names |= {m.get("id") for m in a[1].get("data") or [] if isinstance(m, dict) and m.get("id")}
        if reached:
            self._models = names
        self._models_at = time.monotonic()

    @property
    def backend_model_name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        return str(getattr(self.backend, "model", None) or getattr(self.backend, "name", "ttscale"))

    async def route(self, model: str) -> tuple[str | None, str]:
        """(strategy spec or None, base model) for a request's model name."""
        served = await self.served_models()
        if served is not None and model not in served and self.backend is None:
            served = await self.served_models(refresh=True)
        if served is not None and model in served and self.backend is None:
            return None, model
        prefix, sep, rest = model.partition("/")
        if sep and prefix and rest:
            try:
                name, _ = parse_spec(prefix)
                get_strategy_class(name)
                return prefix, rest
            except UnknownNameError as e:
                if (served is not None and rest in served) or self.backend is not None:
                    known = ", ".join(sorted(strategies()))
                    raise ApiError(400, f"unknown strategy {e.name!r} in model {model!r}; known strategies: {known}",
                                   param="model", code="unknown_strategy") from e
            except ConfigError as e:
                raise ApiError(400, f"bad strategy prefix in model {model!r}: {e}", param="model",
                               code="invalid_value") from e
        if self.backend is not None:
            if model != self.backend_model_name:
                raise ApiError(404, f"model {model!r} is not served here; it serves {self.backend_model_name!r} "
                               "(prefix it with a strategy: STRATEGY[-N]/MODEL)", param="model",
                               code="model_not_found")
            return "single", model
        return None, model

    async def backend_for(self, model: str) -> Backend:
        """The backend strategy branches run on (one OpenAIBackend per upstream model, connected once)."""
        if self.backend is not None:
            return self.backend
        be = self._backends.get(model)
        if be is not None:
            return be
        task = self._connecting.get(model)
        if task is None:
            task = asyncio.create_task(self._connect_backend(model))
            self._connecting[model] = task
            task.add_done_callback(lambda t: self._connect_done(model, t))
        # A client that leaves stops waiting, not the check its neighbours wait for.
        return await asyncio.shield(task)

    def _connect_done(self, model: str, task: asyncio.Task) -> None:
        if self._connecting.get(model) is task:
            del self._connecting[model]  # a failed check is tried again by the next request
        if not task.cancelled():
            task.exception()  # retrieved here: waiters may all have gone

    async def _connect_backend(self, model: str) -> Backend:
        """A connected OpenAIBackend for `model` (its checks bounded by the upstream timeouts)."""
        from ttscale.backends.openai import OpenAIBackend

        c = self.config
        be = OpenAIBackend(
            self.upstreams, model=model, api_key=c.upstream_api_key, timeout_s=c.upstream_timeout_s,
            connect_timeout_s=c.upstream_connect_timeout_s, first_token_timeout_s=c.upstream_first_token_timeout_s,
            idle_timeout_s=c.upstream_idle_timeout_s, max_retries=c.upstream_retries,
            max_connections=c.max_connections,
        )
        try:
            await be.connect()
        except ConfigError as e:
            await be.close()
            raise ApiError(404, str(e), param="model", code="model_not_found") from e
        except BaseException:
            await be.close()
            raise
        self._backends[model] = be
        return be

    # ------------------------------------------------------------------ strategy requests
    def build_run(self, kind: Literal["chat", "completion"], body: dict[str, Any], spec: str | None,
                  base_model: str) -> StrategyRun:
        """Validate a strategy request into a run; nothing starts here. Refuses (400, naming the request
        field) a config over the fan-out limits and any server resource the operator did not name."""
        try:
            parsed: _StrategyBody = (_ChatBody if kind == "chat" else _CompletionBody).model_validate(body)
        except ValidationError as exc:
            raise _validation_error(exc) from exc
        ext = dict(parsed.ttscale or {})
        options_raw = {k: ext.pop(k) for k in list(ext) if k in _SERVER_KEYS - {"strategy"}}
        try:
            options = _ServerOptions(**options_raw)
        except ValidationError as exc:
            raise _validation_error(exc, "ttscale.") from exc
        ext_spec = ext.pop("strategy", None)
        if ext_spec is not None and (not isinstance(ext_spec, str) or not ext_spec.strip()):
            raise ApiError(400, "'ttscale.strategy' must be a non-empty strategy spec string (e.g. "
                           "'ffs:n=8')", param="ttscale.strategy", code="invalid_value")
        spec_param = "ttscale.strategy" if ext_spec else "model"
        try:
            if ext_spec and spec and spec != "single" and parse_spec(ext_spec)[0] != parse_spec(spec)[0]:
                raise ApiError(400, f"the model prefix asks for strategy {spec!r} and ttscale.strategy for "
                               f"{ext_spec!r}", param="ttscale.strategy", code="invalid_value")
            name, cfg = parse_spec(ext_spec or spec or "single")
            cls = get_strategy_class(name)
        except UnknownNameError as e:
            raise ApiError(400, str(e), param=spec_param, code="unknown_strategy") from e
        except ConfigError as e:
            raise ApiError(400, str(e), param=spec_param, code="invalid_value") from e
        from_body: dict[str, Any] = {}
        params: dict[str, str] = {k: spec_param for k in cfg}  # config field -> request field it came from
        completion_tokens = getattr(parsed, "max_completion_tokens", None)
        max_tokens_field = "max_completion_tokens" if completion_tokens else "max_tokens"
        max_tokens = completion_tokens or parsed.max_tokens
        for key, field, value in (("temperature", "temperature", parsed.temperature),
                                  ("top_p", "top_p", parsed.top_p),
                                  ("max_tokens", max_tokens_field, max_tokens), ("seed", "seed", parsed.seed),
                                  ("top_k", "top_k", None if parsed.top_k in (None, -1) else parsed.top_k)):
            if value is not None:
                from_body[key] = value
                params[key] = field
        params.update({k: f"ttscale.{k}" for k in ext})
        fields = cls.Config.model_fields
        config = {**cfg, **from_body, **ext}
        if "max_tokens" in fields and "max_tokens" not in config:
            config["max_tokens"] = min(fields["max_tokens"].default, self.config.max_tokens)
        try:
            validated = cls.Config(**config)
        except ValidationError as exc:
            loc = exc.errors()[0]["loc"]
            raise _validation_error(exc, source=params.get(str(loc[0])) if loc else
                                    ("ttscale" if ext else spec_param)) from exc
        n = getattr(validated, "n", None)
        if isinstance(n, int) and n > self.config.max_n:
            raise ApiError(400, f"'n' ({n} branches) exceeds this server's limit of {self.config.max_n}",
                           param=params.get("n", spec_param), code="invalid_value")
        mt = getattr(validated, "max_tokens", None)
        if isinstance(mt, int) and mt > self.config.max_tokens:
            raise ApiError(400, f"'max_tokens' ({mt}) exceeds this server's limit of {self.config.max_tokens}",
                           param=params.get("max_tokens", spec_param), code="invalid_value")
        over = check_strategy(cls, validated, config, params, spec_param,
                              max_branches=self.config.max_branches,
                              max_total_tokens=self.config.max_total_tokens)
        if over is not None:
            raise ApiError(400, over.message, param=over.param, code="fan_out_limit")
        options = options.model_copy(update={"budget": self._budget(options.budget)})
        try:
            resources = self.resources.resolve(cls, validated, params)
        except ResourceRefused as e:
            raise ApiError(400, e.message, param=e.param, code="unknown_resource") from e
        strategy = cls(validated, **resources)
        if kind == "chat":
            problem = Problem(id="request", messages=parsed.messages, kind=options.kind,  # type: ignore[attr-defined]
                              choices=["A", "B", "C", "D"] if options.kind == "choice" else None)
        else:
            prompt = parsed.prompt  # type: ignore[attr-defined]
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise ApiError(400, "strategy requests take one prompt (got a list of "
                                   f"{len(prompt)})", param="prompt", code="invalid_value")
                prompt = prompt[0]
            problem = Problem(id="request", prompt=prompt, kind=options.kind,
                              choices=["A", "B", "C", "D"] if options.kind == "choice" else None)
        return StrategyRun(self, kind, parsed, strategy, options, base_model, problem)

    def _budget(self, budget: Budget | None) -> Budget:
        """The request's budget with `total_tokens` at most the server's `max_total_tokens` (its default)."""
        limit = self.config.max_total_tokens
        if budget is None:
            return Budget(total_tokens=limit)
        if budget.total_tokens is not None and budget.total_tokens > limit:
            raise ApiError(400, f"'ttscale.budget.total_tokens' ({budget.total_tokens}) exceeds this "
                           f"server's limit of {limit}", param="ttscale.budget.total_tokens",
                           code="invalid_value")
        return budget.model_copy(update={"total_tokens": budget.total_tokens or limit})

    async def strategy_response(self, run: StrategyRun) -> tuple[int, str, bytes | AsyncIterator[bytes]]:
        if run.body.stream:
            # Fail fast (before the 200 and the first chunk) when the upstream is down.
            await self.backend_for(run.base_model)
            return 200, _SSE, run.stream()
        result = await run.execute()
        return 200, _JSON, json.dumps(run.response_body(result), default=str).encode()

    # ------------------------------------------------------------------ pass-through
    def _pick_upstream(self, avoid: set[int]) -> int:
        cands = [i for i in range(len(self.upstreams)) if i not in avoid]
        start = next(self._rr) % len(cands)
        rotated = cands[start:] + cands[:start]
        return min(rotated, key=lambda i: self._outstanding[i])

    async def passthrough(self, method: str, path: str,
                          raw: bytes | None) -> tuple[int, str, bytes | AsyncIterator[bytes]]:
        """Forward a request unchanged; the upstream's status and bytes come back as they arrive.

        Bounded: the answer's headers and first stream block within `upstream_first_token_timeout_s` of
        sending (a non-streamed answer is all first token), later blocks within `upstream_idle_timeout_s`
        of each other, everything within `upstream_timeout_s`: 504 past one. Checked: a 200 that is not a
        stream must be JSON, a stream must be server-sent events whose data lines are JSON: else 502 with
        the reason (once a stream has begun, as its last chunk).
        """
        c = self.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + c.upstream_timeout_s
        first_deadline = min(deadline, loop.time() + c.upstream_first_token_timeout_s)
        tried: set[int] = set()
        errors = []
        while len(tried) < len(self.upstreams):
            i = self._pick_upstream(tried)
            tried.add(i)
            url = self.upstreams[i] + path
            headers = {"Content-Type": _JSON} if raw is not None else None
            self._outstanding[i] += 1
            try:
                resp = await _before(self.session.request(method, url, data=raw, headers=headers), first_deadline,
                                     deadline, f"{url} sent no answer", "--upstream-first-token-timeout")
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                self._outstanding[i] -= 1
                errors.append(f"{url}: {type(e).__name__}: {e}")
                continue
            except BaseException:
                self._outstanding[i] -= 1
                raise
            media = resp.headers.get("Content-Type", _JSON)
            if media.startswith(_SSE):
                blocks = self._sse_blocks(resp, url, first_deadline, deadline)
                try:  # the first block before the status goes out: a hang is a 504, garbage a 502
                    first = await anext(blocks, b"")
                except BaseException as e:
                    self._outstanding[i] -= 1
                    resp.close()  # closing the connection makes vLLM abort the request
                    if isinstance(e, aiohttp.ClientError):
                        raise ApiError(502, f"upstream stream broke: {type(e).__name__}: {e}",
                                       type="upstream_error", code="upstream_error") from e
                    raise
                released = False

                def release(complete: bool, resp: aiohttp.ClientResponse = resp, i: int = i) -> None:
                    nonlocal released
                    if released:
                        return
                    released = True
                    self._outstanding[i] -= 1
                    if complete:
                        resp.release()  # the connection goes back to the pool
                    else:
                        resp.close()  # unread: closing the connection makes vLLM abort the request

                return resp.status, media, _Relayed(self._relay(first, blocks, release), release)
            try:  # not a stream: read in one piece (relayed with its Content-Length)
                body = await _before(resp.read(), loop.time() + c.upstream_idle_timeout_s, deadline,
                                     f"{url} stopped sending its answer", "--upstream-idle-timeout")
            except (aiohttp.ClientError, TimeoutError) as e:
                resp.close()
                raise ApiError(502, f"upstream answer broke off: {type(e).__name__}: {e}", type="upstream_error",
                               code="upstream_error") from e
            except BaseException:
                resp.close()  # cancelled (the client left): closing the connection aborts the upstream request
                raise
            finally:
                self._outstanding[i] -= 1
            resp.release()
            if resp.status == 200 and (problem := json_problem(body)):
                raise ApiError(502, f"upstream {url} answered 200 with {problem} (content-type {media!r})",
                               type="upstream_error", code="upstream_bad_response")
            return resp.status, media, body
        raise ApiError(502, "no upstream reachable: " + "; ".join(errors), type="upstream_error",
                       code="upstream_unavailable")

    async def _sse_blocks(self, resp: aiohttp.ClientResponse, url: str, first_deadline: float,
                          deadline: float) -> AsyncIterator[bytes]:
        """The upstream stream in blocks of whole, checked lines (`check_sse`), each read bounded: until a
        first line within `first_deadline`, then `upstream_idle_timeout_s` apart, all before `deadline`."""
        loop = asyncio.get_running_loop()
        idle = self.config.upstream_idle_timeout_s
        tail = b""
        started = False
        while True:
            chunk = await _before(resp.content.readany(), loop.time() + idle if started else first_deadline,
                                  deadline, f"{url} sent {'no further' if started else 'no first'} token",
                                  "--upstream-idle-timeout" if started else "--upstream-first-token-timeout")
            good, tail, problem = check_sse(tail + chunk if tail else chunk, final=not chunk)
            if good:
                started = True
                yield good
            if problem:
                raise BackendError(f"{url} sent {problem}")
            if not chunk:
                return

    @staticmethod
    async def _relay(first: bytes, blocks: AsyncIterator[bytes],
                     release: Callable[[bool], None]) -> AsyncIterator[bytes]:
        """`first`, then the rest of `blocks`; a broken, hung or malformed stream ends with an error chunk."""
        complete = False
        try:
            if first:
                yield first
            async for block in blocks:
                yield block
            complete = True
        except (TimeoutError, aiohttp.ClientError, BackendError) as e:
            err = api_error_from(e) if isinstance(e, BackendError) else ApiError(
                502, f"upstream stream broke: {type(e).__name__}: {e}", type="upstream_error", code="upstream_error")
            yield _sse(err.body())
        finally:
            release(complete)
            with contextlib.suppress(Exception):
                await blocks.aclose()  # type: ignore[attr-defined]

    HEALTH_CACHE_S = 1.5

    async def health(self) -> tuple[int, dict[str, Any]]:
        """(200, ok) when an upstream answers `/v1/models` or `/health` within `upstream_probe_timeout_s`,
        else (503, upstream_unavailable); backend mode is always ok. Probes are shared and cached for
        `HEALTH_CACHE_S`, so /health stays cheap however often it is asked."""
        if self.backend is not None:
            return 200, {"status": "ok"}
        now = time.monotonic()
        if self._health is not None and now - self._health[0] < self.HEALTH_CACHE_S:
            return self._health[1], self._health[2]
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.create_task(self._probe_upstreams())
        status, body = await asyncio.shield(self._health_task)
        return status, body

    async def _probe_upstreams(self) -> tuple[int, dict[str, Any]]:
        async def probe(u: str) -> str | None:
            """None when `u` answers; else why not."""
            why = ""
            for path in ("/v1/models", "/health"):
                try:
                    status, _body = await self._get_json(f"{u}{path}")
                except (TimeoutError, aiohttp.ClientError) as e:
                    why = f"{u}{path}: {type(e).__name__}" + (" (no answer in time)" if isinstance(
                        e, TimeoutError) else "")
                    if isinstance(e, TimeoutError):
                        return why  # hung: asking another path would only double the wait
                    continue
                if status == 200:
                    return None
                why = f"{u}{path}: HTTP {status}"
            return why

        problems = await asyncio.gather(*(probe(u) for u in self.upstreams))
        if any(p is None for p in problems):
            result = (200, {"status": "ok"})
        else:
            result = (503, {"status": "upstream_unavailable", "upstreams": [p for p in problems if p]})
        self._health = (time.monotonic(), *result)
        return result

    async def models_response(self) -> dict[str, Any]:
        ext = {"strategies": sorted(strategies()), "model_prefix": "STRATEGY[-N][:key=value,...]/MODEL"}
        if self.backend is not None:
            data = [{"id": self.backend_model_name, "object": "model", "created": 0, "owned_by": "ttscale"}]
            return {"object": "list", "data": data, "ttscale": ext}
        merged: dict[str, dict[str, Any]] = {}
        errors = []
        for u in self.upstreams:
            try:
                status, body = await self._get_json(f"{u}/v1/models")
            except (TimeoutError, aiohttp.ClientError) as e:
                errors.append(f"{u}: {type(e).__name__}")
                continue
            if status != 200 or not isinstance(body, dict):
                errors.append(f"{u}: HTTP {status}")
                continue
            for m in body.get("data") or []:
                merged.setdefault(m.get("id"), m)
        if not merged and errors:
            raise ApiError(502, "no upstream reachable: " + "; ".join(errors), type="upstream_error",
                           code="upstream_unavailable")
        self._models, self._models_at = set(merged), time.monotonic()
        return {"object": "list", "data": list(merged.values()), "ttscale": ext}


# --------------------------------------------------------------------------------------------- routes


def _serving(request: Request) -> Serving:
    serving = getattr(request.app.state, STATE_KEY, None)
    if serving is None:
        raise ApiError(503, "ttscale serving is not initialised", type="server_error", code="not_ready")
    return serving


async def _completion(request: Request, kind: Literal["chat", "completion"], path: str) -> Response:
    try:
        serving = _serving(request)
    except ApiError as e:
        return e.response()
    return await serving.completion(kind, path, request.headers.get("authorization"),
                                    request.headers.get("content-length"), request.stream())


_COMPLETION_PATHS: dict[str, Literal["chat", "completion"]] = {
    "/v1/chat/completions": "chat", "/v1/completions": "completion"}


class _CompletionFastPath:
    """ASGI middleware for `ttscale serve`: completion requests go to `Serving.completion` directly, without
    FastAPI's routing and request objects (a measurable share of a pass-through request's CPU). Everything
    else, and the same routes mounted elsewhere (the vLLM plugin), goes through the router."""

    def __init__(self, app: Any, serving: Serving) -> None:
        self.app, self.serving = app, serving

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = _COMPLETION_PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        auth, length = request_headers(scope, b"authorization", b"content-length")

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise ApiError(400, "client disconnected while sending the body", code="client_disconnected")
                yield msg.get("body", b"")
                if not msg.get("more_body", False):
                    return

        response = await self.serving.completion(kind, scope["path"], auth, length, chunks())
        await response(scope, receive, send)


def build_router() -> APIRouter:
    """The OpenAI-compatible routes; they find their `Serving` in `app.state.ttscale_serving`."""
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _completion(request, "chat", "/v1/chat/completions")

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _completion(request, "completion", "/v1/completions")

    @router.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            serving = _serving(request)
            serving.check_auth(request.headers.get("authorization"))
            return JSONResponse(await serving.models_response())
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            return api_error_from(exc).response()

    @router.get("/health")
    async def health(request: Request) -> Response:
        serving = getattr(request.app.state, STATE_KEY, None)
        if serving is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        status, body = await serving.health()
        return JSONResponse(body, status_code=status)

    return router


CONFIG_ENV = "TTSCALE_SERVE_CONFIG"


def app_from_env() -> FastAPI:
    """The proxy app of one worker process of `ttscale serve --workers N` (config as JSON in the environment)."""
    import os

    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise ConfigError(f"{CONFIG_ENV} is not set (it carries the ServeConfig of `ttscale serve --workers`)")
    return create_app(ServeConfig.model_validate_json(raw))


def create_app(config: ServeConfig | None = None, backend: Backend | None = None, **kwargs: Any) -> FastAPI:
    """The FastAPI app: proxy in front of `config.upstreams`, or `backend` served directly."""
    config = config or ServeConfig(**kwargs)
    serving = Serving(config, backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await serving.aclose()
        if backend is not None:
            await backend.close()

    app = FastAPI(title="ttscale", lifespan=lifespan, docs_url=None, redoc_url=None)
    setattr(app.state, STATE_KEY, serving)
    app.include_router(build_router())
    app.add_middleware(_CompletionFastPath, serving=serving)
    if config.allowed_origins:  # pages of these origins may call the API (CORS preflight answered)
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins,
                           allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"])
    # Outermost: Host and Origin are checked before anything else sees the request.
    app.add_middleware(HostOriginGuard, allowed_hosts=config.allowed_hosts,
                       allowed_origins=config.allowed_origins)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        e = exc.errors()[0]
        param = ".".join(str(x) for x in e["loc"][1:]) or None
        return ApiError(400, f"invalid '{param}': {e['msg']}", param=param, code="invalid_value").response()

    return app

"""HTTP transport of the OpenAI-compatible backends: several endpoints of one model with retries and back-off,
bounded waits, sends and closes that survive task cancellation, and checked server-sent-events parsing."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from ttscale.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    ContextOverflow,
    await_by,
)

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
CONTEXT_WORDS = ("maximum context length", "context length", "max_model_len", "too long", "context window")
SSE_FIELDS = ("event:", "id:", "retry:")


def is_context_error(message: str) -> bool:
    m = message.lower()
    return any(w in m for w in CONTEXT_WORDS)


def error_message(resp: httpx.Response) -> str:
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
    if not line or line.startswith(":") or line.startswith(SSE_FIELDS):
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


async def until_done(fut: asyncio.Future, on_cancel: Callable[[], object] | None = None) -> bool:
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
    if await until_done(closing):
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
    if not await until_done(sending, scope.cancel):
        resp = sending.result()
        assert resp is not None
        return resp
    if not sending.cancelled() and sending.exception() is None and (resp := sending.result()) is not None:
        await close_response(resp)
    raise asyncio.CancelledError


@dataclass
class Endpoint:
    """One base URL of the model, with its requests in flight and its consecutive failures."""

    base_url: str
    outstanding: int = 0
    failures: int = 0


class EndpointPool:
    """Base URLs of one model behind one httpx client: least outstanding requests first, retries with
    back-off (on another endpoint when there is one), every wait bounded (see `OpenAIBackend`)."""

    def __init__(
        self,
        urls: list[str],
        *,
        timeout_s: float | None,
        connect_timeout_s: float,
        first_token_timeout_s: float | None,
        idle_timeout_s: float | None,
        max_retries: int,
        backoff_s: float,
        max_backoff_s: float,
        max_connections: int,
        api_key: str | None,
        headers: dict[str, str] | None,
    ) -> None:
        if not urls:
            raise ConfigError("OpenAIBackend needs at least one base URL")
        for name, value in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s),
                            ("first_token_timeout_s", first_token_timeout_s), ("idle_timeout_s", idle_timeout_s)):
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ConfigError(f"OpenAIBackend {name} must be a number of seconds > 0 (got {value!r})")
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.first_token_timeout_s, self.idle_timeout_s = first_token_timeout_s, idle_timeout_s
        self.endpoints = [Endpoint(self._normalise(u)) for u in urls]
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
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
        self._rr = itertools.count()

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
                msg = error_message(resp)
                if resp.status_code in RETRY_STATUS:
                    last = f"{url} answered {resp.status_code}: {msg}"
                    await resp.aclose()
                else:
                    await resp.aclose()
                    if resp.status_code in (400, 413, 422) and is_context_error(msg):
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
                    f"{ep.base_url}/v1/models refused the request ({resp.status_code}): {error_message(resp)}; "
                    "check the API key"
                )
            errors.append(f"{ep.base_url}/v1/models answered {resp.status_code}: {error_message(resp)}")
        if timed_out == len(self.endpoints):
            raise BackendTimeout("no OpenAI-compatible server answered in time: " + "; ".join(errors))
        raise BackendUnavailable("no OpenAI-compatible server reachable: " + "; ".join(errors))

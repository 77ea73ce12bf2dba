"""Pass-through: requests for plain model names (and `/v1/responses`, `/v1/embeddings`, `/tokenize`,
`/detokenize`, `/version`) forwarded unchanged to an upstream, whose status and bytes are relayed back.

One pooled `aiohttp.ClientSession` serves every upstream call (httpcore's pool scans every connection for
every request: at 64 concurrent clients that scan was two thirds of the proxy's CPU,
`benchmarks/serve_load.py`). Upstream waits are bounded per phase (connect, first token, idle between
chunks, total): past one, 504 with code `upstream_timeout`; an answer that is not JSON / not server-sent
events is a 502 saying why (inside a stream already under way: its last chunk). `Relay` is the ASGI response
both pass-through and strategy runs are sent with: it cancels the work when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import aiohttp
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ttscale.errors import BackendError, await_by
from ttscale.server.config import ServeConfig
from ttscale.server.errors import ApiError, api_error_from
from ttscale.server.protocol import JSON_MEDIA, SSE_DONE, SSE_MEDIA, sse

Opened = tuple[int, str, bytes | AsyncIterator[bytes]]  # (status, media type, body or its chunks)


class Observer(Protocol):
    """What watches one request's exchange (the proxy's metrics): told when it starts, what the upstream
    said it used, and the status it ended with (499: the client went away)."""

    def started(self) -> None: ...

    def tokens(self, prompt: int, completion: int) -> None: ...

    def finished(self, status: int) -> None: ...


class Relay(Response):
    """An ASGI response whose status, headers and body come from `opener` (run when the response starts).

    The body is `bytes` (sent at once, with Content-Length) or an async iterator of chunks (streamed).
    The whole exchange, waiting for the upstream or the strategy included, is watched for the client's
    disconnect; when it goes away the work is cancelled (which aborts branches / closes upstream streams).
    `observer` (optional) is told when the exchange starts and the status it ended with.
    """

    def __init__(self, opener: Callable[[], Awaitable[Opened]], observer: Observer | None = None):
        self.opener = opener
        self.observer = observer
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
        status = 500
        if self.observer is not None:
            self.observer.started()
        try:
            try:
                status, media, chunks = await self.opener()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
                err = api_error_from(exc)
                status, media, chunks = err.status, JSON_MEDIA, json.dumps(err.body()).encode()
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
            status = 499  # the client closed the request
        except OSError:  # the client went away while we were writing
            status = 499
        finally:
            state["complete"] = True
            watcher.cancel()
            if self.observer is not None:
                self.observer.finished(status)
            if chunks is not None and hasattr(chunks, "aclose"):
                with contextlib.suppress(Exception):
                    await chunks.aclose()


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

    def __init__(self, gen: AsyncGenerator[bytes, None], release: Callable[[bool], None]):
        self._gen, self._release = gen, release

    def __aiter__(self) -> _Relayed:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        return self._gen.__anext__()

    async def aclose(self) -> None:
        try:
            await self._gen.aclose()
        finally:
            self._release(False)



def reported_usage(body: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens an upstream's JSON answer reports in its `usage`, None when it has none."""
    try:
        usage = json.loads(body).get("usage")
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError):
        return None


def stream_usage(block: bytes) -> tuple[int, int] | None:
    """The usage of a stream's last block (its final chunk, when the client asked for `include_usage`)."""
    for line in reversed(block.splitlines()):
        if line.startswith(b"data:") and b'"usage":{' in line.replace(b" ", b""):
            return reported_usage(line[5:])
    return None


class Upstreams:
    """The upstream base URLs of one model set, their shared connection pool and the pass-through relay.
    A request goes to the upstream with the fewest outstanding requests (round robin among equals) and to
    the next one when it cannot connect."""

    def __init__(self, config: ServeConfig, urls: list[str]) -> None:
        self.config, self.urls = config, urls
        self._outstanding = [0] * len(urls)
        self._rr = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None

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

    async def get_json(self, url: str, timeout_s: float | None = None) -> tuple[int, Any]:
        """GET `url` within `timeout_s` (default `upstream_probe_timeout_s`): (status, JSON body or None)."""
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.config.upstream_probe_timeout_s)
        async with self.session.get(url, timeout=timeout) as resp:
            body = await resp.read()
            try:
                return resp.status, json.loads(body)
            except ValueError:
                return resp.status, None

    @property
    def fresh_session(self) -> aiohttp.ClientSession:
        """Connections that are never reused: for a request whose pooled connection the upstream had closed."""
        if self._fresh is None or self._fresh.closed:
            c = self.config
            self._fresh = aiohttp.ClientSession(
                headers=self.session.headers, auto_decompress=False,
                connector=aiohttp.TCPConnector(force_close=True, limit=0, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=c.upstream_connect_timeout_s),
            )
        return self._fresh

    async def aclose(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()
        self._session = self._fresh = None

    def _pick(self, avoid: set[int]) -> int:
        cands = [i for i in range(len(self.urls)) if i not in avoid]
        start = next(self._rr) % len(cands)
        rotated = cands[start:] + cands[:start]
        return min(rotated, key=lambda i: self._outstanding[i])

    async def passthrough(self, method: str, path: str, raw: bytes | None,
                          observer: Observer | None = None) -> Opened:
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
        stale: set[int] = set()  # upstreams whose pooled connection was found closed: tried again once
        errors = []
        while len(tried) < len(self.urls):
            i = self._pick(tried)
            tried.add(i)
            url = self.urls[i] + path
            headers = {"Content-Type": JSON_MEDIA} if raw is not None else None
            self._outstanding[i] += 1
            try:
                session = self.fresh_session if i in stale else self.session
                resp = await _before(session.request(method, url, data=raw, headers=headers), first_deadline,
                                     deadline, f"{url} sent no answer", "--upstream-first-token-timeout")
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                self._outstanding[i] -= 1
                errors.append(f"{url}: {type(e).__name__}: {e}")
                continue
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as e:
                # A kept-alive connection the upstream closed as the request went out (its keep-alive
                # timeout): no answer came, so the request is sent again once, on a connection of its own
                # (the pool may hold more connections the upstream closed).
                self._outstanding[i] -= 1
                errors.append(f"{url}: {type(e).__name__}: {e}")
                if i not in stale:
                    stale.add(i)
                    tried.discard(i)
                continue
            except BaseException:
                self._outstanding[i] -= 1
                raise
            media = resp.headers.get("Content-Type", JSON_MEDIA)
            if media.startswith(SSE_MEDIA):
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

                return resp.status, media, _Relayed(self._relay(first, blocks, release, observer), release)
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
            if observer is not None and b'"usage"' in body and (used := reported_usage(body)) is not None:
                observer.tokens(*used)
            return resp.status, media, body
        raise ApiError(502, "no upstream reachable: " + "; ".join(errors), type="upstream_error",
                       code="upstream_unavailable")

    async def _sse_blocks(self, resp: aiohttp.ClientResponse, url: str, first_deadline: float,
                          deadline: float) -> AsyncGenerator[bytes, None]:
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
    async def _relay(first: bytes, blocks: AsyncGenerator[bytes, None], release: Callable[[bool], None],
                     observer: Observer | None = None) -> AsyncGenerator[bytes, None]:
        """`first`, then the rest of `blocks`; a broken, hung or malformed stream ends with an error chunk and
        `[DONE]` (as vLLM ends a stream it reports an error in), so a client's stream loop ends cleanly."""
        complete = False
        relayed = first  # the last block sent on
        try:
            if first:
                yield first
            last = first  # the last block that mentions usage (the final chunk, before `[DONE]`)
            async for block in blocks:
                if observer is not None and b'"usage"' in block:
                    last = block
                relayed = block
                yield block
            complete = True
            if observer is not None and (used := stream_usage(last)) is not None:
                observer.tokens(*used)
        except (TimeoutError, aiohttp.ClientError, BackendError) as e:
            if relayed.rstrip().endswith(SSE_DONE.rstrip()):
                return  # the client has the whole stream; the upstream failed only after its end
            err = api_error_from(e) if isinstance(e, BackendError) else ApiError(
                502, f"upstream stream broke: {type(e).__name__}: {e}", type="upstream_error", code="upstream_error")
            yield sse(err.body())
            yield SSE_DONE
        finally:
            release(complete)
            with contextlib.suppress(Exception):
                await blocks.aclose()


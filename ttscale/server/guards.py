"""Host and Origin checks of `ttscale serve`: what keeps a web page from using a proxy on localhost.

- Host: DNS rebinding points a page's own domain at 127.0.0.1; its requests then carry that domain as
  `Host`. Only the allowed host names are served (default: the loopback names; `--allowed-hosts`,
  `*` = any, `*.example.com` = that domain's subdomains).
- Origin: a page on another site can POST `text/plain` to localhost without a CORS preflight, and the
  proxy would run it. A browser always sends `Origin` on such a request: one that is neither the
  proxy's own origin (same host and port as `Host`) nor in `--allowed-origins` is refused with 403
  before the body is read. Clients that are not browsers send no `Origin` and are not affected.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
LOOPBACK_BINDS = ("127.0.0.1", "localhost", "::1", "[::1]")


def default_allowed_hosts(bind_host: str) -> list[str]:
    """Loopback names when bound to loopback; any host otherwise (the operator chose to expose it)."""
    return list(LOOPBACK_HOSTS) if bind_host in LOOPBACK_BINDS or bind_host.startswith("127.") else ["*"]


def host_name(host_header: str) -> str:
    """`Host` without its port, lower-cased (`[::1]:8080` -> `[::1]`)."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[: h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def host_allowed(host_header: str | None, allowed: list[str]) -> bool:
    if "*" in allowed:
        return True
    if not host_header:
        return False
    name = host_name(host_header)
    for pattern in allowed:
        p = pattern.strip().lower()
        if ":" in p and not p.startswith("["):
            p = f"[{p}]"  # a bare IPv6 address, as it appears in Host
        if p.startswith("*.") and (name.endswith(p[1:]) or name == p[2:]):
            return True
        if name == p:
            return True
    return False


def origin_allowed(origin: str, host_header: str | None, allowed: list[str]) -> bool:
    """The page's origin is ours (same host:port as the request's `Host`) or one the operator allowed."""
    if "*" in allowed or origin.rstrip("/") in [a.rstrip("/") for a in allowed]:
        return True
    parts = urlsplit(origin)
    return (
        bool(host_header)
        and parts.scheme in ("http", "https")
        and parts.netloc.lower() == (host_header or "").strip().lower()
    )


def request_headers(scope: Scope, *names: bytes) -> list[str | None]:
    """The values of the named (lower-case) headers of an ASGI request, None where absent; a repeated
    header's last value wins."""
    found: dict[bytes, str] = {}
    for k, v in scope["headers"]:
        if k in names:
            found[k] = v.decode("latin-1")
    return [found.get(name) for name in names]


class HostOriginGuard:
    """ASGI middleware: refuse a disallowed `Host` (400) or a foreign `Origin` (403), OpenAI-shaped."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str], allowed_origins: list[str]) -> None:
        self.app, self.allowed_hosts, self.allowed_origins = app, allowed_hosts, allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host, origin = request_headers(scope, b"host", b"origin")
        if not host_allowed(host, self.allowed_hosts):
            await _refuse(
                send,
                400,
                "host_not_allowed",
                f"Host {host!r} is not served here (start `ttscale serve` with --allowed-hosts)",
            )
            return
        if origin is not None and not origin_allowed(origin, host, self.allowed_origins):
            await _refuse(
                send,
                403,
                "origin_not_allowed",
                f"requests from the web origin {origin!r} are refused (a page on another site may "
                "not use this server; allow it with --allowed-origins)",
            )
            return
        await self.app(scope, receive, send)


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    body: dict[str, Any] = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": raw})

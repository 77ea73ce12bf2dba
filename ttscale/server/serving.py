"""`Serving`: what the routes need, for one server: the upstreams (pass-through) or the backend it serves,
strategy backends connected once per upstream model, the operator's limits, named resources and API key,
and the proxy's metrics. Routing a request: a model name the upstreams serve is passed through; a
`STRATEGY[-N][:k=v,...]/MODEL` name (or a body with a `ttscale` object) runs that strategy."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
from starlette.responses import Response

from ttscale.backends.base import Backend
from ttscale.errors import ConfigError, UnknownNameError
from ttscale.server.build import build_run
from ttscale.server.config import ServeConfig
from ttscale.server.errors import ApiError, api_error_from
from ttscale.server.limits import check_passthrough
from ttscale.server.metrics import ProxyMetrics
from ttscale.server.protocol import PASS_THROUGH_HINT, check_stream_options, parse_body
from ttscale.server.relay import Relay, Upstreams
from ttscale.server.resources import ServerResources
from ttscale.server.runs import StrategyRun
from ttscale.strategies.registry import get_strategy_class, parse_spec, split_model_name, strategies

BACKEND_MODE_HINT = ("this server runs every request as a strategy, a plain model name as `single`, and has no "
                     "upstream to pass it through to: send it to a server of the model itself")


class Serving:
    """What the routes need: upstreams for pass-through, backends for strategies, limits and the key.

    Proxy mode: `Serving(config)` with `config.upstreams`. Backend mode: `Serving(config, backend=...)`
    (our engine, or vLLM's in-process engine in the endpoint plugin): plain model names then run the
    `single` strategy on that backend, and nothing is passed through. `refusal_hint`: what a request
    carrying a field no strategy can apply (`tools`, `n` > 1, ...) is told to do instead; by default, in proxy
    mode to send it without a strategy, in backend mode that this server cannot serve it (the endpoint plugin
    points to vLLM's own routes).
    """

    def __init__(self, config: ServeConfig, backend: Backend | None = None, *, refusal_hint: str | None = None):
        if not config.upstreams and backend is None:
            raise ConfigError("serve needs --upstream URL (proxy) or --backend SPEC (serve a backend directly)")
        self.config = config
        self.backend = backend
        self.refusal_hint = refusal_hint or (PASS_THROUGH_HINT if backend is None else BACKEND_MODE_HINT)
        urls = [u.rstrip("/").removesuffix("/v1") for u in config.upstreams]
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ConfigError(f"upstream {u!r} must start with http:// or https://")
        self.upstreams = Upstreams(config, urls)
        self.metrics = ProxyMetrics()
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
    async def aclose(self) -> None:
        for t in [*self._connecting.values(), self._models_task, self._health_task]:
            if t is not None and not t.done():
                t.cancel()
        self._connecting.clear()
        for b in self._backends.values():
            await b.close()
        self._backends.clear()
        await self.resources.aclose()
        await self.upstreams.aclose()

    # ------------------------------------------------------------------ checks
    def check_auth(self, authorization: str | None) -> None:
        """`authorization`: the request's Authorization header (None when absent)."""
        key = self.config.api_key
        keys = [k for k in ([key] if isinstance(key, str) else key or []) if k]
        if not keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode()
        matched = False
        for k in keys:  # every key compared, in constant time each
            matched |= hmac.compare_digest(given, k.encode())
        if scheme.lower() != "bearer" or not matched:
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

    async def completion(self, kind: Literal["chat", "completion"], path: str, authorization: str | None,
                         content_length: str | None, chunks: AsyncIterator[bytes]) -> Response:
        """The response (an ASGI app) to a completion request: pass-through relay, strategy run or error."""
        model_label, strategy_label = "", "passthrough"
        try:
            self.check_auth(authorization)
            raw = await self.read_body(content_length, chunks)
            body = parse_body(raw)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise ApiError(400, "'model' is required (a model name, or STRATEGY/MODEL)", param="model",
                               code="invalid_value")
            model_label = model
            check_stream_options(body)
            self.check_limits(body)
            spec, base = await self.route(model)
            model_label = base
            if spec is None and body.get("ttscale") is None:
                observer = self.metrics.request(path, self.model_label(base), strategy_label)
                return Relay(lambda: self.upstreams.passthrough("POST", path, raw, observer), observer)
            strategy_label = strategy_name(spec or body_strategy(body))
            run = self.build_run(kind, body, spec, base)
            strategy_label = run.strategy.name
            run.observer = self.metrics.request(path, self.model_label(base), strategy_label)
            return Relay(run.response, run.observer)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            err = api_error_from(exc)
            if err.code == "unknown_strategy":
                strategy_label = "unknown"
            self.metrics.refused(path, self.model_label(model_label), strategy_label, err.status)
            return err.response()

    async def forward(self, method: str, path: str, authorization: str | None, content_length: str | None,
                      chunks: AsyncIterator[bytes] | None) -> Response:
        """A request passed through to an upstream as it is (`/v1/responses`, `/v1/embeddings`,
        `/tokenize`, `/detokenize`, `/version`): the same checks of the key and the body, the same relay,
        timeouts and error shapes as a pass-through completion. Serving a backend directly: 404."""
        model_label = ""
        try:
            self.check_auth(authorization)
            if not self.upstreams.urls:
                raise ApiError(404, f"{path} is passed through to an upstream; this server serves a backend "
                               "directly (ttscale serve --upstream URL has it)", code="not_found")
            raw = None
            if chunks is not None:
                raw = await self.read_body(content_length, chunks)
                body = parse_body(raw)
                model = body.get("model")
                model_label = model if isinstance(model, str) else ""
                limit = body.get("max_output_tokens")  # the Responses API's max_tokens
                if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                          or limit > self.config.max_tokens):
                    raise ApiError(400, f"'max_output_tokens' must be an integer of at most "
                                   f"{self.config.max_tokens} (got {limit!r})", param="max_output_tokens",
                                   code="invalid_value")
            observer = self.metrics.request(path, self.model_label(model_label), "passthrough")
            return Relay(lambda: self.upstreams.passthrough(method, path, raw, observer), observer)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            err = api_error_from(exc)
            self.metrics.refused(path, self.model_label(model_label), "passthrough", err.status)
            return err.response()

    def model_label(self, model: str) -> str:
        """`model` as a metrics label: a name the upstreams (or the backend) serve, else "other" (labels
        must not grow with whatever names clients send)."""
        if not model:
            return ""
        if self.backend is not None:
            return model if model == self.backend_model_name else "other"
        return model if self._models is not None and model in self._models else "other"

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
        answers = await asyncio.gather(*(self.upstreams.get_json(f"{u}/v1/models") for u in self.upstreams.urls),
                                       return_exceptions=True)
        names: set[str] = set()
        reached = False
        for a in answers:
            if isinstance(a, tuple) and a[0] == 200 and isinstance(a[1], dict):
                reached = True
                names |= {m["id"] for m in a[1].get("data") or []
                          if isinstance(m, dict) and isinstance(m.get("id"), str)}
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
        split = split_model_name(model)  # the first '/' outside the spec's quoted values
        if split is not None:
            prefix, rest = split
            try:
                name, _ = parse_spec(prefix)
                get_strategy_class(name)
            except UnknownNameError as e:
                if (served is not None and rest in served) or self.backend is not None:
                    known = ", ".join(sorted(strategies()))
                    raise ApiError(400, f"unknown strategy {e.name!r} in model {model!r}; known strategies: {known}",
                                   param="model", code="unknown_strategy") from e
            except ConfigError as e:
                raise ApiError(400, f"bad strategy prefix in model {model!r}: {e}", param="model",
                               code="invalid_value") from e
            else:
                if self.backend is not None and rest != self.backend_model_name:
                    # one model is served here: another name after the prefix ran on it, answering as that name
                    raise ApiError(404, f"model {rest!r} is not served here; it serves {self.backend_model_name!r} "
                                   f"({prefix}/{self.backend_model_name})", param="model", code="model_not_found")
                return prefix, rest
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
            self.upstreams.urls, model=model, api_key=c.upstream_api_key, timeout_s=c.upstream_timeout_s,
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
        """Validate a strategy request into a run (server/build.py); nothing starts here."""
        return build_run(self, kind, body, spec, base_model)

    # ------------------------------------------------------------------ health and models
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
                    status, _body = await self.upstreams.get_json(f"{u}{path}")
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

        problems = await asyncio.gather(*(probe(u) for u in self.upstreams.urls))
        result: tuple[int, dict[str, Any]]
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
        for u in self.upstreams.urls:
            try:
                status, body = await self.upstreams.get_json(f"{u}/v1/models")
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


def body_strategy(body: dict[str, Any]) -> str:
    ext = body.get("ttscale")
    spec = ext.get("strategy") if isinstance(ext, dict) else None
    return spec if isinstance(spec, str) else "single"


def strategy_name(spec: str) -> str:
    """The registered name of the strategy a spec asks for (a metrics label), "unknown" when none is."""
    try:
        return get_strategy_class(parse_spec(spec)[0]).name
    except (ConfigError, UnknownNameError):
        return "unknown"

"""OpenAI-compatible serving: a proxy in front of existing servers, or our own backend served directly.
This module holds the routes and the app factory; the parts live beside it (one job each, as vLLM's
entrypoints are split):

    config.py     ServeConfig: the operator's upstreams, limits and named resources
    protocol.py   request bodies a strategy request takes, JSON body checks, response pieces (usage, SSE, logprobs)
    errors.py     OpenAI-shaped errors and the mapping of ttscale errors / validation errors to them
    serving.py    Serving: routing (pass-through or strategy), auth, limits, models, health, backends per model
    build.py      a strategy request validated into a StrategyRun (every 400 names its request field)
    runs.py       StrategyRun: the strategy in a Context, its answer as a completion or a stream
    forwarding.py the client's parameters (stop, penalties, logprobs, chat_template_kwargs) on every branch
    relay.py      pass-through: the pooled upstream connections, bounded waits, checked relayed bytes
    metrics.py    the proxy's Prometheus metrics
    guards.py, limits.py, resources.py   Host/Origin checks, fan-out limits, operator-named resources

Routes (`build_router`): `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`
(probes the upstreams: 503 `upstream_unavailable` when none answers; cached briefly), `GET /metrics`, and
passed through to an upstream as they are: `POST /v1/responses`, `/v1/embeddings`, `/tokenize`,
`/detokenize`, `GET /version`.

Routing a request:

- **strategy request**: the model name carries a strategy prefix, `STRATEGY[-N][:k=v,...]/MODEL`
  (`ffs-8/qwen`, `self-consistency-16/qwen`, `sc:n=4,temperature=0.8/qwen`), or the body has a
  `ttscale` object (`extra_body={"ttscale": {"strategy": "ffs", "n": 8}}` in the openai client). The
  strategy runs in a ttscale Context on an `OpenAIBackend` pointing at the upstream(s) (or on the
  configured backend) and the answer comes back as an ordinary completion. Request parameters that make
  sense per branch are forwarded to every branch; those that cannot apply are a 400 naming them
  (server/protocol.py). On `/v1/completions` the prompt reaches the model as it is, with no chat template
  (server/forwarding.py); strategies that send more than the prompt are a 400 there (server/build.py).
- **pass-through**: any other model name. The body is forwarded unchanged to an upstream and the
  upstream's bytes are streamed back, status code included (server/relay.py).

The `ttscale` request object: `strategy` (spec string), any field of the strategy's config (`n`, `k`, ...),
and server options: `budget` (`{"total_tokens", "sequential_tokens", "wall_time_s"}`), `kind`
(`math` | `choice` | `free`, default `math`: answers are extracted from `\\boxed{}`; `free` votes on
normalised last lines), `progress` (`false` | `true` | `"deltas"`: progress events in streamed chunks),
`include_traces` (bool).

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
  strategy has chosen it (progress events meanwhile, if asked). The answer's text: server/runs.py.

A client that disconnects cancels its request: the strategy's Context is closed (every branch aborted
upstream) or the pass-through upstream stream is closed (vLLM aborts a request whose client went away).
Errors use OpenAI's schema `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ttscale.backends.base import Backend
from ttscale.errors import ConfigError
from ttscale.server.config import CONFIG_ENV, STATE_KEY, ServeConfig
from ttscale.server.errors import ApiError, api_error_from
from ttscale.server.guards import HostOriginGuard, request_headers
from ttscale.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ttscale.server.relay import check_sse, json_problem
from ttscale.server.runs import StrategyRun, answer_choice
from ttscale.server.serving import Serving

__all__ = [
    "CONFIG_ENV", "STATE_KEY", "ApiError", "ServeConfig", "Serving", "StrategyRun", "answer_choice", "app_from_env",
    "build_router", "check_sse", "create_app", "json_problem",
]

PASSTHROUGH_POST = ("/v1/responses", "/v1/embeddings", "/tokenize", "/detokenize")


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


def _forwarder(method: str, path: str) -> Callable[[Request], Awaitable[Response]]:
    """The route of a request passed through to the upstream as it is (`Serving.forward`)."""

    async def forward(request: Request) -> Response:
        try:
            serving = _serving(request)
        except ApiError as e:
            return e.response()
        h = request.headers
        return await serving.forward(method, path, h.get("authorization"), h.get("content-length"),
                                     request.stream() if method == "POST" else None)

    return forward


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

    for path in PASSTHROUGH_POST:
        router.add_api_route(path, _forwarder("POST", path), methods=["POST"], include_in_schema=False)
    router.add_api_route("/version", _forwarder("GET", "/version"), methods=["GET"], include_in_schema=False)

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        try:
            serving = _serving(request)
        except ApiError as e:
            return e.response()
        return Response(serving.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @router.get("/health")
    async def health(request: Request) -> Response:
        serving = getattr(request.app.state, STATE_KEY, None)
        if serving is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        status, body = await serving.health()
        return JSONResponse(body, status_code=status)

    return router


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
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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

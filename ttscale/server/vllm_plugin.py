"""vLLM endpoint plugin: the ttscale router inside a running vLLM OpenAI server.

vLLM 0.32 loads entry points of the group `vllm.endpoint_plugins` in the API-server process
(`vllm/plugins/endpoint_plugins/interface.py`): each resolves to a zero-argument factory returning an
object with `name`, `required_tasks`, `attach_router(app)` and `async init_state(engine_client, state, args)`.
Endpoint plugins are opt-in: vLLM loads one only when it is named in `VLLM_PLUGINS`:

    VLLM_PLUGINS=ttscale python -m vllm.entrypoints.openai.api_server --model /models/qwen ...

The routes are mounted under `/ttscale` (`/ttscale/v1/chat/completions`, `/ttscale/v1/completions`,
`/ttscale/v1/models`, `/ttscale/health`) so vLLM's own `/v1/...` routes stay untouched. Strategy
branches run on vLLM's in-process engine client (`EngineClient.generate` / `abort`, the calls vLLM's own
serving handlers make; no new engine path). The model is the server's served model name; a plain name
runs the `single` strategy: nothing is passed through, so a request no strategy can serve (`tools`,
`response_format`, `n` > 1, ...) is a 400 that points to vLLM's own `/v1` routes. These routes take the
vLLM server's own API keys (`--api-key`, else `VLLM_API_KEY`) and `TTSCALE_API_KEY`: vLLM's auth middleware
guards only its own path prefixes (`/v1`, ...), not `/ttscale`, so the router checks them itself (any of
them is accepted; none set: no auth, as vLLM). The limits come from `TTSCALE_MAX_N`, `TTSCALE_MAX_TOKENS`.
"""

from __future__ import annotations

import os
from argparse import Namespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ttscale.backends.vllm import VLLMBackend

PREFIX = "/ttscale"
REFUSAL_HINT = (f"the {PREFIX} routes run every request as a strategy, a plain model name as `single`, and "
                "cannot pass it through: send it to this vLLM server's own /v1 routes (the same path without "
                f"{PREFIX}), which serve it as vLLM does")


def _attached_backend(engine_client: Any, args: Namespace) -> VLLMBackend:
    """A VLLMBackend driving the server's engine client (never shuts it down)."""
    from ttscale.backends.vllm import VLLMBackend

    class EngineClientBackend(VLLMBackend):
        name = "vllm-plugin"

        def __init__(self) -> None:
            mc = engine_client.model_config
            super().__init__(mc.model, kv_cache_memory_bytes=None, max_logprobs=int(mc.max_logprobs or 0),
                             max_model_len=int(mc.max_model_len))
            self._engine = engine_client
            if getattr(mc, "tokenizer", None):
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer)

        async def start(self) -> EngineClientBackend:
            return self

        async def close(self) -> None:
            self._engine = None  # the engine belongs to the vLLM server

    return EngineClientBackend()


def api_keys(args: Namespace) -> list[str]:
    """The keys the plugin's routes accept: the server's (`--api-key`, one or several, else `VLLM_API_KEY`, as
    vLLM's own middleware takes them) and `TTSCALE_API_KEY`."""
    given = getattr(args, "api_key", None)
    server = [k for k in (given if isinstance(given, list) else [given]) if k] or [os.environ.get("VLLM_API_KEY")]
    return [k for k in [*server, os.environ.get("TTSCALE_API_KEY")] if k]


class TTScaleEndpointPlugin:
    """`vllm.endpoint_plugins` object: attaches the router, then builds `Serving` on the engine client."""

    name = "ttscale"
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        from ttscale.server.app import build_router

        app.include_router(build_router(), prefix=PREFIX)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        from ttscale.server.app import STATE_KEY, ServeConfig, Serving

        if engine_client is None:  # vLLM's CPU-only render server has no engine
            return
        names = getattr(args, "served_model_name", None) or [args.model]
        config = ServeConfig(
            api_key=api_keys(args) or None,
            served_model_name=names[0] if isinstance(names, list) else str(names),
            max_n=int(os.environ.get("TTSCALE_MAX_N", "64")),
            max_tokens=int(os.environ.get("TTSCALE_MAX_TOKENS", "8192")),
        )
        setattr(state, STATE_KEY, Serving(config, backend=_attached_backend(engine_client, args),
                                          refusal_hint=REFUSAL_HINT))


def register() -> TTScaleEndpointPlugin:
    """Entry point of `vllm.endpoint_plugins` (declared in pyproject.toml)."""
    return TTScaleEndpointPlugin()

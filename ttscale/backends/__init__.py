"""Backends and `make_backend(spec)`.

Spec strings: `engine` / `engine:PATH` (our engine; no path = the embedded SmolLM2-135M-Instruct),
`vllm` / `vllm:PATH` (in-process vLLM), `openai:URL[,URL...]` (any OpenAI-compatible server; several
URLs of one model spread the load), `sglang:URL`, `replay:BANK` (a recorded trace bank), `parscale:PATH` (a `qwen2_parscale` checkpoint on
our engine).
Options follow `?`: `openai:http://127.0.0.1:8000/v1?model=m&api_key=k`, `engine:PATH?dtype=float32`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from pydantic import ValidationError

from ttscale.backends.base import Backend, BackendBase, Capabilities
from ttscale.errors import ConfigError, UnknownNameError

KINDS = ["engine", "vllm", "openai", "sglang", "replay", "parscale"]


def _options(rest: str) -> tuple[str, dict[str, Any]]:
    if "?" not in rest:
        return rest, {}
    base, _, q = rest.partition("?")
    opts: dict[str, Any] = {}
    for k, v in parse_qsl(q, keep_blank_values=True):
        if v.lower() in ("true", "false"):
            opts[k] = v.lower() == "true"
        else:
            try:
                opts[k] = int(v)
            except ValueError:
                try:
                    opts[k] = float(v)
                except ValueError:
                    opts[k] = v
    return base, opts


def make_backend(spec: str | Backend, **kwargs: Any) -> Backend:
    """A backend from a spec string (see the module docstring), or the backend itself."""
    if not isinstance(spec, str):
        return spec
    try:
        return _make(spec, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad option for backend {spec!r}: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"bad option for backend {spec!r}: {exc}") from exc


def _make(spec: str, **kwargs: Any) -> Backend:
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("http", "https"):
        kind, rest = "openai", spec
    rest, opts = _options(rest.strip())
    opts.update(kwargs)
    if kind not in KINDS:
        raise UnknownNameError("backend", kind, KINDS)
    if kind == "engine":
        from ttscale.backends.engine.backend import EngineBackend, EngineConfig

        return EngineBackend(EngineConfig(model=rest or "default", **opts))
    if kind == "vllm":
        from ttscale.backends.vllm import VLLMBackend

        if not rest or rest == "default":
            from ttscale.models import default_model_dir

            rest = str(default_model_dir())
        return VLLMBackend(rest, **opts)
    if kind in ("openai", "sglang"):
        if not rest:
            raise ConfigError(f"backend {kind!r} needs a URL: {kind}:http://HOST:PORT")
        urls = [u.strip() for u in rest.split(",") if u.strip()]
        if kind == "openai":
            from ttscale.backends.openai import OpenAIBackend

            return OpenAIBackend(urls, **opts)
        from ttscale.backends.sglang import SGLangBackend

        return SGLangBackend(urls, **opts)
    if kind == "parscale":
        if not rest:
            raise ConfigError("backend 'parscale' needs a qwen2_parscale checkpoint folder: parscale:PATH")
        from ttscale.backends.engine.parscale_model import ParScaleBackend

        return ParScaleBackend.from_spec(rest, **opts)
    if not rest:
        raise ConfigError("backend 'replay' needs a trace bank path: replay:BANK")
    from ttscale.evals.replay import ReplayBackend

    return ReplayBackend.from_spec(rest, **opts)


__all__ = ["KINDS", "Backend", "BackendBase", "Capabilities", "make_backend"]

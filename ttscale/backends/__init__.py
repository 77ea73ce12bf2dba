"""Backends and `make_backend(spec)`.

Spec strings (the grammar of `ttscale.specs`, shared with strategies and judges: `KIND[:ARG,...,key=value,...]`):
`auto` (the default: see `ttscale.backends.default`), `engine` / `engine:PATH` (our engine; no path = the
embedded SmolLM2-135M-Instruct), `vllm` / `vllm:PATH` (in-process vLLM), `openai:URL[,URL...]` (any
OpenAI-compatible server; several URLs of one model spread the load), `sglang:URL`, `replay:BANK` (a recorded
trace bank), `parscale:PATH` (a `qwen2_parscale` checkpoint on our engine).
Options follow the positional values: `openai:http://127.0.0.1:8000/v1,model=m,api_key=k`,
`engine:PATH,dtype=float32`; the older `?` form (`openai:URL?model=m&api_key=k`) is read too. Quote a path
holding a comma: `engine:"/models/a,b"`. `backend_spec` writes the spec `parse_backend_spec` reads back.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError

from ttscale.backends.base import Backend, BackendBase, Capabilities
from ttscale.errors import ConfigError, UnknownNameError
from ttscale.specs import Spec, format_spec, parse_spec_until

KINDS = ["engine", "vllm", "openai", "sglang", "replay", "parscale"]


# Backends that take one path (or none) and the ones that take one or more URLs.
_ONE_PATH = ("engine", "vllm", "parscale", "replay")
_URLS = ("openai", "sglang")


def _query_options(query: str) -> dict[str, Any]:
    """The older `?k=v&k=v` options, typed as before: true/false, int, float, else text."""
    opts: dict[str, Any] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
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
    return opts


def parse_backend_spec(spec: str) -> Spec:
    """A backend spec as (kind, positional values, options); a bare `http(s)://...` URL is `openai:URL`."""
    text = spec.strip() if isinstance(spec, str) else spec
    if isinstance(text, str) and text.lower().startswith(("http://", "https://")):
        text = "openai:" + text
    parsed, rest = parse_spec_until(text, "?", "backend spec")
    kind = parsed.name.lower()
    options = dict(parsed.options)
    if rest:  # the older `?k=v&k=v` options
        for key, value in _query_options(rest[1:]).items():
            if key in options:
                raise ConfigError(f"bad backend spec {spec!r}: option {key!r} is given twice")
            options[key] = value
    return Spec(name=kind, args=parsed.args, options=options)


def _check_options(kind: str, target: Any, opts: dict[str, Any]) -> None:
    """Name an option `target` (a backend class or its pydantic config) does not take, with the closest."""
    if isinstance(target, type) and issubclass(target, BaseModel):
        known = set(target.model_fields)
    else:
        known = set()
        for klass in target.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = list(inspect.signature(init).parameters.values())[1:]
            known |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
    for key in opts:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=2)
            hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"options: {', '.join(sorted(known))}"
            raise ConfigError(f"backend {kind!r} has no option {key!r} ({hint})")


def backend_spec(kind: str, *args: str, **options: Any) -> str:
    """The spec string of a backend: `backend_spec("openai", URL, model="m")` = `openai:URL,model=m`."""
    return format_spec(Spec(name=kind, args=args, options=options), also_quote="?")


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
    parsed = parse_backend_spec(spec)
    kind, opts = parsed.name, {**parsed.options, **kwargs}
    if not all(isinstance(a, str) for a in parsed.args):
        bad = next(a for a in parsed.args if not isinstance(a, str))
        raise ConfigError(f"bad backend spec {spec!r}: {bad!r} is not a path or URL (quote it if it is one)")
    args: list[str] = list(parsed.args)
    if kind == "auto":  # the machine's default (ttscale/backends/default.py)
        if args or opts:
            raise ConfigError(f"backend 'auto' takes no path or options (got {spec!r}): name the backend instead")
        from ttscale.backends.default import default_backend

        kind = default_backend([]).spec
    if kind not in KINDS:
        raise UnknownNameError("backend", kind, [*KINDS, "auto"])
    if kind in _ONE_PATH and len(args) > 1:
        raise ConfigError(f"backend {kind!r} takes one path, got {len(args)} in {spec!r}; quote a path that "
                          f'holds a comma: {kind}:"/models/a,b"')
    rest = args[0] if args else ""
    if kind == "engine":
        from ttscale.backends.engine.backend import EngineBackend, EngineConfig

        _check_options(kind, EngineConfig, opts)
        return EngineBackend(EngineConfig(model=rest or "default", **opts))
    if kind == "vllm":
        from ttscale.backends.vllm import VLLMBackend

        if not rest or rest == "default":
            from ttscale.models import default_model_dir

            rest = str(default_model_dir())
        from ttscale.models import named_model_dir

        rest = str(named_model_dir(rest) or rest)  # a registered name (`ttscale models add NAME`)
        _check_options(kind, VLLMBackend, opts)
        return VLLMBackend(rest, **opts)
    if kind in _URLS:
        urls = [u.strip() for u in args if u.strip()]
        if not urls:
            raise ConfigError(f"backend {kind!r} needs a URL: {kind}:http://HOST:PORT")
        if kind == "openai":
            from ttscale.backends.openai import OpenAIBackend

            _check_options(kind, OpenAIBackend, opts)
            return OpenAIBackend(urls, **opts)
        from ttscale.backends.sglang import SGLangBackend

        _check_options(kind, SGLangBackend, opts)
        return SGLangBackend(urls, **opts)
    if kind == "parscale":
        if not rest:
            raise ConfigError("backend 'parscale' needs a qwen2_parscale checkpoint folder: parscale:PATH")
        from ttscale.backends.engine.parscale_model import ParScaleBackend, ParScaleBackendConfig

        _check_options(kind, ParScaleBackendConfig, {"model": rest, **opts})
        return ParScaleBackend.from_spec(rest, **opts)
    if not rest:
        raise ConfigError("backend 'replay' needs a trace bank path: replay:BANK")
    from ttscale.evals.replay import ReplayBackend

    _check_options(kind, ReplayBackend, opts)
    return ReplayBackend.from_spec(rest, **opts)


__all__ = ["KINDS", "Backend", "BackendBase", "Capabilities", "backend_spec", "make_backend", "parse_backend_spec"]

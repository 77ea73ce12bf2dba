"""Every strategy by name, and spec strings like `ffs:n=8`, `deepprune:tau=0.6`, `self-consistency-16`.

Spec grammar: `NAME[:key=value[,key=value...]]`. Values are parsed as JSON when they can be (numbers,
true/false, lists), else kept as strings. `NAME-N` is short for `NAME:n=N` (the serving model prefix).
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any

from ttscale.errors import ConfigError, UnknownNameError
from ttscale.strategies.base import Strategy

_REGISTRY: dict[str, type[Strategy]] = {}
_ALIASES: dict[str, str] = {}

# Modules that define strategies; imported lazily so a missing optional dependency only hides its own.
_MODULES = [
    "ttscale.strategies.single",
    "ttscale.strategies.self_consistency",
    "ttscale.strategies.best_of_n",
    "ttscale.strategies.ffs",
    "ttscale.strategies.deepprune",
    "ttscale.strategies.pdr",
    "ttscale.strategies.atts",
    "ttscale.strategies.deepconf",
    "ttscale.strategies.hogwild",
    "ttscale.strategies.parathinker",
    "ttscale.strategies.parscale",
]
_loaded = False
_load_errors: dict[str, str] = {}


def register(name: str, *aliases: str):
    """Class decorator: make a strategy addressable by `name` (and aliases)."""

    def deco(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        _REGISTRY[name] = cls
        for a in aliases:
            _ALIASES[a] = name
        return cls

    return deco


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                continue
            _load_errors[mod] = f"{type(exc).__name__}: {exc}"
        except ImportError as exc:
            _load_errors[mod] = f"{type(exc).__name__}: {exc}"


def strategies() -> dict[str, type[Strategy]]:
    """Name → class of every registered strategy."""
    _load()
    return dict(sorted(_REGISTRY.items()))


def get_strategy_class(name: str) -> type[Strategy]:
    _load()
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise UnknownNameError("strategy", name, list(_REGISTRY) + list(_ALIASES))
    return _REGISTRY[key]


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a spec string into (name, config dict); see the module docstring."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("empty strategy spec")
    name, _, rest = spec.partition(":")
    name = name.strip()
    cfg: dict[str, Any] = {}
    if rest.strip():
        for part in _split_top(rest):
            if "=" not in part:
                raise ConfigError(f"bad strategy spec {spec!r}: {part!r} is not key=value")
            k, _, v = part.partition("=")
            cfg[k.strip().replace("-", "_")] = _value(v.strip())
    _load()
    if name not in _REGISTRY and name not in _ALIASES:
        m = re.fullmatch(r"(.+)-(\d+)", name)
        if m and (m.group(1) in _REGISTRY or m.group(1) in _ALIASES):
            name = m.group(1)
            cfg.setdefault("n", int(m.group(2)))
    return name, cfg


def _split_top(s: str) -> list[str]:
    """Split on commas that are not inside brackets (so `schedule=[4,2,1]` stays one value)."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return [p for p in (x.strip() for x in out) if p]


def make_strategy(spec: str | Strategy | dict[str, Any], **overrides: Any) -> Strategy:
    """A Strategy from a spec string, a dict `{"strategy": name, ...config}`, or an instance."""
    if isinstance(spec, Strategy):
        return spec
    if isinstance(spec, dict):
        cfg = dict(spec)
        name = cfg.pop("strategy", None) or cfg.pop("name", None)
        if not name:
            raise ConfigError("a strategy dict needs a 'strategy' key naming it")
        name, spec_cfg = parse_spec(str(name))
        cfg = {**spec_cfg, **cfg}
    else:
        name, cfg = parse_spec(spec)
    cls = get_strategy_class(name)
    return cls({**cfg, **overrides})

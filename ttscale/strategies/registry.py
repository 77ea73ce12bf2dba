"""Every strategy by name, and spec strings like `ffs:n=8`, `deepprune:tau=0.6`, `self-consistency-16`.

Spec grammar (`ttscale.specs`, shared with backends and judges): `NAME[:key=value[,key=value...]]`; bare
values are JSON when they read as JSON (numbers, true/false, null, lists), else text; `"..."` quotes any
text. `NAME-N` sets the strategy's width (`StrategyConfig.width_field`): `ffs-8` = `ffs:n=8`, `hogwild-4` =
`hogwild:workers=4`, `atts-4` = `atts:samples=4`; the proxy reads `NAME-N/MODEL` the same way.
`make_strategy(s.spec)` recreates `s` for every registered strategy (tests/strategies/test_spec_roundtrip.py).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any, TypeVar

from ttscale.errors import ConfigError, UnknownNameError
from ttscale.specs import format_value
from ttscale.specs import parse_spec as parse_grammar
from ttscale.specs import split_model_name as _split_model_name
from ttscale.strategies.base import Strategy

_REGISTRY: dict[str, type[Strategy]] = {}
S = TypeVar("S", bound=type[Strategy])
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


def register(name: str, *aliases: str) -> Callable[[S], S]:
    """Class decorator: make a strategy addressable by `name` (and aliases)."""

    def deco(cls: S) -> S:
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


def resolve_name(name: str) -> tuple[str, dict[str, Any]]:
    """(registered name or alias, width values) for a strategy name, reading `NAME-N` as NAME with width N."""
    _load()
    name = name.strip()
    if name in _REGISTRY or name in _ALIASES:
        return name, {}
    m = re.fullmatch(r"(.+)-(\d+)", name)
    if m is None or (m.group(1) not in _REGISTRY and m.group(1) not in _ALIASES):
        raise UnknownNameError("strategy", name, list(_REGISTRY) + list(_ALIASES))
    base, width = m.group(1), int(m.group(2))
    cls = get_strategy_class(base)
    values = cls.Config.width_values(width)
    if values is None:
        with_width = sorted(n for n, c in _REGISTRY.items() if c.Config.width_values(1) is not None)
        raise ConfigError(f"strategy {cls.name!r} has no width, so {name!r} means nothing; NAME-N works for "
                          f"{', '.join(with_width)}")
    return base, values


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a strategy spec into (name as given, config dict); see `ttscale.specs` for the grammar.
    `NAME-N` gives the config the strategy's width N (`ffs-8` = `ffs:n=8`, `hogwild-4` = `hogwild:workers=4`).
    An unknown name raises UnknownNameError before the rest is read."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("empty strategy spec")
    name, width = resolve_name(spec.partition(":")[0])
    parsed = parse_grammar(spec, what="strategy spec")
    if parsed.args:
        raise ConfigError(f"bad strategy spec {spec!r}: {format_value(parsed.args[0], positional=True)!r} is not "
                          "key=value")
    both = sorted(set(width) & set(parsed.options))
    if both:
        raise ConfigError(f"bad strategy spec {spec!r}: {spec.partition(':')[0].strip()!r} sets {both[0]!r} and "
                          "so does the spec; give it once")
    return name, {**width, **parsed.options}


def split_model_name(model: str) -> tuple[str, str] | None:
    """(strategy spec, base model) of a proxy model name `SPEC/MODEL` such as `ffs-8/Qwen/Qwen3-8B` or
    `ffs:system_prompt="Be brief/terse."/m` (split at the first `/` outside quotes and brackets); None when
    there is no `/`."""
    return _split_model_name(model)


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


def canonical_spec(spec: str) -> str | None:
    """A strategy spec as runs store it (`ffs:n=4` -> `ffs` when 4 is the default), None when `spec` names no
    strategy (a run id, say)."""
    from ttscale.errors import TTScaleError

    try:
        return make_strategy(spec).spec
    except TTScaleError:
        return None

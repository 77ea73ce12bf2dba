"""Issue 15, acceptance 3, made deterministic: for every registered strategy and every one of its config
fields with a plain type, a config that differs from the default in that field keeps the difference through
`make_strategy(s.spec)` (test_spec_roundtrip.py draws random configs; this one cannot draw the default)."""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

import pytest

from ttscale.errors import ConfigError
from ttscale.strategies.registry import make_strategy, strategies

NAMES = sorted(strategies())


def other_values(annotation: Any, default: Any) -> list[Any]:
    """Candidate values unlike `default` for a field of this type (none for types not listed)."""
    if get_origin(annotation) is Literal:
        return [v for v in get_args(annotation) if v != default]
    if annotation is bool:
        return [not default]
    if annotation is int:
        return [default + 1, default - 1] if isinstance(default, int) else [1, 2]
    if annotation is float:
        return [default / 2, default + 0.5] if isinstance(default, float) else [0.5]
    if annotation is str or annotation == (str | None):
        return ["Think step by step, then answer: x=1/2."]
    return []


@pytest.mark.parametrize("name", NAMES)
def test_a_non_default_config_survives_its_spec(name):
    cls = strategies()[name]
    default = make_strategy(name).config
    checked = []
    for field, info in cls.Config.model_fields.items():
        for value in other_values(info.annotation, info.default):
            try:
                s = make_strategy({"strategy": name, field: value})
            except ConfigError:
                continue
            if s.config == default:
                continue
            back = make_strategy(s.spec)
            assert type(back) is cls and back.config == s.config, (s.spec, field, value)
            assert back.config != default
            checked.append(field)
            break
    assert checked, f"{name}: no field could be set to a non-default value"

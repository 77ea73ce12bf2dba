"""`make_strategy(s.spec)` recreates `s` for every registered strategy, with its default config and with configs
generated from the pydantic fields; `NAME-N` sets the width of every strategy that has one."""

from __future__ import annotations

import types
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import annotated_types as at
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ttscale.errors import ConfigError
from ttscale.strategies.base import StrategyConfig
from ttscale.strategies.registry import make_strategy, parse_spec, split_model_name, strategies
from ttscale.types import Problem

NAMES = sorted(strategies())
WIDTHS = {name: cls.Config.width_values(1) for name, cls in strategies().items()}


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in metadata:
        if isinstance(m, at.Ge):
            out["min_value"] = m.ge
        elif isinstance(m, at.Gt):
            out["min_value"], out["exclude_min"] = m.gt, True
        elif isinstance(m, at.Le):
            out["max_value"] = m.le
        elif isinstance(m, at.Lt):
            out["max_value"], out["exclude_max"] = m.lt, True
    return out


def values_of(tp: Any, metadata: list[Any]) -> st.SearchStrategy[Any]:
    """Values of a config field's type within its bounds; fails on a type this test does not know yet."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return st.one_of(*(values_of(a, metadata) for a in get_args(tp)))
    if tp is type(None):
        return st.none()
    if origin is Literal:
        return st.sampled_from(get_args(tp))
    if tp is bool:
        return st.booleans()
    if tp is int:
        b = _bounds(metadata)
        lo = b.get("min_value", -1000) + (1 if b.get("exclude_min") else 0)
        hi = b.get("max_value", lo + 5000) - (1 if b.get("exclude_max") else 0)
        return st.integers(lo, hi)
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False, **{"min_value": -1e6, "max_value": 1e6,
                                                                   **_bounds(metadata)})
    if tp is str:
        return st.text(max_size=30)
    if origin is list:
        (item,) = get_args(tp)
        return st.lists(values_of(item, []), max_size=4)
    raise AssertionError(f"no value generator for config type {tp!r}; teach values_of about it")


def same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a.config == b.config


@pytest.mark.parametrize("name", NAMES)
def test_default_config_round_trips(name):
    s = make_strategy(name)
    assert s.spec == name and same(make_strategy(s.spec), s)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_generated_configs_round_trip(name, data):
    cls = strategies()[name]
    fields = cls.Config.model_fields
    chosen = data.draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=4, unique=True))
    cfg = {f: data.draw(values_of(fields[f].annotation, fields[f].metadata), label=f) for f in chosen}
    try:
        s = make_strategy({"strategy": name, **cfg})
    except ConfigError:
        assume(False)
    back = make_strategy(s.spec)
    assert same(back, s), (s.spec, back.config, s.config)
    assert split_model_name(f"{s.spec}/org/model-7b") == (s.spec, "org/model-7b")


@pytest.mark.parametrize("spec,expected", [
    ("ffs:n=8,system_prompt=Think, then answer.", {"n": 8, "system_prompt": "Think, then answer."}),
    ('ffs:system_prompt="Say \\"hi\\", then: x=1 / y ✓"', {"system_prompt": 'Say "hi", then: x=1 / y ✓'}),
    ("ffs:system_prompt='It\\'s 2, ok'", {"system_prompt": "It's 2, ok"}),
    ("ffs:system_prompt=null", {"system_prompt": None}),
    ('ffs:system_prompt="8"', {"system_prompt": "8"}),
    ("ffs:max-tokens=64, n = 2", {"max_tokens": 64, "n": 2}),
    ('ffs:stop=["a,b", "</think>"]', {"stop": ["a,b", "</think>"]}),
    ("pdr:schedule=[4, 2, 1]", {"schedule": [4, 2, 1]}),
])
def test_quoted_and_old_forms_parse(spec, expected):
    assert parse_spec(spec)[1] == expected
    s = make_strategy(spec)
    assert same(make_strategy(s.spec), s)


def test_a_value_with_a_comma_is_quoted_by_spec():
    s = make_strategy("ffs:n=8,system_prompt=Think, then answer.")
    assert s.spec == 'ffs:n=8,system_prompt="Think, then answer."'


def test_specs_stored_by_earlier_runs_read_the_same():
    # Eval runs are keyed by their spec text; plain numbers, words and int lists keep their old spelling.
    assert make_strategy("self-consistency:max_tokens=48,n=4").spec == "self-consistency:max_tokens=48,n=4"
    assert make_strategy("pdr:kappa=50,schedule=[3, 2, 1]").spec == "pdr:kappa=50,schedule=[3, 2, 1]"
    assert make_strategy("ffs:mode=sync,temperature=0.7").spec == "ffs:mode=sync,temperature=0.7"


@pytest.mark.parametrize("name", [n for n in NAMES if WIDTHS[n] is not None])
def test_name_dash_n_sets_the_width_of_every_strategy_with_one(name):
    cls = strategies()[name]
    width = 32 if name == "deepconf" else 3  # deepconf: n counts its 16 warm-up traces
    s = make_strategy(f"{name}-{width}")
    assert type(s) is cls and s.config == cls.Config(**cls.Config.width_values(width))
    assert split_model_name(f"{name}-{width}/Qwen/Qwen3-8B") == (f"{name}-{width}", "Qwen/Qwen3-8B")


@pytest.mark.parametrize("name", NAMES)
def test_the_width_field_is_a_config_field_or_none(name):
    config = strategies()[name].Config
    assert config.width_field is None or config.width_field in config.model_fields


def test_a_width_field_that_is_no_field_fails_at_class_definition():
    with pytest.raises(TypeError, match="'workers', which is not one of its fields"):
        class BadConfig(StrategyConfig):
            width_field: ClassVar[str | None] = "workers"


@pytest.mark.parametrize("shorthand,field,value", [
    ("ffs-8", "n", 8), ("self-consistency-16", "n", 16), ("short-m-8", "k", 8), ("hogwild-4", "workers", 4),
    ("atts-4", "samples", 4), ("parathinker-4", "paths", 4), ("pdr-4", "schedule", [4, 2, 1]),
    ("pdr-16", "schedule", [16, 8, 1]), ("sc-5", "n", 5),
])
def test_width_fields_follow_the_papers(shorthand, field, value):
    assert getattr(make_strategy(shorthand).config, field) == value


def test_width_errors_name_the_problem():
    with pytest.raises(ConfigError, match="'sr' has no width.*ffs"):
        make_strategy("sr-3")
    with pytest.raises(ConfigError, match="'single' has no width"):
        make_strategy("single-2")
    with pytest.raises(ConfigError, match="'ffs-8' sets 'n'"):
        make_strategy("ffs-8:n=4")
    with pytest.raises(ConfigError, match="workers"):
        make_strategy("hogwild-99")  # more workers than the collaboration prompt has names


def test_unknown_names_and_fields_suggest_the_closest():
    with pytest.raises(ConfigError, match="did you mean .*'ffs'"):
        make_strategy("fss:n=2")
    with pytest.raises(ConfigError, match="did you mean 'samples'"):
        make_strategy("atts:sample=4")
    with pytest.raises(ConfigError, match="'n' is not key=value"):
        make_strategy("sc:n")
    with pytest.raises(ConfigError, match="given twice"):
        make_strategy("sc:n=2,n=3")
    with pytest.raises(ConfigError, match="not closed"):
        make_strategy('ffs:system_prompt="open')


@pytest.mark.parametrize("blank", ["", "   ", "\n"])
def test_a_blank_system_prompt_is_no_system_prompt_one_config(blank):
    """`--system-prompt ""` and `--no-system-prompt` send the same (nothing): one config, hence one run key
    in the results store, not two runs of the same thing."""
    none = make_strategy("self-consistency:n=4", system_prompt=None)
    for s in (make_strategy("self-consistency:n=4", system_prompt=blank),
              make_strategy("self-consistency:n=4").with_system_prompt(blank)):
        assert s.config.system_prompt is None
        assert s.config.model_dump() == none.config.model_dump()
        assert s.messages(Problem(id="p", prompt="hi")) == [{"role": "user", "content": "hi"}]

"""Proxy model names `NAME-N/MODEL` and `SPEC/MODEL` with quoted values, through `ttscale serve` (the proxy
under uvicorn) in front of the OpenAI-compatible stand-in (tests/backends/standins.py), with the openai client."""

from __future__ import annotations

import openai
import pytest

from tests.backends.standins import MODEL
from tests.fixtures.server import standin_proxy
from ttscale.strategies.registry import make_strategy, strategies

MSG = [{"role": "user", "content": "What is 2 + 3?"}]


upstream, proxy, oai = standin_proxy(max_tokens=16, client_timeout=60)


def served_strategy(oai: openai.OpenAI, model: str):
    r = oai.chat.completions.create(model=model, messages=MSG, max_tokens=4)
    return make_strategy(r.model_extra["ttscale"]["strategy"])


@pytest.mark.parametrize("model,field,value", [
    (f"ffs-2/{MODEL}", "n", 2),
    (f"short-m-3/{MODEL}", "k", 3),
    (f"pdr-2/{MODEL}", "schedule", [2, 1, 1]),
    (f"sc-3/{MODEL}", "n", 3),
    (f"parathinker-2/{MODEL}", "paths", 2),  # its text fallback runs on any chat server
])
def test_name_dash_n_model_names_set_the_width(oai, model, field, value):
    assert getattr(served_strategy(oai, model).config, field) == value


def test_a_quoted_value_with_a_slash_and_comma_reaches_every_branch(oai, upstream):
    prompt = "Be brief/terse, please."
    since = len(upstream.app.state.bodies)
    s = served_strategy(oai, f'ffs:n=2,system_prompt="{prompt}"/{MODEL}')
    assert (s.config.n, s.config.system_prompt) == (2, prompt)
    bodies = [b for b in upstream.app.state.bodies[since:] if b.get("stream")]
    assert len(bodies) == 2 and all(b["messages"][0] == {"role": "system", "content": prompt} for b in bodies)


@pytest.mark.parametrize("model", [f"hogwild-2/{MODEL}", f"atts-2/{MODEL}"])
def test_width_names_of_engine_and_two_model_strategies_are_understood(oai, model):
    """The stand-in cannot run these (no shared KV, no target model); the error must be about that, not
    about the name."""
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=model, messages=MSG, max_tokens=4)
    err = info.value.body
    assert err["code"] not in ("unknown_strategy", "invalid_value", "model_not_found"), err


def test_a_width_with_no_meaning_is_a_clear_400(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=f"sr-3/{MODEL}", messages=MSG, max_tokens=4)
    assert "'sr' has no width" in info.value.body["message"] and info.value.body["param"] == "model"


WIDTH_STRATEGIES = sorted(name for name, cls in strategies().items() if cls.Config.width_field is not None)


@pytest.mark.parametrize("name", WIDTH_STRATEGIES)
def test_every_strategy_with_a_width_is_served_by_its_name_dash_n(oai, name):
    """`NAME-N/MODEL` for every registered strategy that has a width: the proxy runs it with that width, or
    (where the stand-in cannot run it: no shared KV, no target or verifier model) refuses for that reason,
    never for the name."""
    cls = strategies()[name]
    width = 32 if name == "deepconf" else 3  # deepconf: n counts its 16 warm-up traces; ffs-k, short-m: k, m = 3
    try:
        served = served_strategy(oai, f"{name}-{width}/{MODEL}")
    except openai.BadRequestError as e:
        assert e.body["code"] not in ("unknown_strategy", "invalid_value", "model_not_found"), e.body
        return
    field = cls.Config.width_field
    assert type(served) is cls
    assert getattr(served.config, field) == cls.Config.width_values(width)[field]

"""The one spec grammar (`ttscale.specs`) that strategies, backends and judges share: it round-trips any
value, reads the older forms, and names what is wrong."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.backends import KINDS, backend_spec, make_backend, parse_backend_spec
from ttscale.errors import ConfigError, UnknownNameError
from ttscale.judges.pairwise import LexicalJudge, judge_spec, make_judge, parse_judge_spec
from ttscale.specs import Spec, format_spec, parse_spec, split_model_name

names = st.from_regex(r"[a-z][a-z0-9@.+-]{0,10}", fullmatch=True)
keys = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
values = st.one_of(scalars, st.lists(st.one_of(st.integers(), st.text(max_size=8)), max_size=3),
                   st.dictionaries(keys, st.integers(), max_size=2))
specs = st.builds(Spec, name=names, args=st.lists(values, max_size=3).map(tuple),
                  options=st.dictionaries(keys, values, max_size=4))


@settings(max_examples=300, deadline=None)
@given(spec=specs, also_quote=st.sampled_from(["", "/", "?"]))
def test_any_spec_round_trips(spec, also_quote):
    assert parse_spec(format_spec(spec, also_quote=also_quote)) == spec


@settings(max_examples=200, deadline=None)
@given(spec=specs, model=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,20}", fullmatch=True))
def test_a_spec_quoted_for_model_names_leads_one(spec, model):
    text = format_spec(spec, also_quote="/")
    assert split_model_name(f"{text}/{model}") == (text, model)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(KINDS), args=st.lists(st.text(min_size=1, max_size=30), max_size=3),
       options=st.dictionaries(keys, scalars, max_size=4))
def test_backend_specs_round_trip(kind, args, options):
    assert parse_backend_spec(backend_spec(kind, *args, **options)) == Spec(name=kind, args=tuple(args),
                                                                            options=options)


@settings(max_examples=100, deadline=None)
@given(path=st.text(min_size=1, max_size=40), max_n=st.integers(1, 9))
def test_judge_specs_round_trip(path, max_n):
    assert parse_judge_spec(judge_spec("classifier", path)).args == (path,)
    assert parse_judge_spec(judge_spec("lexical", max_n=max_n)).options == {"max_n": max_n}


@pytest.mark.parametrize("text,expected", [
    ("openai:http://127.0.0.1:8000/v1?model=m&api_key=k",
     Spec(name="openai", args=("http://127.0.0.1:8000/v1",), options={"model": "m", "api_key": "k"})),
    ("openai:http://127.0.0.1:8000/v1,model=m,api_key=k",
     Spec(name="openai", args=("http://127.0.0.1:8000/v1",), options={"model": "m", "api_key": "k"})),
    ("openai:http://a:1/v1,http://b:2/v1?timeout_s=2.5&detect=false",
     Spec(name="openai", args=("http://a:1/v1", "http://b:2/v1"), options={"timeout_s": 2.5, "detect": False})),
    ("http://127.0.0.1:9/v1", Spec(name="openai", args=("http://127.0.0.1:9/v1",))),
    ("engine:/models/q?dtype=float32", Spec(name="engine", args=("/models/q",), options={"dtype": "float32"})),
    ('engine:"/models/a,b",dtype=float32', Spec(name="engine", args=("/models/a,b",), options={"dtype": "float32"})),
    ("vllm:Qwen/Qwen3-0.6B", Spec(name="vllm", args=("Qwen/Qwen3-0.6B",))),
    ("engine", Spec(name="engine")),
])
def test_backend_specs_old_and_new_forms(text, expected):
    assert parse_backend_spec(text) == expected


def test_backend_specs_build_backends_and_name_bad_input():
    b = make_backend('openai:http://127.0.0.1:9/v1,model=m,timeout_s=3,headers={"X-Team": "a,b"}')
    assert (b.model, b.timeout_s, b._client.headers["X-Team"]) == ("m", 3, "a,b")
    assert make_backend("openai:http://127.0.0.1:9/v1?model=old").model == "old"
    with pytest.raises(UnknownNameError, match="did you mean 'openai'"):
        make_backend("opnai:http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="takes one path"):
        make_backend("engine:/a,/b")
    with pytest.raises(ConfigError, match="'model' is given twice"):
        make_backend("openai:http://h/v1,model=a?model=b")
    with pytest.raises(ConfigError, match="'openai' has no option 'bogus'"):
        make_backend("openai:http://h/v1,bogus=1")
    with pytest.raises(ConfigError, match="no option 'api_kye' .did you mean 'api_key'"):
        make_backend("sglang:http://h/v1?api_kye=k")  # sglang takes openai's options too
    with pytest.raises(ConfigError, match="did you mean 'clock'"):
        make_backend("replay:/no/such/bank,clok=real")  # named before the bank is opened


def test_judge_specs_build_judges_and_name_bad_input(tmp_path):
    judge = make_judge("lexical:max_n=2")
    assert isinstance(judge, LexicalJudge) and judge.max_n == 2
    with pytest.raises(UnknownNameError, match="did you mean 'lexical'"):
        make_judge("lexcal")
    with pytest.raises(ConfigError, match="has no option 'max'.*did you mean 'max_n'"):
        make_judge("lexical:max=2")
    with pytest.raises(ConfigError, match="needs one model file"):
        make_judge("classifier")
    with pytest.raises(ConfigError, match="takes no argument"):
        make_judge("lexical:/tmp/x.json")
    with pytest.raises(ConfigError, match="top_logprobs must be a whole number"):
        make_judge("llm:top_logprobs=many")


@pytest.mark.parametrize("text,message", [
    ('ffs:system_prompt="open', "not closed"),
    ('ffs:system_prompt="a" b', "follows a quoted value"),
    ("pdr:schedule=[4,2", "is not closed"),
    ("ffs:n=1,n=2", "given twice"),
    (":n=1", "no name"),
    ("", "empty"),
])
def test_grammar_errors_name_the_problem(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(text)


def test_bracketed_text_that_is_not_json_stays_text():
    assert parse_spec("hogwild:collab_prompt={names}, work together,n=2").options == {
        "collab_prompt": "{names}, work together", "n": 2}
    with pytest.raises(ConfigError, match="schedule"):
        from ttscale.strategies.registry import make_strategy

        make_strategy("pdr:schedule=[4 2]")


def test_split_model_name_keeps_the_first_slash_for_plain_names():
    assert split_model_name("ffs-8/Qwen/Qwen3-8B") == ("ffs-8", "Qwen/Qwen3-8B")
    assert split_model_name('ffs:system_prompt="a/b"/m') == ('ffs:system_prompt="a/b"', "m")
    assert split_model_name('ffs:stop=["</think>"]/m') == ('ffs:stop=["</think>"]', "m")
    assert split_model_name("deepprune:judge=classifier:/x/j.json/m") == ("deepprune:judge=classifier:", "x/j.json/m")
    assert split_model_name("plain-model") is None and split_model_name("ffs-8/") is None


def test_deepprune_checks_its_judge_spec_before_it_starts():
    from ttscale.backends.scripted import ScriptedBackend
    from ttscale.strategies.registry import make_strategy

    with pytest.raises(UnknownNameError, match="did you mean 'lexical'"):
        make_strategy("deepprune:n=2,judge=lexcal").check(ScriptedBackend([]))
    make_strategy("deepprune:n=2,judge=lexical:max_n=2").check(ScriptedBackend([]))

"""Fan-out limits (issue 17, item 5): one limit on the upstream calls a request may start and one on its
tokens, over all strategies and all their fields, checked before anything starts.

- property tests (hypothesis): for every registered strategy, a config at its computed bound is accepted
  by the server and one past it refused, naming a field the request gave;
- the bound is honest: on the scripted backend a strategy never starts more calls than `max_branches`;
- over real HTTP: the issue's cases (short-m k=1000, PDR's 3,004, SR's 200 rounds, ATTS's 4096 samples, a
  pass-through prompt list) are 400s and the counting stand-in upstream sees no request.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.backends.standins import MODEL
from tests.fixtures.server import ProxyServer, running_proxy
from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.controller import Context
from ttscale.errors import ConfigError
from ttscale.server.app import ApiError, ServeConfig, Serving
from ttscale.server.limits import check_passthrough, prompt_count
from ttscale.strategies.registry import strategies
from ttscale.types import Problem, ScoreRequest

MSGS = [{"role": "user", "content": "What is 3 + 4?"}]
DEAD = "http://127.0.0.1:9"

# Every config field that changes how many calls or tokens a strategy may start, with values to try.
FAN_OUT_FIELDS: dict[str, st.SearchStrategy] = {
    "n": st.integers(1, 48),
    "k": st.integers(1, 48),
    "m": st.integers(1, 8),
    "samples": st.integers(1, 6),
    "turns": st.integers(1, 6),
    "paths": st.integers(1, 8),
    "workers": st.integers(1, 8),
    "warmup": st.integers(1, 16),
    "rounds": st.integers(1, 12),
    "schedule": st.lists(st.integers(1, 12), min_size=1, max_size=5).map(lambda s: [*s[:-1], 1]),
    "max_tokens": st.integers(1, 4096),
    "step_tokens": st.integers(1, 600),
    "target_tokens": st.integers(1, 600),
    "summary_max_tokens": st.integers(1, 1024),
    "kappa": st.integers(1, 4096),
    "final_tokens": st.integers(1, 32),
    "p": st.integers(1, 8),
    "max_clusters": st.integers(1, 8),
    "judge": st.sampled_from(["lexical", "llm"]),
    "distill": st.sampled_from(["summary", "topk", "randomk"]),
    "verifier": st.sampled_from(["loglik", "self_certainty"]),
}


def fan_out_config(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """Some of the strategy's fan-out fields, each with a value (validity is checked by the caller)."""
    fields = {f: s for f, s in FAN_OUT_FIELDS.items() if f in strategies()[name].Config.model_fields}
    return st.fixed_dictionaries({}, optional=fields)


def valid_config(name: str, ext: dict[str, Any]):
    try:
        return strategies()[name].Config(**ext)
    except ValidationError:
        return None


@pytest.fixture(scope="module")
def serving() -> Serving:
    """A server with one named ATTS target (never contacted: nothing here starts a run)."""
    return Serving(ServeConfig(upstreams=[DEAD], max_n=4096, targets={"t": f"openai:{DEAD}"}))


def build(serving: Serving, name: str, ext: dict[str, Any], **limits: int):
    serving.config = serving.config.model_copy(update=limits)
    extra = {"target": "t"} if "target" in strategies()[name].resource_fields else {}
    body = {"model": f"{name}/{MODEL}", "messages": MSGS, "ttscale": {**ext, **extra}}
    return serving.build_run("chat", body, name, MODEL)


@pytest.mark.parametrize("name", sorted(strategies()))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_config_at_its_bound_is_accepted_and_one_past_it_refused(serving, name, data):
    ext = data.draw(fan_out_config(name))
    config = valid_config(name, ext)
    assume(config is not None)
    cls = strategies()[name]
    branches, tokens = cls.max_branches(config), cls.max_tokens_bound(config)
    assert branches >= 1
    roomy = max(tokens or 1, 1)
    run = build(serving, name, ext, max_branches=branches, max_total_tokens=roomy)
    assert run.strategy.config.model_dump(exclude={"target"}) == config.model_dump(exclude={"target"})
    assert run.options.budget.total_tokens == roomy  # the server's limit is the run's budget
    given_params = {f"ttscale.{f}" for f in ext} | {"model"}
    if branches > 1:
        with pytest.raises(ApiError) as over:
            build(serving, name, ext, max_branches=branches - 1, max_total_tokens=roomy)
        assert over.value.status == 400 and over.value.code == "fan_out_limit"
        assert over.value.param in given_params and str(branches) in over.value.message
    if tokens is not None and tokens > 1:
        with pytest.raises(ApiError) as over:
            build(serving, name, ext, max_branches=branches, max_total_tokens=tokens - 1)
        assert over.value.code == "fan_out_limit" and over.value.param in given_params


def test_the_field_to_blame_is_the_one_that_raised_the_bound(serving):
    with pytest.raises(ApiError) as e:
        build(serving, "short-m", {"k": 1000, "m": 2}, max_branches=64, max_total_tokens=2**40)
    assert e.value.param == "ttscale.k"
    with pytest.raises(ApiError) as e:
        build(serving, "atts", {"samples": 2, "turns": 200}, max_branches=64, max_total_tokens=2**40)
    assert e.value.param == "ttscale.turns"
    with pytest.raises(ApiError) as e:  # the strategy's own defaults are over: the strategy is named
        build(serving, "atts", {}, max_branches=64, max_total_tokens=2**40)
    assert e.value.param == "model"


def test_a_client_budget_may_not_exceed_the_servers_token_limit(serving):
    run = build(
        serving,
        "self-consistency",
        {"n": 2, "budget": {"total_tokens": 100}},
        max_branches=64,
        max_total_tokens=10_000,
    )
    assert run.options.budget.total_tokens == 100
    with pytest.raises(ApiError) as e:
        build(
            serving,
            "self-consistency",
            {"n": 2, "budget": {"total_tokens": 10_001}},
            max_branches=64,
            max_total_tokens=10_000,
        )
    assert e.value.param == "ttscale.budget.total_tokens"


# ------------------------------------------------------------------------------ the bound is honest

P = Problem(id="p", prompt="What is 3 + 4?")
RUNNABLE = [
    "single",
    "self-consistency",
    "weighted-vote",
    "best-of-n",
    "ffs",
    "sync-ffs",
    "ffs-k",
    "short-m",
    "last-finish",
    "deepprune",
    "pdr",
    "sr",
    "deepconf",
    "parathinker",
    "atts",
]
NEEDS_ENGINE = {"hogwild", "parscale"}  # run only on our engine's native paths: bound-checked above only


def test_every_strategy_is_either_run_here_or_known_to_need_the_engine():
    """A new strategy must join RUNNABLE (so its bound is checked against a real run) or NEEDS_ENGINE."""
    assert set(strategies()) == set(RUNNABLE) | NEEDS_ENGINE


def script(req, i: int) -> Script:
    """Varied lengths and answers; some steps without an answer so ATTS chains and PDR rounds go on."""
    words = " ".join(["thus", "we", "check"] * (1 + i % 4))
    if i % 3 == 0:
        return Script(text=f"{words} \\boxed{{{i % 2}}}", logprob=-0.1 * (1 + i % 5), top_logprobs=3)
    return Script(
        text=f"{words} and so on", finish_reason="length", logprob=-0.2 * (1 + i % 3), top_logprobs=3
    )


class Counted:
    """A scripted backend whose generations and score calls are all counted."""

    def __init__(self) -> None:
        self.scores = 0
        self.backend = ScriptedBackend(script, score_fn=self.score)

    def score(self, req: ScoreRequest) -> list[float]:
        self.scores += 1
        return [-0.3 - 0.1 * (self.scores % 4)] * max(1, len(req.continuation.split()))

    @property
    def calls(self) -> int:
        return len(self.backend.requests) + self.scores


@pytest.mark.parametrize("name", [n for n in RUNNABLE if n in strategies()])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
async def test_a_run_never_starts_more_calls_than_its_bound(name, data):
    ext = data.draw(fan_out_config(name))
    ext = {
        k: (min(v, 12) if isinstance(v, int) and k not in ("max_tokens", "kappa") else v)
        for k, v in ext.items()
    }
    ext["max_tokens"] = min(ext.get("max_tokens", 64), 64)
    if name == "deepconf":
        ext.setdefault("warmup", 2)
        ext.setdefault("n", max(4, ext["warmup"]))
    if name == "deepprune":
        ext.setdefault("n", 6)
    config = valid_config(name, ext)
    assume(config is not None)
    cls = strategies()[name]
    draft, target = Counted(), Counted()
    kwargs = {"target_backend": target.backend} if name == "atts" else {}
    strategy = cls(config, **kwargs)
    async with Context(draft.backend, seed=0) as ctx:
        try:
            await strategy.run(P, ctx)
        except ConfigError:  # a config the strategy refuses at start (ffs-k with k > n) starts nothing
            assert draft.calls + target.calls == 0
            return
    spent = draft.calls + target.calls
    assert 1 <= spent <= cls.max_branches(config), (spent, config)
    bound = cls.max_tokens_bound(config)
    generated = sum(b.num_tokens for b in ctx.branches.values())
    assert bound is None or generated <= bound


# ------------------------------------------------------------------------------ over HTTP


@pytest.fixture(scope="module")
def proxy(upstream) -> Iterator[ProxyServer]:
    """`ttscale serve --max-n 64 --max-branches 64 --max-total-tokens 200000 --target big=...`."""
    config = ServeConfig(
        upstreams=[upstream.url],
        max_n=64,
        max_branches=64,
        max_total_tokens=200_000,
        targets={"big": f"openai:{upstream.url}"},
    )
    with running_proxy(config) as p:
        yield p


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("chat", {"model": f"short-m/{MODEL}", "ttscale": {"k": 1000}}, "ttscale.k"),
        (
            "chat",
            {"model": f"pdr/{MODEL}", "ttscale": {"schedule": [1000, 1000, 1000, 1]}},
            "ttscale.schedule",
        ),
        ("chat", {"model": f"sr/{MODEL}", "ttscale": {"rounds": 200}}, "ttscale.rounds"),
        (
            "chat",
            {"model": f"atts/{MODEL}", "ttscale": {"samples": 4096, "target": "big"}},
            "ttscale.samples",
        ),
        (
            "chat",
            {"model": f"atts/{MODEL}", "ttscale": {"samples": 1, "turns": 100, "target": "big"}},
            "ttscale.turns",
        ),
        ("chat", {"model": f"deepprune/{MODEL}", "ttscale": {"n": 16, "judge": "llm"}}, "ttscale.judge"),
        ("chat", {"model": f"sc-30/{MODEL}", "max_tokens": 8192}, "max_tokens"),
        ("completion", {"model": MODEL, "prompt": ["x"] * 1000}, "prompt"),
        ("completion", {"model": MODEL, "prompt": ["x"] * 8, "n": 9}, "prompt"),
        ("completion", {"model": MODEL, "prompt": "x", "n": 2, "best_of": 65}, "best_of"),
        ("chat", {"model": MODEL, "n": 64, "max_tokens": 8000}, "max_tokens"),
    ],
)
def test_the_issues_fan_outs_are_refused_before_anything_starts(client, upstream, path, body, param):
    posted = sum(upstream.posts.values())
    url = "/v1/chat/completions" if path == "chat" else "/v1/completions"
    payload = {"messages": MSGS, **body} if path == "chat" else body
    r = client.post(url, json=payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "fan_out_limit" and err["param"] == param, err
    assert sum(upstream.posts.values()) == posted


def test_an_accepted_request_starts_what_its_bound_says(client, upstream):
    before = upstream.posts["/v1/chat/completions"]
    r = client.post(
        "/v1/chat/completions", json={"model": f"sc-8/{MODEL}", "messages": MSGS, "max_tokens": 16}
    )
    assert r.status_code == 200, r.text
    assert r.json()["ttscale"]["answer"] == "7"
    assert upstream.posts["/v1/chat/completions"] - before == 8
    passed = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 32, "max_tokens": 8}
    )
    assert passed.status_code == 200 and len(passed.json()["choices"]) == 64


def test_passthrough_counts_prompts_times_width():
    assert prompt_count("x") == 1 and prompt_count([1, 2, 3]) == 1 and prompt_count([[1], [2]]) == 2
    assert prompt_count(["a", "b", "c"]) == 3
    assert check_passthrough({"prompt": ["a"] * 4, "n": 4}, max_branches=16, max_total_tokens=10) is None
    over = check_passthrough(
        {"prompt": ["a"] * 4, "n": 4, "max_tokens": 2}, max_branches=16, max_total_tokens=31
    )
    assert over is not None and over.param == "max_tokens" and str(math.prod([4, 4, 2])) in over.message


def test_a_default_width_over_the_servers_limit_says_how_to_set_it():
    serving = Serving(ServeConfig(upstreams=[DEAD]))  # max_n 64; deepprune's n defaults to 512
    body = {"model": f"deepprune/{MODEL}", "messages": MSGS}
    with pytest.raises(ApiError) as e:
        serving.build_run("chat", body, "deepprune", MODEL)
    assert e.value.param == "ttscale.n" and "deepprune's default" in e.value.message
    assert "ttscale.n" in e.value.message and "deepprune-64/" in e.value.message

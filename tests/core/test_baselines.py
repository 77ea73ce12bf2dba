"""Baseline strategies' decision logic on the scripted backend, and the registry / spec strings."""

import pytest

from ttscale import Pipeline, Problem
from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.errors import CapabilityError, ConfigError, UnknownNameError
from ttscale.strategies.registry import make_strategy, parse_spec
from ttscale.types import BranchStatus


def boxed(ans, n_words=5, delay=0.001, **kw):
    return Script(text=" ".join(["step"] * n_words) + f" \\boxed{{{ans}}}", delay_s=delay, **kw)


async def test_self_consistency_picks_majority_of_equivalent_forms():
    be = ScriptedBackend([boxed(r"\frac{1}{2}"), boxed("3", 2), boxed("0.5", 8), boxed("1/2", 9), boxed("3", 3)])
    r = await Pipeline(be, "self-consistency:n=5").solve(Problem(id="p", prompt="q", answer="0.5"))
    assert r.correct is True
    assert r.answer in (r"\frac{1}{2}", "0.5", "1/2")
    sizes = sorted(len(c["members"]) for c in r.decision["classes"])
    assert sizes == [2, 3]
    assert r.usage.branches == 5 and r.usage.generated_tokens == sum(t.num_tokens for t in r.traces)


async def test_self_consistency_tie_goes_to_earliest_finisher():
    # "7" finishes first (fewest tokens at the same pace); one vote each for 7 and 9.
    be = ScriptedBackend([boxed("9", 20), boxed("7", 2)])
    r = await Pipeline(be, "sc:n=2").solve(Problem(prompt="q"))
    assert r.answer == "7"


async def test_unfinished_and_failed_branches_do_not_vote():
    be = ScriptedBackend([boxed("1"), Script(error="boom"), boxed("2"), boxed("2", finish_reason="length")])
    r = await Pipeline(be, "sc:n=4").solve(Problem(prompt="q"))
    statuses = {t.status for t in r.traces}
    assert BranchStatus.failed in statuses
    voters = r.decision["voters"]
    assert len(voters) == 3  # length-capped traces still vote (they finished); failed ones do not
    assert r.answer == "2"


async def test_weighted_vote_weighs_confident_traces():
    be = ScriptedBackend([boxed("1", logprob=-0.01), boxed("2", logprob=-3.0), boxed("2", logprob=-3.0)])
    r = await Pipeline(be, "weighted-vote:n=3,weight=mean_logprob").solve(Problem(prompt="q"))
    assert r.answer == "1"
    r2 = await Pipeline(ScriptedBackend([boxed("1", logprob=-0.01), boxed("2", logprob=-3.0),
                                         boxed("2", logprob=-3.0)]), "sc:n=3").solve(Problem(prompt="q"))
    assert r2.answer == "2"


async def test_best_of_n_with_loglik_verifier_takes_highest_score():
    def score_fn(req):
        return [-0.1] if "\\boxed{42}" in req.continuation else [-2.0]

    be = ScriptedBackend([boxed("41"), boxed("42"), boxed("43")], score_fn=score_fn)
    r = await Pipeline(be, "best-of-n:n=3,verifier=loglik").solve(Problem(prompt="q"))
    assert r.answer == "42" and r.usage.score_calls == 3
    assert r.decision["chosen"] == next(t.id for t in r.traces if t.answer == "42")


async def test_best_of_n_loglik_without_score_capability_fails_before_start():
    be = ScriptedBackend([boxed("1")])
    with pytest.raises(CapabilityError, match="score"):
        await Pipeline(be, "best-of-n:verifier=loglik").solve(Problem(prompt="q"))
    assert be.requests == []


async def test_single_sample():
    r = await Pipeline(ScriptedBackend([boxed("5")]), "single").solve(Problem(prompt="q", answer="5"))
    assert r.answer == "5" and r.correct and len(r.traces) == 1


def test_spec_strings():
    assert parse_spec("self-consistency-16") == ("self-consistency", {"n": 16})
    assert parse_spec("sc:n=4,temperature=0.7") == ("sc", {"n": 4, "temperature": 0.7})
    s = make_strategy("sc:n=4")
    assert s.config.n == 4 and s.spec == "self-consistency:n=4"
    s2 = make_strategy({"strategy": "sc", "n": 3})
    assert s2.config.n == 3


def test_bad_strategy_input_errors_name_the_problem():
    with pytest.raises(UnknownNameError, match="unknown strategy 'nope'.*self-consistency"):
        make_strategy("nope")
    with pytest.raises(ConfigError, match=r"n: Input should be greater than or equal to 1"):
        make_strategy("sc:n=0")
    with pytest.raises(ConfigError, match="bogus"):
        make_strategy("sc:bogus=1")
    with pytest.raises(ConfigError, match="not key=value"):
        make_strategy("sc:n")
    with pytest.raises(ConfigError, match="temperature"):
        make_strategy("sc:temperature=hot")


def test_bad_backend_spec():
    from ttscale.backends import make_backend

    with pytest.raises(UnknownNameError, match="unknown backend 'tpu'"):
        make_backend("tpu:x")
    with pytest.raises(ConfigError, match="needs a URL"):
        make_backend("openai")

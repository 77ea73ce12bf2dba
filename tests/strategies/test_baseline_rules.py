"""Each baseline's defining rule on scripted traces where it gives another answer, abort set or usage than
self-consistency (majority vote over all n) would."""

from __future__ import annotations

from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.controller import Context
from ttscale.strategies.parscale import UNKNOWN_STREAMS
from ttscale.strategies.registry import make_strategy
from ttscale.strategies.self_consistency import TOP_K_SELF_CERTAINTY
from ttscale.types import Problem

P = Problem(id="p", prompt="q")


def boxed(answer: str, words: int = 5, **kw) -> Script:
    return Script(text=" ".join(["step"] * words + [f"\\boxed{{{answer}}}"]), delay_s=0.001, **kw)


async def run(spec: str, scripts, backend: ScriptedBackend | None = None):
    be = backend or ScriptedBackend(scripts)
    async with Context(be, seed=0) as ctx:
        return await make_strategy(spec).run(P, ctx)


def certain_minority() -> list[Script]:
    # one certain trace answers 1; two uncertain ones (flat top-k logprobs) answer 2
    return [boxed("1", logprob=-0.01), boxed("2", logprob=-3.0), boxed("2", logprob=-3.0)]


async def test_single_sample_answers_from_one_trace_where_the_vote_differs():
    scripts = [boxed("1", 2), boxed("2"), boxed("2")]
    single = await run("single", scripts)
    sc = await run("sc:n=3", scripts)
    assert (single.answer, single.usage.branches) == ("1", 1)
    assert (sc.answer, sc.usage.branches) == ("2", 3)


async def test_traces_cut_at_max_tokens_do_not_vote_with_a_stray_number():
    """Two traces cut mid-reasoning right after a 7 (finish reason length) and one that boxed 5: the cut ones
    have no answer (their last number is where the cut fell), so 5 wins instead of 7."""
    scripts = [Script(text="the sum so far is 7 and then we add"), boxed("5", 1),
               Script(text="the sum so far is 7 and then we add")]
    sc = await run("sc:n=3,max_tokens=6", scripts)
    cut = [t for t in sc.traces if t.finish_reason == "length"]
    assert len(cut) == 2 and all(t.text.endswith("7") and t.answer is None for t in cut)
    assert sc.answer == "5"


async def test_best_of_n_keeps_the_trace_the_verifier_prefers_over_the_majority():
    def verifier(req):  # the verifier model likes the trace that answers 1
        return [-0.1] if "\\boxed{1}" in req.continuation else [-2.0]

    judged = ScriptedBackend(certain_minority(), score_fn=verifier)
    bon = await run("best-of-n:n=3,verifier=loglik", None, judged)
    sc = await run("sc:n=3", certain_minority())
    assert (bon.answer, bon.usage.score_calls, bon.fallbacks) == ("1", 3, [])
    assert (sc.answer, sc.usage.score_calls) == ("2", 0)
    top_k = await run("best-of-n:n=3,verifier=self_certainty,top_logprobs=2", certain_minority())
    assert top_k.fallbacks == [TOP_K_SELF_CERTAINTY]


async def test_weighted_vote_by_deepconf_confidence_outweighs_the_majority():
    # DeepConf confidence is -mean(top-k logprobs): here 0.5 - lp, so 3.5 for the trace answering 1
    # against 0.51 for each of the two answering 2
    scripts = [boxed("1", logprob=-3.0), boxed("2", logprob=-0.01), boxed("2", logprob=-0.01)]
    wv = await run("weighted-vote:n=3,weight=deepconf,top_logprobs=2,window=4", scripts)
    sc = await run("sc:n=3", scripts)
    assert (wv.answer, sc.answer) == ("1", "2") and wv.fallbacks == []
    sc_weights = await run("weighted-vote:n=3,weight=self_certainty,top_logprobs=2", certain_minority())
    assert sc_weights.fallbacks == [TOP_K_SELF_CERTAINTY]


async def test_parscale_without_a_stream_count_counts_once_and_says_so():
    be = ScriptedBackend([boxed("4")])
    be.capabilities = be.capabilities.model_copy(update={"parallel_streams": True})
    res = await run("parscale", None, backend=be)
    assert res.answer == "4" and res.decision["streams"] is None
    assert res.usage.generated_tokens == res.decision["aggregate_tokens"] == 6
    assert res.fallbacks == [UNKNOWN_STREAMS]

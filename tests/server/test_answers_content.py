"""The proxy's answer text and reasoning models (issue 16): content is a finished trace with the chosen answer,
free text is voted on normalised final lines, and thinking (`<think>…</think>` inline or vLLM's
`reasoning_content` deltas) is kept apart from the answer, which alone is extracted and graded.

Upstream: the OpenAI-compatible stand-in (tests/backends/standins.py) with its written-text modes; the proxy
runs for real on 127.0.0.1 and is called with the official openai client.
"""

from __future__ import annotations

import pytest

from tests.backends.standins import (
    ANSWER_SECTION,
    HAIKUS,
    RAMBLES,
    THINK_RIGHT,
    THINK_WRONG,
    THINKING,
    openai_app,
    serve,
)
from tests.fixtures.server import standin_proxy
from ttscale.answers import extract_answer, extract_boxed, is_correct, normalize_free, split_reasoning, vote
from ttscale.backends.openai import OpenAIBackend
from ttscale.controller import Context
from ttscale.server.app import answer_choice
from ttscale.strategies.self_consistency import SelfConsistency
from ttscale.types import BranchStatus, Problem, Result, Trace

SPLASH = "silence then the splash"  # the normalised last line three of the four haikus share


upstream, proxy, oai = standin_proxy()


# ------------------------------------------------------------------ pure parts


def _trace(i: int, text: str, answer: str | None, finish: str) -> Trace:
    return Trace(id=f"b{i}", text=text, num_tokens=len(text.split()), status=BranchStatus.finished,
                 finish_reason=finish, finish_order=i, answer=answer)


def test_answer_choice_takes_a_stopped_trace_with_the_voted_answer_over_the_strategys_truncated_one():
    traces = [_trace(0, "cut \\boxed{7} and so", "7", "length"), _trace(1, "no \\boxed{9}", "9", "stop"),
              _trace(2, "so \\boxed{7}.", "7", "stop")]
    result = Result(problem_id="p", answer="7", text=traces[0].text, traces=traces, strategy="self-consistency")
    assert answer_choice(result, "math") == ("so \\boxed{7}.", "stop")
    only_cut = result.model_copy(update={"traces": traces[:2]})
    assert answer_choice(only_cut, "math") == (traces[0].text, "length")  # no stopped trace says 7
    voted_only = only_cut.model_copy(update={"text": None})
    assert answer_choice(voted_only, "math") == (traces[0].text, "length")  # the answer's text, not 9's
    no_answer = Result(problem_id="p", answer=None, traces=traces, strategy="self-consistency")
    assert answer_choice(no_answer, "math") == (traces[1].text, "stop")


def test_free_text_votes_on_normalised_last_lines_and_thinking_is_split_off():
    answers = [extract_answer(h, "free") for h in HAIKUS]
    assert [normalize_free(a) for a in answers[1:]] == [SPLASH] * 3
    assert normalize_free(vote(answers, kind="free").answer) == SPLASH
    text = f"<think>{THINKING}</think>\n\n{ANSWER_SECTION}"
    assert split_reasoning(text) == (THINKING, ANSWER_SECTION)
    assert extract_boxed(text) == THINK_WRONG  # what reading the whole trace would grade
    assert extract_answer(text) == THINK_RIGHT
    assert extract_answer(f"<think>{THINKING}") is None  # thinking that never closed has no answer yet


# ------------------------------------------------------------------ OpenAIBackend + a strategy


@pytest.mark.parametrize("mode", ["think", "reasoning"])
async def test_openai_backend_keeps_thinking_apart_and_grading_reads_the_answer_part(mode):
    async with serve(openai_app()) as url:
        backend = OpenAIBackend(url, model=f"standin+{mode}", detect=False, max_retries=0)
        problem = Problem(id="sum", prompt="3 + 4?", answer=THINK_RIGHT)
        ctx = Context(backend)
        try:
            result = await SelfConsistency(n=2, max_tokens=64).run(problem, ctx)
        finally:
            await ctx.aclose()
            await backend.close()
    assert [split_reasoning(t.text) for t in result.traces] == [(THINKING, ANSWER_SECTION)] * 2
    assert [extract_boxed(t.text) for t in result.traces] == [THINK_WRONG] * 2
    assert result.answer == THINK_RIGHT
    assert is_correct(result.answer, problem.answer) is True


# ------------------------------------------------------------------ through the proxy, official client


@pytest.mark.parametrize("kind", ["free", "math"])
def test_a_haiku_by_self_consistency_returns_a_finished_haiku(oai, kind):
    resp = oai.chat.completions.create(
        model="self-consistency-4/standin+haiku", messages=[{"role": "user", "content": "A haiku, please."}],
        max_tokens=16, seed=0, extra_body={"ttscale": {"kind": kind}})
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content in HAIKUS[1:]  # never empty, never the haiku cut at max_tokens
    answer = resp.model_extra["ttscale"]["answer"]
    if kind == "free":
        assert normalize_free(answer) == SPLASH
        assert normalize_free(extract_answer(choice.message.content, "free")) == SPLASH
    else:
        assert answer is None  # no maths in a haiku: content is still a finished trace


def test_self_consistency_content_is_a_finished_trace_not_the_truncated_first_voter(oai):
    resp = oai.chat.completions.create(
        model="self-consistency-4/standin+ramble", messages=[{"role": "user", "content": "3 + 4?"}],
        max_tokens=16, seed=0, extra_body={"ttscale": {"include_traces": True}})
    traces = resp.model_extra["ttscale"]["traces"]
    assert sorted(t["finish_reason"] for t in traces) == ["length", "stop", "stop", "stop"]
    assert resp.model_extra["ttscale"]["answer"] == "7"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content in RAMBLES[1:3]


@pytest.mark.parametrize("mode", ["think", "reasoning"])
def test_proxy_answers_with_the_answer_section_and_reasoning_content(oai, mode):
    resp = oai.chat.completions.create(
        model=f"self-consistency-2/standin+{mode}", messages=[{"role": "user", "content": "3 + 4?"}],
        max_tokens=64)
    message = resp.choices[0].message
    assert message.content == ANSWER_SECTION
    assert message.model_extra["reasoning_content"] == message.model_extra["reasoning"] == THINKING
    assert resp.model_extra["ttscale"]["answer"] == THINK_RIGHT


@pytest.mark.parametrize("mode", ["think", "reasoning"])
def test_streamed_single_sends_thinking_as_reasoning_content_deltas(oai, mode):
    stream = oai.chat.completions.create(
        model=f"single/standin+{mode}", messages=[{"role": "user", "content": "3 + 4?"}], max_tokens=64,
        stream=True)
    content, thinking, last = "", "", None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            extra = choice.delta.model_extra or {}
            assert extra.get("reasoning") == extra.get("reasoning_content")
            thinking += extra.get("reasoning") or ""
            if choice.finish_reason:
                last = chunk
    assert (thinking.strip(), content) == (THINKING, ANSWER_SECTION)
    assert last is not None and last.model_extra["ttscale"]["answer"] == THINK_RIGHT
    assert "streamed_text_replaced" not in last.model_extra["ttscale"]

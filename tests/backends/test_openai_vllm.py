"""OpenAIBackend against a real vLLM OpenAI-compatible server process on loopback (tiny model)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.fixtures.real_backends import TINY_CONTEXT, running_requests, vllm_metric
from ttscale.errors import ContextOverflow
from ttscale.types import GenerationRequest, SamplingSpec, ScoreRequest

pytestmark = pytest.mark.vllm

LONG = TINY_CONTEXT - 100  # longer than any test waits: a stream that must be cut, not end by itself
STOP_TIMEOUT_S = 60.0  # wait bound only; the token counts tell a cut request from one that ran to its end


def _req(rid: str, ids: list[int] | None = None, **kw) -> GenerationRequest:
    sampling = SamplingSpec(**{"temperature": 1.0, "top_p": 1.0, **kw.pop("sampling", {})})
    if ids is not None:
        kw["prompt_token_ids"] = ids
    return GenerationRequest(request_id=rid, sampling=sampling, **kw)


async def test_capabilities_are_detected(openai_backend, vllm_server):
    caps = openai_backend.capabilities
    assert openai_backend.model == vllm_server.served_name
    assert caps.max_context == TINY_CONTEXT
    assert caps.token_ids and caps.score and caps.tokenize and caps.n_per_request
    assert openai_backend.abort_method == "disconnect"  # vLLM has no /abort_request


async def test_streams_completion_and_chat_with_token_ids_and_logprobs(openai_backend):
    req = _req("oa-1", [100, 200, 300, 400], sampling={"max_tokens": 6, "logprobs": 2})
    ds = [d async for d in openai_backend.generate(req)]
    toks = [t for d in ds for t in d.token_ids]
    assert len(toks) == 6 == len([x for d in ds for x in d.logprobs or []])
    assert ds[0].prompt_tokens == 4 and ds[-1].finished and ds[-1].finish_reason == "length"
    assert all(len(t) == 2 for d in ds for t in d.top_logprobs or [])
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    chat = [d async for d in openai_backend.generate(_req("oa-2", messages=msgs, sampling={"max_tokens": 4}))]
    expected_prompt = await openai_backend._tokenize_payload({"messages": msgs, "add_generation_prompt": True})
    assert chat[0].prompt_tokens == len(expected_prompt)
    assert sum(d.n_tokens for d in chat) == 4 and chat[-1].finish_reason == "length"


async def test_cancelled_stream_leaves_the_servers_running_requests_within_a_second(openai_backend, vllm_server):
    """The stream ignores end-of-sequence, so only the cancel can end it before LONG tokens.

    The tiny model decodes faster than vLLM's HTTP front end streams (a loaded 2-core box streams ~200
    tokens/s), so the server may be thousands of tokens ahead of what the client has read: the proof that
    the cancel cut the request short is the server's own token count, not a race to see it running.
    """
    base = vllm_server.base_url
    assert await running_requests(base) == 0
    produced_before = await vllm_metric(base, "vllm:generation_tokens_total")
    got = 0
    flowing = asyncio.Event()

    async def consume():
        nonlocal got
        request = _req("oa-cancel", [7] * 16, sampling={"max_tokens": LONG, "ignore_eos": True})
        async for d in openai_backend.generate(request):
            got += d.n_tokens
            if got >= 3:
                flowing.set()

    task = asyncio.create_task(consume())
    try:
        await asyncio.wait_for(flowing.wait(), 60)
    finally:
        task.cancel()  # also when the test fails: a stream left running would load the next tests
    with pytest.raises(asyncio.CancelledError):
        await task
    # Judged by the server's token counter, not a wall-clock bound (a loaded 2-core box stalls for seconds):
    # the request must end long before its LONG tokens, which it would only reach if the cancel was ignored.
    await wait_until_idle(base)
    produced = await vllm_metric(base, "vllm:generation_tokens_total") - produced_before
    assert got <= produced < LONG, f"the server generated {produced} of {LONG} tokens: the cancel did not cut it"


async def wait_until_idle(base_url: str, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Poll until the server runs no request; fails after `timeout_s` (a request nobody stopped runs on)."""
    t0 = time.monotonic()
    while (running := await running_requests(base_url)) > 0:
        assert time.monotonic() - t0 < timeout_s, f"{running} request(s) still running after {timeout_s}s"
        await asyncio.sleep(0.02)


async def test_abort_by_id_ends_the_stream_with_abort(openai_backend, vllm_server):
    produced_before = await vllm_metric(vllm_server.base_url, "vllm:generation_tokens_total")
    seen_before, seen_after, last = 0, 0, None
    req = _req("oa-abort", [9] * 16, sampling={"max_tokens": LONG, "ignore_eos": True})
    async for d in openai_backend.generate(req):
        if seen_before < 5:
            seen_before += d.n_tokens
            if seen_before >= 5:
                await openai_backend.abort("oa-abort")
        else:
            seen_after += d.n_tokens
        last = d
    assert last.finished and last.finish_reason == "abort" and seen_after <= 2
    await wait_until_idle(vllm_server.base_url)
    produced = await vllm_metric(vllm_server.base_url, "vllm:generation_tokens_total") - produced_before
    assert seen_before <= produced < LONG, f"the server generated {produced} of {LONG} tokens: not cut"


async def test_score_through_the_server_matches_generation_logprobs(openai_backend):
    prompt = [11, 22, 33, 44, 55, 66]
    toks, lps = [], []
    async for d in openai_backend.generate(_req("oa-score", prompt, sampling={"max_tokens": 16, "seed": 5})):
        toks += d.token_ids
        lps += d.logprobs or []
    res = await openai_backend.score(ScoreRequest(prompt_token_ids=prompt, continuation_token_ids=toks))
    assert res.token_ids == toks
    assert max(abs(a - b) for a, b in zip(res.logprobs, lps, strict=True)) < 1e-4


async def test_context_overflow_through_the_server(openai_backend):
    text = "hello " * (TINY_CONTEXT + 100)
    with pytest.raises(ContextOverflow, match=f"maximum context length is {TINY_CONTEXT}"):
        async for _ in openai_backend.generate(_req("oa-long", prompt=text, sampling={"max_tokens": 4})):
            pass
    n = TINY_CONTEXT - 50
    with pytest.raises(ContextOverflow, match=f"{n} tokens and max_tokens=100"):
        async for _ in openai_backend.generate(_req("oa-long2", [5] * n, sampling={"max_tokens": 100})):
            pass


async def test_tokenize_matches_the_servers_tokenizer(openai_backend):
    ids = await openai_backend.tokenize("The answer is 42.")
    assert ids and len(ids) < 10


async def test_eight_branches_through_the_server_hit_its_prefix_cache(openai_backend, vllm_server):
    prompt = [(3000 + 13 * i) % 40000 + 100 for i in range(300)]
    before = await vllm_metric(vllm_server.base_url, "vllm:prefix_cache_hits_total")

    async def branch(i: int):
        req = _req(f"oa-pc-{i}", prompt, sampling={"max_tokens": 4, "seed": i})
        return [d async for d in openai_backend.generate(req)]

    runs = await asyncio.gather(*(branch(i) for i in range(8)))
    assert all(r[0].prompt_tokens == 300 and r[-1].finish_reason == "length" for r in runs)
    hits = await vllm_metric(vllm_server.base_url, "vllm:prefix_cache_hits_total") - before
    assert hits >= 7 * 256  # the seven later branches find at least the prompt's full blocks

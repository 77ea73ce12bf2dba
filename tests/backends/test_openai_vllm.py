"""OpenAIBackend against a real vLLM OpenAI-compatible server process on loopback (tiny model)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ttscale.errors import ContextOverflow
from ttscale.types import GenerationRequest, SamplingSpec, ScoreRequest

pytestmark = pytest.mark.vllm


def _req(rid: str, ids: list[int] | None = None, **kw) -> GenerationRequest:
    sampling = SamplingSpec(**{"temperature": 1.0, "top_p": 1.0, **kw.pop("sampling", {})})
    if ids is not None:
        kw["prompt_token_ids"] = ids
    return GenerationRequest(request_id=rid, sampling=sampling, **kw)


async def running_requests(base_url: str) -> float:
    """vllm:num_requests_running summed over engines, from the server's Prometheus /metrics."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{base_url}/metrics")).text
    return sum(
        s.value for fam in text_string_to_metric_families(text) for s in fam.samples
        if s.name == "vllm:num_requests_running"
    )


async def test_capabilities_are_detected(openai_backend, vllm_server):
    caps = openai_backend.capabilities
    assert openai_backend.model == vllm_server.served_name
    assert caps.max_context == 2048
    assert caps.token_ids and caps.score and caps.tokenize and caps.n_per_request
    assert openai_backend.abort_method == "disconnect"  # vLLM has no /abort_request


async def test_streams_completion_and_chat_with_token_ids_and_logprobs(openai_backend):
    ds = [d async for d in openai_backend.generate(_req("oa-1", [100, 200, 300, 400], sampling={"max_tokens": 6, "logprobs": 2}))]
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
    got = 0
    running = asyncio.Event()

    async def consume():
        nonlocal got
        # As long as the context allows (~2 s of decoding at ~1,000 tokens/s), so it cannot end by itself
        # before the cancel below.
        async for d in openai_backend.generate(_req("oa-cancel", [7] * 16, sampling={"max_tokens": 2032})):
            got += d.n_tokens
            if got >= 3:
                running.set()

    task = asyncio.create_task(consume())
    t_start = time.monotonic()
    await asyncio.wait_for(running.wait(), 60)
    n_running = await running_requests(vllm_server.base_url)
    assert n_running >= 1, f"request not running after {got} tokens, {time.monotonic() - t_start:.2f}s"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    t0 = time.monotonic()
    while await running_requests(vllm_server.base_url) > 0:
        assert time.monotonic() - t0 < 1.0, "the server still runs the cancelled request after 1 s"
        await asyncio.sleep(0.02)
    assert got < 2032


async def test_abort_by_id_ends_the_stream_with_abort(openai_backend, vllm_server):
    seen_before, seen_after, last = 0, 0, None
    async for d in openai_backend.generate(_req("oa-abort", [9] * 16, sampling={"max_tokens": 2032})):
        if seen_before < 5:
            seen_before += d.n_tokens
            if seen_before >= 5:
                await openai_backend.abort("oa-abort")
        else:
            seen_after += d.n_tokens
        last = d
    assert last.finished and last.finish_reason == "abort" and seen_after <= 2
    t0 = time.monotonic()
    while await running_requests(vllm_server.base_url) > 0:
        assert time.monotonic() - t0 < 1.0
        await asyncio.sleep(0.02)


async def test_score_through_the_server_matches_generation_logprobs(openai_backend):
    prompt = [11, 22, 33, 44, 55, 66]
    toks, lps = [], []
    async for d in openai_backend.generate(_req("oa-score", prompt, sampling={"max_tokens": 16, "seed": 5})):
        toks += d.token_ids
        lps += d.logprobs or []
    res = await openai_backend.score(ScoreRequest(prompt_token_ids=prompt, continuation_token_ids=toks))
    assert res.token_ids == toks
    assert max(abs(a - b) for a, b in zip(res.logprobs, lps)) < 1e-4


async def test_context_overflow_through_the_server(openai_backend):
    with pytest.raises(ContextOverflow, match="maximum context length is 2048"):
        async for _ in openai_backend.generate(_req("oa-long", prompt="hello " * 2100, sampling={"max_tokens": 4})):
            pass
    with pytest.raises(ContextOverflow, match="2000 tokens and max_tokens=100"):
        async for _ in openai_backend.generate(_req("oa-long2", [5] * 2000, sampling={"max_tokens": 100})):
            pass


async def test_tokenize_matches_the_servers_tokenizer(openai_backend):
    ids = await openai_backend.tokenize("The answer is 42.")
    assert ids and len(ids) < 10

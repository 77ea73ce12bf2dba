"""OpenAIBackend transport behaviour and SGLangBackend's wire mapping, against stand-in servers.

SGLang cannot run here (it needs a GPU), so its native API is served by a FastAPI stand-in that
implements SGLang's wire format (tests/backends/standins.py); the OpenAI-compatible behaviour against a
real vLLM server is in test_openai_vllm.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.backends.standins import CONTEXT, next_token, openai_app, serve, sglang_app, token_logprob
from tests.fixtures.real_backends import free_port
from ttscale.backends.openai import OpenAIBackend
from ttscale.backends.sglang import SGLangBackend
from ttscale.errors import BackendError, BackendUnavailable, ConfigError, ContextOverflow
from ttscale.types import GenerationRequest, SamplingSpec, ScoreRequest


def _req(rid: str, ids: list[int] | None = None, **sampling) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=ids or [1, 2, 3], sampling=SamplingSpec(**sampling))


async def _collect(backend, req):
    return [d async for d in backend.generate(req)]


async def _until(pred, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------ OpenAIBackend transport
async def test_retries_5xx_with_backoff_then_succeeds():
    app = openai_app(fail_first=2, fail_status=503)
    async with serve(app) as url:
        backend = OpenAIBackend(url, model="standin", detect=False, backoff_s=0.01, max_retries=3)
        t0 = time.monotonic()
        ds = await _collect(backend, _req("r1", max_tokens=3))
        await backend.close()
    assert app.state.posts == 3
    assert [t for d in ds for t in d.token_ids] == [next_token(0, i) for i in range(3)]
    assert ds[-1].finished and ds[-1].finish_reason == "length"
    assert time.monotonic() - t0 >= 0.01 * 0.5 + 0.02 * 0.5  # two back-offs happened


async def test_429_honours_retry_after_and_gives_up_after_max_retries():
    app = openai_app(fail_first=10, fail_status=429, retry_after="0.05")
    async with serve(app) as url:
        backend = OpenAIBackend(url, model="standin", detect=False, max_retries=2)
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=r"429.*overloaded.*after 3 attempts"):
            await _collect(backend, _req("r1"))
        elapsed = time.monotonic() - t0
        await backend.close()
    assert app.state.posts == 3 and elapsed >= 0.1


async def test_unreachable_server_raises_backend_unavailable_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    backend = OpenAIBackend(url, max_retries=1, backoff_s=0.01)
    with pytest.raises(BackendUnavailable, match=url.replace(".", r"\.")):
        await backend.connect()
    backend2 = OpenAIBackend(url, model="m", detect=False, max_retries=1, backoff_s=0.01)
    backend2._connected = True
    with pytest.raises(BackendUnavailable, match=rf"cannot reach {url}/v1/completions"):
        await _collect(backend2, _req("r1"))
    await backend.close()
    await backend2.close()


async def test_requests_spread_least_outstanding_first_and_fail_over():
    a, b = openai_app(), openai_app()
    async with serve(a) as url_a, serve(b) as url_b:
        dead = f"http://127.0.0.1:{free_port()}"
        backend = OpenAIBackend([url_a, url_b], model="standin", detect=False)
        results = await asyncio.gather(*(_collect(backend, _req(f"r{i}", max_tokens=20)) for i in range(8)))
        assert all(r[-1].finish_reason == "length" for r in results)
        assert (a.state.posts, b.state.posts) == (4, 4)
        assert a.state.peak == b.state.peak == 4
        assert all(e.outstanding == 0 for e in backend.endpoints)
        await backend.close()
        # A dead replica: its connection error is retried on the live one.
        backend = OpenAIBackend([dead, url_a], model="standin", detect=False, backoff_s=0.01)
        for i in range(3):
            ds = await _collect(backend, _req(f"f{i}", max_tokens=2))
            assert ds[-1].finish_reason == "length"
        await backend.close()


async def test_repeated_request_ids_stream_side_by_side():
    async with serve(openai_app()) as url:
        backend = OpenAIBackend(url, model="standin", detect=False)
        a, b = await asyncio.gather(_collect(backend, _req("b0", max_tokens=5)),
                                    _collect(backend, _req("b0", max_tokens=5)))
        await backend.close()
    assert sum(d.n_tokens for d in a) == sum(d.n_tokens for d in b) == 5


async def test_api_key_is_sent_and_a_refusal_is_clear():
    app = openai_app(api_key="sekret")
    async with serve(app) as url:
        ok = OpenAIBackend(url, model="standin", api_key="sekret", detect=False)
        assert (await _collect(ok, _req("r1", max_tokens=2)))[-1].finished
        bad = OpenAIBackend(url, model="standin", api_key="wrong", detect=False)
        with pytest.raises(BackendError, match="401.*API key"):
            await _collect(bad, _req("r2"))
        await ok.close()
        await bad.close()


async def test_server_context_error_maps_to_context_overflow():
    async with serve(openai_app()) as url:
        backend = OpenAIBackend(url, model="standin", detect=False)
        with pytest.raises(ContextOverflow, match="maximum context length"):
            await _collect(backend, _req("r1", list(range(CONTEXT + 5))))
        await backend.close()


async def test_token_id_strings_in_logprobs_give_token_ids():
    async with serve(openai_app()) as url:
        backend = OpenAIBackend(url, model="standin")
        await backend.connect()
        assert backend.model == "standin" and not backend.capabilities.token_ids
        ds = await _collect(backend, _req("r1", max_tokens=4, logprobs=1))
        await backend.close()
    toks = [t for d in ds for t in d.token_ids]
    assert toks == [next_token(0, i) for i in range(4)]
    assert [x for d in ds for x in (d.logprobs or [])] == pytest.approx([token_logprob(t) for t in toks])


async def test_vllm_only_sampling_fields_are_refused_by_a_plain_server_naming_them():
    app = openai_app()
    async with serve(app) as url:
        backend = OpenAIBackend(url, model="standin", detect=False)  # no probe: only OpenAI's own fields
        await backend.connect()
        assert not backend.ext_sampling
        for field, value in (("top_k", 5), ("stop_token_ids", [3]), ("ignore_eos", True)):
            with pytest.raises(ConfigError, match=f"does not accept .*{field}"):
                await _collect(backend, _req(f"r-{field}", **{field: value}))
        await backend.close()
    assert app.state.posts == 0  # refused before anything was sent


# ------------------------------------------------------------------ SGLang native API
@pytest.mark.parametrize("incremental", [False, True])
async def test_sglang_generate_maps_request_and_stream(incremental: bool):
    app = sglang_app(incremental=incremental)
    async with serve(app) as url:
        backend = SGLangBackend(url)
        req = _req("sg-1", [5, 6, 7], max_tokens=5, temperature=0.7, top_p=0.9, seed=11, stop=["\n"], logprobs=2)
        ds = await _collect(backend, req)
        await backend.close()
    body = app.state.bodies[-1]
    assert body["rid"].startswith("sg-1-") and body["stream"] is True and body["input_ids"] == [5, 6, 7]
    assert body["return_logprob"] is True and body["top_logprobs_num"] == 2
    assert body["sampling_params"] == {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_new_tokens": 5,
                                       "stop": ["\n"], "sampling_seed": 11}
    assert SGLangBackend.sampling_params(SamplingSpec(ignore_eos=True, top_k=4))["ignore_eos"] is True
    expected, prev = [], 7
    for i in range(5):
        prev = next_token(prev, i)
        expected.append(prev)
    assert [t for d in ds for t in d.token_ids] == expected
    assert "".join(d.text for d in ds) == "".join(f"t{t} " for t in expected)
    assert [x for d in ds for x in d.logprobs or []] == pytest.approx([token_logprob(t) for t in expected])
    tops = [t for d in ds for t in d.top_logprobs or []]
    assert len(tops) == 5 and all(len(t) == 2 and f"t{tok}" in t for t, tok in zip(tops, expected, strict=True))
    assert ds[0].prompt_tokens == 3 and ds[0].cached_prompt_tokens == 2
    assert ds[-1].finished and ds[-1].finish_reason == "length"


async def test_sglang_abort_sends_our_rid_and_ends_with_abort_within_two_tokens():
    app = sglang_app(delay_s=0.01)
    async with serve(app) as url:
        backend = SGLangBackend(url)
        seen = 0
        async for d in backend.generate(_req("sg-abort", max_tokens=1000)):
            seen += d.n_tokens
            if seen == 3:
                await backend.abort("sg-abort")
            last = d
        # tokens already on the wire when the abort lands still arrive (seen 4 under load): at most two more
        assert last.finish_reason == "abort" and 3 <= seen <= 5
        assert len(app.state.aborts) == 1 and app.state.aborts[0].startswith("sg-abort-")
        assert app.state.aborts[0] == app.state.bodies[-1]["rid"]
        # A cancelled consumer aborts the same way.
        task = asyncio.create_task(_collect(backend, _req("sg-cancel", max_tokens=1000)))
        await _until(lambda: any(b.get("rid", "").startswith("sg-cancel-") for b in app.state.bodies))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until(lambda: any(r.startswith("sg-cancel-") for r in app.state.aborts))
        await backend.close()


async def test_sglang_score_reads_input_token_logprobs():
    app = sglang_app()
    async with serve(app) as url:
        backend = SGLangBackend(url)
        res = await backend.score(ScoreRequest(prompt_token_ids=[4, 5, 6], continuation_token_ids=[10, 42]))
        await backend.close()
    assert app.state.bodies[-1]["logprob_start_len"] == 3
    assert app.state.bodies[-1]["input_ids"] == [4, 5, 6, 10, 42]
    assert res.token_ids == [10, 42]
    assert res.logprobs == pytest.approx([token_logprob(10), token_logprob(42)])


async def test_sglang_context_error_and_chat_without_tokenizer():
    async with serve(sglang_app()) as url:
        backend = SGLangBackend(url)
        with pytest.raises(ContextOverflow, match=rf"{CONTEXT} tokens and max_tokens=1.*context of {CONTEXT}"):
            await _collect(backend, _req("sg-long", list(range(CONTEXT)), max_tokens=1))  # checked here
        long_text = GenerationRequest(request_id="sg-text", prompt="x" * (CONTEXT + 10))
        with pytest.raises(ContextOverflow, match="longer than the model's context length"):
            await _collect(backend, long_text)  # measured by the server
        from ttscale.errors import ConfigError

        with pytest.raises(ConfigError, match="tokenizer="):
            await _collect(backend, GenerationRequest(request_id="c", messages=[{"role": "user", "content": "x"}]))
        await backend.close()


def test_distinct_keys_keeps_every_top_logprob_candidate():
    """Candidates with equal text (byte pieces of one character) must not overwrite each other."""
    from hypothesis import given
    from hypothesis import strategies as st

    from ttscale.backends.openai import distinct_keys

    assert distinct_keys([("\ufffd", -1.0), ("\ufffd", -2.0), ("a", -3.0)]) == {
        "\ufffd": -1.0, "\ufffd#1": -2.0, "a": -3.0}

    @given(st.lists(st.tuples(st.sampled_from(["a", "a#1", "\ufffd", "b"]), st.floats(-50, 0)), max_size=20))
    def one_key_per_candidate(pairs):
        out = distinct_keys(pairs)
        assert len(out) == len(pairs)
        assert sorted(out.values()) == sorted(lp for _, lp in pairs)

    one_key_per_candidate()

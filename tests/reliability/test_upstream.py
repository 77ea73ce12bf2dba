"""The proxy and OpenAIBackend against an upstream that hangs, dies, answers 500s and garbage, sends no token
counts or ignores max_tokens (issue 17: items 2, 4, 6, 7, 8 and /health).

Real parts: the ttscale proxy under uvicorn on 127.0.0.1 (tests/fixtures/server.py), the `ttscale serve`
CLI in its own process for SIGTERM, and the stand-in upstream (tests/backends/standins.py) that
misbehaves per request by model name (`standin+hang`, ...). Timeouts are configured short (0.5-2 s) so
a hang ends quickly; waits on the other side poll a counter with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from tests.backends.standins import NO_LIMIT_TOKENS, STALL_AFTER, next_token, openai_app, serve, sglang_app
from tests.fixtures.real_backends import spawn_process_group, stop_process_group
from tests.fixtures.server import ProxyServer, free_port
from ttscale.backends import make_backend
from ttscale.backends.openai import ESTIMATE_CUT_FACTOR, OpenAIBackend, estimate_tokens
from ttscale.backends.sglang import SGLangBackend
from ttscale.budget import Budget
from ttscale.controller import Context
from ttscale.errors import BackendError, BackendTimeout
from ttscale.pipeline import Pipeline
from ttscale.server.app import ServeConfig, check_sse
from ttscale.types import BranchStatus, GenerationRequest, SamplingSpec

SHORT = 2.0  # seconds: the timeouts a hang test waits for (room for a loaded 2-core box)


async def until(pred: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll `pred` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s} s"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[tuple[object, str]]:
    app = openai_app()
    async with serve(app) as url:
        yield app, url


@contextlib.asynccontextmanager
async def proxy_for(url: str, **config) -> AsyncIterator[ProxyServer]:
    """The proxy in front of `url` with short timeouts; started and stopped off the event loop (the
    stand-in upstream runs on this loop and must keep answering meanwhile)."""
    cfg = {"upstream_connect_timeout_s": SHORT, "upstream_first_token_timeout_s": SHORT,
           "upstream_idle_timeout_s": SHORT, "upstream_probe_timeout_s": SHORT, "upstream_retries": 0, **config}
    proxy = ProxyServer(ServeConfig(upstreams=[url], **cfg))
    proxy.server.config.timeout_graceful_shutdown = 3
    await asyncio.to_thread(proxy.start)
    try:
        yield proxy
    finally:
        await asyncio.to_thread(proxy.stop)


def serving_of(proxy: ProxyServer):
    return proxy.app.state.ttscale_serving


def leaked(backend: OpenAIBackend) -> tuple[int, list[int]]:
    """(live stream entries, outstanding count per endpoint): both must return to zero."""
    return len(backend._streams), [e.outstanding for e in backend.endpoints]


def chat(model: str, max_tokens: int = 8, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": max_tokens, **extra}


async def sse_events(resp: httpx.Response) -> list[dict | str]:
    out: list[dict | str] = []
    async for line in resp.aiter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def stream_events(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, list[dict | str]]:
    async with client.stream("POST", url, json=body) as resp:
        return resp.status_code, await sse_events(resp)


def _req(rid: str, max_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(request_id=rid, messages=[{"role": "user", "content": "hi"}],
                             sampling=SamplingSpec(max_tokens=max_tokens))


def backend_for(url: str, model: str = "standin", **kw) -> OpenAIBackend:
    opts = {"first_token_timeout_s": SHORT, "idle_timeout_s": SHORT, "max_retries": 0, "detect": False, **kw}
    return OpenAIBackend(url, model=model, **opts)


# ------------------------------------------------------------------ 1. every branch is released (item 2)
async def test_cancelled_ffs_losers_and_budget_aborts_release_every_stream(upstream):
    app, url = upstream
    backend = backend_for(url, model="standin+staggered")  # branch lengths 30, 22, 14, 6 by seed
    pipe = Pipeline(backend, "ffs:n=4,max_tokens=30,seed=0", concurrency=2)
    results = await pipe.run(["p1", "p2", "p3"])
    assert all(r.usage.aborted >= 1 for r in results)  # losers were cancelled mid-stream
    assert leaked(backend) == (0, [0])
    # Budget aborts: three long branches, a total budget far below what they would generate.
    ctx = Context(backend, budget=Budget(total_tokens=12))
    branches = ctx.spawn("q", 3, SamplingSpec(max_tokens=400), after=[])
    await ctx.wait_all(branches)
    await ctx.aclose()
    assert ctx.budget_hit == "total_tokens"
    assert any(b.meta.get("abort_reason") == "budget" for b in branches)
    assert leaked(backend) == (0, [0])
    await until(lambda: app.state.active == 0, what="upstream streams closed")
    await backend.close()


async def test_a_cancelled_sglang_stream_is_aborted_and_released():
    app = sglang_app(delay_s=0.01)
    async with serve(app) as url:
        be = SGLangBackend(url)
        task = asyncio.create_task(collect(be.generate(GenerationRequest(
            request_id="sg", prompt_token_ids=[1, 2], sampling=SamplingSpec(max_tokens=1000)))))
        await until(lambda: len(app.state.bodies) == 1, what="the request reaching SGLang")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert app.state.aborts == [app.state.bodies[0]["rid"]]  # aborted by our rid on the server
        assert leaked(be) == (0, [0])
        await be.close()


async def collect(stream: AsyncIterator) -> list:
    return [d async for d in stream]


async def test_client_disconnects_release_the_proxy_backends_streams(upstream):
    app, url = upstream
    async with proxy_for(url) as proxy, httpx.AsyncClient(timeout=30) as client:
        for _ in range(5):
            async with client.stream("POST", f"{proxy.url}/v1/chat/completions",
                                     json=chat("sc-4/standin", max_tokens=2000, stream=True,
                                               ttscale={"progress": True})) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():  # leave once a branch is running
                    if '"spawned"' in line:
                        break
        be = serving_of(proxy)._backends["standin"]
        await until(lambda: leaked(be) == (0, [0]), what="proxy backend bookkeeping released")
        await until(lambda: app.state.active == 0, what="upstream streams closed")


# ------------------------------------------------------------------ 2. one slow model stalls no other (item 4)
async def test_a_hanging_models_connection_check_does_not_block_other_models(upstream):
    app, url = upstream
    async with proxy_for(url, upstream_first_token_timeout_s=3.0) as proxy, \
            httpx.AsyncClient(timeout=30) as client:
        slow = asyncio.create_task(client.post(f"{proxy.url}/v1/chat/completions",
                                               json=chat("single/standin+hang")))
        await until(lambda: app.state.hanging >= 1, what="the slow model's check hanging")
        fast = await client.post(f"{proxy.url}/v1/chat/completions", json=chat("single/standin", max_tokens=3))
        hanging_when_fast_answered = app.state.hanging
        assert fast.status_code == 200, fast.text
        assert fast.json()["choices"][0]["message"]["content"] == "".join(f"t{next_token(0, i)} " for i in range(3))
        assert hanging_when_fast_answered >= 1  # answered while the other model's check still hung
        r = await slow
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
        await until(lambda: app.state.hanging == 0, what="the hung upstream requests closed")


# ------------------------------------------------------------------ 3. timeouts (item 6)
async def test_hanging_upstream_gives_504_for_passthrough_and_strategies(upstream):
    app, url = upstream
    async with proxy_for(url) as proxy, httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{proxy.url}/v1/chat/completions", json=chat("standin+hang"))
        assert r.status_code == 504, r.text
        err = r.json()["error"]
        assert err["type"] == "upstream_error" and err["code"] == "upstream_timeout"
        assert "--upstream-first-token-timeout" in err["message"]
        r = await client.post(f"{proxy.url}/v1/chat/completions", json=chat("standin+hang", stream=True))
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
        # A stream that stops mid-way: 200, its tokens, then an error chunk naming the idle limit.
        async with client.stream("POST", f"{proxy.url}/v1/chat/completions",
                                 json=chat("standin+stall", stream=True)) as resp:
            assert resp.status_code == 200
            events = await sse_events(resp)
        texts = [e["choices"][0]["delta"].get("content") for e in events if isinstance(e, dict) and e.get("choices")]
        assert "".join(t or "" for t in texts) == "".join(f"t{next_token(0, i)} " for i in range(STALL_AFTER))
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "upstream_timeout"
        assert "--upstream-idle-timeout" in events[-2]["error"]["message"]
        # Strategy requests: non-streamed 504; streamed, an error chunk.
        r = await client.post(f"{proxy.url}/v1/chat/completions", json=chat("single/standin+stall"))
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout", r.text
        async with client.stream("POST", f"{proxy.url}/v1/chat/completions",
                                 json=chat("sc-2/standin+stall", stream=True)) as resp:
            events = await sse_events(resp)
        assert [e["error"]["code"] for e in events if isinstance(e, dict) and "error" in e] == ["upstream_timeout"]
        await until(lambda: app.state.hanging == 0, what="the hung upstream requests closed")


async def test_openai_backend_timeouts_name_the_limit_and_come_from_spec_options(upstream):
    app, url = upstream
    be = make_backend(f"openai:{url}?model=standin%2Bhang&detect=false&first_token_timeout_s=0.5"
                      "&idle_timeout_s=0.5&timeout_s=5&max_retries=0")
    assert (be.first_token_timeout_s, be.idle_timeout_s, be.timeout_s) == (0.5, 0.5, 5)
    with pytest.raises(BackendTimeout, match=r"no first token .* within 0.5 s \(first_token_timeout_s\)"):
        [d async for d in be.generate(_req("h"))]
    be.model = "standin+stall"
    with pytest.raises(BackendTimeout, match=r"idle_timeout_s"):
        [d async for d in be.generate(_req("s"))]
    # The total limit holds even while chunks keep coming.
    be.model, be.timeout_s, be.idle_timeout_s = "standin+no-limit", 0.5, 5.0
    with pytest.raises(BackendTimeout, match=r"within 0.5 s \(timeout_s\)"):
        [d async for d in be.generate(_req("t", max_tokens=NO_LIMIT_TOKENS * 2))]
    assert leaked(be) == (0, [0])
    with pytest.raises(Exception, match="first_token_timeout_s must be"):
        OpenAIBackend(url, first_token_timeout_s=0)
    await until(lambda: app.state.hanging == 0 and app.state.active == 0, what="upstream requests closed")
    await be.close()


async def test_sigterm_drains_in_flight_requests_then_aborts_hung_ones(upstream):
    app, url = upstream
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = spawn_process_group(  # ends with this test process, even when it is killed
        [sys.executable, "-m", "ttscale.cli", "serve", "--upstream", url, "--port", str(port),
         "--shutdown-timeout", "2", "--upstream-first-token-timeout", "60"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            deadline = time.monotonic() + 60
            while True:  # wait for the server process to listen
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{base}/health")).status_code == 200:
                        break
                assert proc.poll() is None and time.monotonic() < deadline, "ttscale serve did not start"
                await asyncio.sleep(0.1)
            hung = asyncio.create_task(client.post(f"{base}/v1/chat/completions", json=chat("standin+hang")))
            await until(lambda: app.state.hanging >= 1, what="the hung request reaching the upstream")
            # A stream that finishes within the drain window (40 tokens, 5 ms each) completes.
            ok = asyncio.create_task(stream_events(client, f"{base}/v1/chat/completions",
                                                   chat("standin", 40, stream=True)))
            await until(lambda: app.state.active >= 1, what="the short request streaming")
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 30)
            exited_after = time.monotonic() - t0
            status, events = await ok
            assert status == 200 and events[-1] == "[DONE]"
            assert len([e for e in events if isinstance(e, dict) and e.get("choices")
                    and e["choices"][0]["delta"].get("content")]) == 40
            with contextlib.suppress(httpx.HTTPError):
                await hung  # cut at the drain deadline (its connection closes)
        assert rc in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled once it has shut down
        assert 1.5 <= exited_after < 20  # waited for the drain deadline, then stopped waiting
        await until(lambda: app.state.hanging == 0, what="the hung upstream request aborted")
    finally:
        await asyncio.to_thread(stop_process_group, proc)


# ------------------------------------------------------------------ 4. upstream garbage is a 502 (item 7)
async def test_passthrough_refuses_html_and_malformed_streams_with_502(upstream):
    _app, url = upstream
    async with proxy_for(url) as proxy, httpx.AsyncClient(timeout=30) as client:
        for model in ("standin+html", "standin+html-json"):
            for stream in (False, True):
                r = await client.post(f"{proxy.url}/v1/chat/completions", json=chat(model, stream=stream))
                assert r.status_code == 502, (model, stream, r.text)
                assert "not JSON" in r.json()["error"]["message"] and "<!DOCTYPE html>" in r.json()["error"]["message"]
        async with client.stream("POST", f"{proxy.url}/v1/completions",
                                 json={"model": "standin+bad-sse", "prompt": "x", "max_tokens": 4,
                                       "stream": True}) as resp:
            assert resp.status_code == 200  # the first chunk was good
            events = await sse_events(resp)
        assert events[0]["choices"][0]["text"] == f"t{next_token(0, 0)} "
        assert events[-1] == "[DONE]"
        assert "not JSON" in events[-2]["error"]["message"] and events[-2]["error"]["type"] == "upstream_error"
        async with client.stream("POST", f"{proxy.url}/v1/completions",
                                 json={"model": "standin+die", "prompt": "x", "max_tokens": 8,
                                       "stream": True}) as resp:
            events = await sse_events(resp)
        assert len([e for e in events if isinstance(e, dict) and e.get("choices")]) == STALL_AFTER
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "upstream_error" and "broke" in events[-2]["error"]["message"]
        r = await client.post(f"{proxy.url}/v1/chat/completions", json=chat("standin+500"))
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal failure"  # relayed as is
        r = await client.post(f"{proxy.url}/v1/chat/completions", json=chat("standin", max_tokens=2))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2  # good answers pass


async def test_strategies_turn_upstream_garbage_into_502_with_the_reason(upstream):
    _app, url = upstream
    async with proxy_for(url) as proxy, httpx.AsyncClient(timeout=30) as client:
        for model, reason in (("standin+html", "not server-sent events"), ("standin+bad-sse", "not JSON"),
                              ("standin+die", "broke"), ("standin+500", "internal failure")):
            r = await client.post(f"{proxy.url}/v1/chat/completions", json=chat(f"single/{model}"))
            assert r.status_code == 502, (model, r.text)
            assert r.json()["error"]["type"] == "upstream_error" and reason in r.json()["error"]["message"], model


async def test_openai_backend_raises_backend_error_for_garbage(upstream):
    _app, url = upstream
    for model, reason in (("standin+html", "not server-sent events"), ("standin+bad-sse", "not JSON")):
        be = backend_for(url, model)
        with pytest.raises(BackendError, match=reason):
            [d async for d in be.generate(_req(model))]
        assert leaked(be) == (0, [0])
        await be.close()


def test_check_sse_keeps_whole_good_lines_and_names_the_first_bad_one():
    good, tail, problem = check_sse(b'data: {"a": 1}\n\n: keep-alive\ndata: [DONE]\n\ndata: {"b"')
    assert good == b'data: {"a": 1}\n\n: keep-alive\ndata: [DONE]\n\n' and tail == b'data: {"b"' and problem is None
    good, tail, problem = check_sse(b'data: {"a": 1}\n\n<html>\n')
    assert good == b'data: {"a": 1}\n\n' and "not server-sent events" in problem and "<html>" in problem
    _good, _tail, problem = check_sse(b'data: {"b"', final=True)
    assert "not JSON" in problem


# ------------------------------------------------------------------ 5. budgets without token counts (item 8)
async def test_counts_are_estimated_from_text_and_corrected_by_the_final_usage(upstream):
    _app, url = upstream
    be = backend_for(url, "standin+no-counts")
    ds = [d async for d in be.generate(_req("e", max_tokens=6))]
    pieces = [d for d in ds if d.text]
    chars = sum(len(d.text) for d in pieces)
    assert all(d.estimated_tokens for d in pieces)
    assert sum(d.n_tokens for d in pieces) == estimate_tokens(chars)  # no per-piece rounding
    correction = [d for d in ds if d.estimated_tokens is False]
    assert len(correction) == 1 and sum(d.n_tokens for d in ds) == 6  # reconciled with usage
    assert ds[-1].finished and ds[-1].finish_reason == "length"
    await be.close()


async def test_a_configured_local_tokenizer_counts_the_text(upstream):
    from transformers import AutoTokenizer

    from ttscale.models import default_model_dir

    _app, url = upstream
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    be = backend_for(url, "standin+no-counts", tokenizer=str(default_model_dir()))
    ds = [d async for d in be.generate(_req("tok", max_tokens=5))]
    pieces = [d for d in ds if d.text]
    assert pieces and all(d.estimated_tokens for d in pieces)
    assert [d.n_tokens for d in pieces] == [len(tok.encode(d.text, add_special_tokens=False)) for d in pieces]
    await be.close()


async def test_a_server_ignoring_max_tokens_is_cut_at_it(upstream):
    app, url = upstream
    for model, limit in (("standin+no-limit", 20), ("standin+no-counts+no-limit", math.ceil(20 * ESTIMATE_CUT_FACTOR))):
        be = backend_for(url, model)
        ds = [d async for d in be.generate(_req(model, max_tokens=20))]
        assert ds[-1].finish_reason == "length"
        assert 20 <= sum(d.n_tokens for d in ds) <= limit + 2, model
        await be.close()
    await until(lambda: app.state.active == 0, what="the cut streams closed upstream")


async def test_pipeline_budget_holds_mid_stream_without_token_counts(upstream):
    app, url = upstream
    be = backend_for(url, "standin+no-counts+no-limit")
    pipe = Pipeline(be, "sc:n=3,max_tokens=4000", budget={"total_tokens": 40})
    result = await asyncio.wait_for(pipe.solve("2+2?"), 20)
    assert 40 <= result.usage.generated_tokens <= 40 + 3 * 2  # one delta past the budget per branch at most
    assert result.usage.aborted == 3
    assert leaked(be) == (0, [0])
    await until(lambda: app.state.active == 0, what="the aborted streams closed upstream")
    await be.close()


async def test_the_branch_that_exactly_uses_up_the_budget_is_finished(upstream):
    _app, url = upstream
    be = backend_for(url)
    async with Context(be, budget=Budget(total_tokens=5)) as ctx:
        (b,) = ctx.spawn("q", 1, SamplingSpec(max_tokens=100))
        await ctx.wait_all([b])
    assert b.request.sampling.max_tokens == 5  # clamped to the budget
    assert (b.status, b.finish_reason, b.num_tokens) == (BranchStatus.finished, "length", 5)
    assert ctx.budget_hit == "total_tokens" and ctx.usage.aborted == 0
    await be.close()


# ------------------------------------------------------------------ 6. /health probes the upstream
async def test_health_probes_the_upstream_and_caches_the_answer(upstream):
    app, url = upstream
    async with proxy_for(url) as proxy, httpx.AsyncClient(timeout=30) as client:
        gets = app.state.model_gets
        r1, r2 = await client.get(f"{proxy.url}/health"), await client.get(f"{proxy.url}/health")
        assert (r1.status_code, r1.json()) == (200, {"status": "ok"}) and r2.status_code == 200
        assert app.state.model_gets - gets == 1  # the second answer came from the cache
        app.state.models_hang = True
        try:
            deadline = time.monotonic() + 10
            while (r := await client.get(f"{proxy.url}/health")).status_code == 200:  # until the cache expires
                assert time.monotonic() < deadline, "/health kept saying ok with a hung upstream"
                await asyncio.sleep(0.1)
            assert r.status_code == 503 and r.json()["status"] == "upstream_unavailable"
            assert "no answer in time" in r.json()["upstreams"][0]
        finally:
            app.state.models_hang = False
    async with proxy_for(f"http://127.0.0.1:{free_port()}") as dead, httpx.AsyncClient(timeout=30) as client:
        r = await client.get(f"{dead.url}/health")
        assert r.status_code == 503 and r.json()["status"] == "upstream_unavailable"

"""The proxy's request parameters, extra pass-through routes, metrics and health (issue 16), against the
OpenAI-compatible stand-in (tests/backends/standins.py) on 127.0.0.1 and the proxy under uvicorn, called
with the official openai client and httpx. The same behaviour against a real vLLM server:
tests/server/test_proxy_vllm.py.

The stand-in's token i is `next_token(0, i)`, sent as `token_id:N` with logprob `token_logprob(N)`, so the
logprobs a response must carry are known exactly; it records every body it receives (`state.bodies`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.backends.standins import MODEL, ThreadedServer, next_token, openai_app, token_logprob
from tests.fixtures.real_backends import spawn_process_group, stop_process_group
from tests.fixtures.server import free_port, running_proxy, standin_proxy
from ttscale.backends.engine.backend import to_params
from ttscale.errors import ConfigError
from ttscale.server.app import ServeConfig
from ttscale.server.forwarding import merge_sampling
from ttscale.server.relay import reported_usage, stream_usage
from ttscale.types import GenerationRequest, SamplingSpec

MSG = [{"role": "user", "content": "What is 2 + 3?"}]
EMBEDDING = [0.25, -0.5, 1.0]


def standin_with_extra_routes():
    """The stand-in plus the routes vLLM serves beside generation, answering fixed, recognisable bodies."""
    app = openai_app()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return {"object": "list", "model": body["model"],
                "usage": {"prompt_tokens": 2 * len(inputs), "total_tokens": 2 * len(inputs)},
                "data": [{"object": "embedding", "index": i, "embedding": EMBEDDING} for i in range(len(inputs))]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await request.json()
        tokens = [len(w) for w in body["prompt"].split()]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": 2048}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await request.json()
        return {"prompt": " ".join("x" * t for t in body["tokens"])}

    @app.get("/version")
    async def version():
        return {"version": "0.32.0-standin"}

    @app.post("/v1/responses")
    async def responses(request: Request):
        body = await request.json()
        return {"object": "response", "model": body["model"], "status": "completed",
                "output": [{"type": "message", "content": [{"type": "output_text", "text": "standin"}]}]}

    return app


upstream, proxy, oai = standin_proxy(standin_with_extra_routes, max_tokens=64)


def new_bodies(upstream, since: int) -> list[dict]:
    """Generation bodies the upstream got since `since` (branches stream; the backend's one capability
    probe, on its first use, does not)."""
    return [b for b in upstream.app.state.bodies[since:] if b.get("stream")]


def error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    return body["error"]


# ------------------------------------------------------------------ parameters forwarded to every branch


def test_strategy_request_forwards_sampling_parameters_to_every_branch(oai, upstream):
    since = len(upstream.app.state.bodies)
    r = oai.chat.completions.create(
        model=f"self-consistency-3/{MODEL}", messages=MSG, max_tokens=6, seed=11, stop=["\n\n", "END"],
        presence_penalty=0.5, frequency_penalty=-0.25,
        extra_body={"repetition_penalty": 1.2, "min_p": 0.05, "min_tokens": 2, "stop_token_ids": [5],
                    "logit_bias": {"42": -100}, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content
    bodies = new_bodies(upstream, since)
    assert len(bodies) == 3
    for b in bodies:
        assert b["stop"] == ["\n\n", "END"] and b["stop_token_ids"] == [5]
        assert (b["presence_penalty"], b["frequency_penalty"], b["repetition_penalty"]) == (0.5, -0.25, 1.2)
        assert (b["min_p"], b["min_tokens"], b["logit_bias"]) == (0.05, 2, {"42": -100})
        assert b["chat_template_kwargs"] == {"enable_thinking": False} and b["max_tokens"] == 6
    assert sorted(b["seed"] for b in bodies) == [11, 12, 13]  # branch i samples with seed + i


def test_a_stop_string_is_added_to_a_completion_request(oai, upstream):
    since = len(upstream.app.state.bodies)
    oai.completions.create(model=f"self-consistency-2/{MODEL}", prompt="2 + 3 =", max_tokens=4, stop="\n")
    assert [b["stop"] for b in new_bodies(upstream, since)] == [["\n"], ["\n"]]


@pytest.mark.parametrize(("kind", "patch", "param"), [
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),
    ("completion", {"best_of": 3}, "best_of"),
    ("completion", {"suffix": "!"}, "suffix"),
    ("chat", {"prompt_logprobs": 1}, "prompt_logprobs"),
])
def test_parameters_that_cannot_apply_are_refused_by_name(proxy, upstream, kind, patch, param):
    since = len(upstream.app.state.bodies)
    path, body = (("/v1/chat/completions", {"messages": MSG}) if kind == "chat"
                  else ("/v1/completions", {"prompt": "2 + 3 ="}))
    r = httpx.post(f"{proxy.url}{path}", json={"model": f"sc-2/{MODEL}", **body, **patch})
    assert r.status_code == 400
    e = error(r)
    assert e["param"] == param and param in e["message"] and e["code"] == "unsupported_parameter"
    assert "without a strategy" in e["message"]
    assert new_bodies(upstream, since) == []  # refused before anything started


@pytest.mark.parametrize("patch", [{"tools": []}, {"response_format": {"type": "text"}}, {"tool_choice": "none"},
                                   {"parallel_tool_calls": True}, {"functions": None}])
def test_refusable_fields_at_their_default_are_served(proxy, patch):
    """Clients (SDKs, UIs) send these at their defaults on every request: they ask for nothing."""
    r = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": f"sc-2/{MODEL}", "messages": MSG,
                                                                "max_tokens": 8, **patch})
    assert r.status_code == 200, r.text


def test_a_null_ttscale_object_is_a_pass_through(proxy, upstream):
    since = len(upstream.app.state.bodies)
    r = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 8,
                                                                "ttscale": None})
    assert r.status_code == 200 and "ttscale" not in r.json(), r.text  # no strategy run's extension
    assert len(upstream.app.state.bodies) == since + 1  # one upstream call, the request itself


@pytest.mark.parametrize("key", ["chat_template", "add_generation_prompt", "tokenize", "conversation",
                                 "messages", "tools", "documents", "return_dict", "continue_final_message"])
def test_chat_template_kwargs_that_are_no_template_variables_are_refused_by_name(oai, upstream, key):
    """`chat_template_kwargs` are the template's variables; `apply_chat_template`'s own arguments (Jinja
    source, `tokenize`, the conversation, ...) are a 400 naming the key, before anything starts."""
    since = len(upstream.app.state.bodies)
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model=f"self-consistency-2/{MODEL}", messages=MSG, max_tokens=4,
            extra_body={"chat_template_kwargs": {"enable_thinking": False, key: "{{ 'pwned' }}"}})
    e = info.value.body
    assert info.value.status_code == 400
    assert e["param"] == f"chat_template_kwargs.{key}" and e["code"] == "unsupported_parameter"
    assert f"'chat_template_kwargs.{key}'" in e["message"]
    assert new_bodies(upstream, since) == []


def test_template_variables_still_reach_every_branch(oai, upstream):
    since = len(upstream.app.state.bodies)
    kwargs = {"enable_thinking": True, "reasoning_effort": "low", "custom_instructions": "be brief"}
    oai.chat.completions.create(model=f"self-consistency-2/{MODEL}", messages=MSG, max_tokens=4,
                                extra_body={"chat_template_kwargs": kwargs})
    assert [b["chat_template_kwargs"] for b in new_bodies(upstream, since)] == [kwargs, kwargs]


@pytest.mark.parametrize(("patch", "param"), [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"min_tokens": 10, "max_tokens": 4}, "min_tokens"),
    ({"made_up_field": 1}, "made_up_field"),
])
def test_bad_forwarded_values_name_the_field(proxy, upstream, patch, param):
    since = len(upstream.app.state.bodies)
    r = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": f"sc-2/{MODEL}", "messages": MSG, **patch})
    assert r.status_code == 400 and error(r)["param"] == param, r.text
    assert new_bodies(upstream, since) == []


def expected_tokens(n: int) -> list[tuple[str, float]]:
    return [(f"token_id:{t}", token_logprob(t)) for t in (next_token(0, i) for i in range(n))]


def test_chat_logprobs_are_those_of_the_answer_trace(oai):
    r = oai.chat.completions.create(model=f"self-consistency-2/{MODEL}", messages=MSG, max_tokens=5,
                                    logprobs=True, top_logprobs=0)
    content = r.choices[0].logprobs.content
    assert [(c.token, c.logprob) for c in content] == expected_tokens(5)
    assert all(c.bytes == list(c.token.encode()) and c.top_logprobs == [] for c in content)
    plain = oai.chat.completions.create(model=f"self-consistency-2/{MODEL}", messages=MSG, max_tokens=5)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_streamed_come_with_the_last_chunk(oai):
    chunks = list(oai.completions.create(model=f"self-consistency-2/{MODEL}", prompt="2 + 3 =", max_tokens=4,
                                         logprobs=1, stream=True))
    with_lp = [c for c in chunks if c.choices and c.choices[0].logprobs is not None]
    assert len(with_lp) == 1 and with_lp[0].choices[0].finish_reason is not None
    lp = with_lp[0].choices[0].logprobs
    assert list(zip(lp.tokens, lp.token_logprobs, strict=True)) == expected_tokens(4)
    # branches send the prompt raw (completion requests): the stand-in's completions send the sampled token as top-1
    assert lp.top_logprobs == [{token: logprob} for token, logprob in expected_tokens(4)]
    assert lp.text_offset == [sum(len(t) for t, _ in expected_tokens(i)) for i in range(4)]


@given(strategy_stop=st.lists(st.text(min_size=1, max_size=3), max_size=3),
       client_stop=st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=3),
       strategy_k=st.none() | st.integers(0, 20), client_k=st.integers(0, 20))
def test_merged_sampling_keeps_the_strategys_own_stops_and_the_larger_top_k(strategy_stop, client_stop,
                                                                            strategy_k, client_k):
    req = GenerationRequest(request_id="r", messages=MSG,
                            sampling=SamplingSpec(stop=strategy_stop, logprobs=strategy_k, temperature=0.3))
    out = merge_sampling(req, {"stop": client_stop, "logprobs": client_k, "presence_penalty": 1.0},
                         {"enable_thinking": True})
    assert set(out.sampling.stop) == set(strategy_stop) | set(client_stop)
    assert len(out.sampling.stop) == len(set(out.sampling.stop))
    assert out.sampling.logprobs == max(client_k, strategy_k if strategy_k is not None else client_k)
    assert out.sampling.temperature == 0.3 and out.sampling.presence_penalty == 1.0
    assert out.chat_template_kwargs == {"enable_thinking": True}
    as_prompt = merge_sampling(req.model_copy(update={"messages": None, "prompt": "x"}), {}, {"a": 1})
    assert as_prompt.chat_template_kwargs is None  # a template's arguments only reach chat requests


def test_the_engine_backend_refuses_what_it_cannot_apply_by_name():
    with pytest.raises(ConfigError, match="repetition_penalty, min_p"):
        to_params(SamplingSpec(repetition_penalty=1.3, min_p=0.1))
    assert to_params(SamplingSpec(stop=["x"], logprobs=2, seed=3)).stop == ["x"]


# ------------------------------------------------------------------ pass-through routes


def test_extra_routes_pass_through_unchanged(proxy, upstream, oai):
    emb = oai.embeddings.create(model=MODEL, input=["a b", "c"])
    assert [d.embedding for d in emb.data] == [EMBEDDING, EMBEDDING] and emb.usage.prompt_tokens == 4
    for method, path, body in [("POST", "/tokenize", {"model": MODEL, "prompt": "one three"}),
                               ("POST", "/detokenize", {"model": MODEL, "tokens": [2, 1]}),
                               ("GET", "/version", None),
                               ("POST", "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 8})]:
        via_proxy = httpx.request(method, f"{proxy.url}{path}", json=body)
        direct = httpx.request(method, f"{upstream.url}{path}", json=body)
        assert via_proxy.status_code == direct.status_code == 200
        assert via_proxy.json() == direct.json()


def test_extra_routes_keep_the_proxys_guards(proxy, upstream):
    r = httpx.post(f"{proxy.url}/tokenize", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and error(r)["code"] == "invalid_json"
    r = httpx.post(f"{proxy.url}/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 65})
    assert r.status_code == 400 and error(r)["param"] == "max_output_tokens"
    r = httpx.post(f"{proxy.url}/v1/embeddings", json={"model": MODEL, "input": "x" * (2 * 2**20)})
    assert r.status_code == 413 and error(r)["code"] == "body_too_large"


def test_extra_routes_need_the_api_key(upstream):
    with running_proxy(ServeConfig(upstreams=[upstream.url], api_key="k")) as p:
        assert httpx.post(f"{p.url}/tokenize", json={"model": MODEL, "prompt": "a"}).status_code == 401
        ok = httpx.post(f"{p.url}/tokenize", json={"model": MODEL, "prompt": "a"},
                        headers={"authorization": "Bearer k"})
        assert ok.status_code == 200 and ok.json()["tokens"] == [1]


# ------------------------------------------------------------------ metrics and health


def samples(proxy) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"{proxy.url}/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_requests_runs_tokens_and_latency(proxy, oai):
    before = samples(proxy)
    oai.chat.completions.create(model=f"self-consistency-2/{MODEL}", messages=MSG, max_tokens=3)
    oai.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4)
    list(oai.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, stream=True,
                                     stream_options={"include_usage": True}))
    httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": f"sc-2/{MODEL}", "messages": MSG, "tools": [1]})
    after = samples(proxy)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/v1/chat/completions"
    assert grew("ttscale_requests_total", route=route, model=MODEL, strategy="self-consistency", status="200") == 1
    assert grew("ttscale_requests_total", route=route, model=MODEL, strategy="passthrough", status="200") == 2
    assert grew("ttscale_requests_total", route=route, model=MODEL, strategy="self-consistency", status="400") == 1
    assert grew("ttscale_strategy_runs_total", strategy="self-consistency", outcome="ok") == 1
    assert grew("ttscale_strategy_branches_total", strategy="self-consistency", status="finished") == 2
    assert grew("ttscale_tokens_total", direction="completion", strategy="self-consistency") == 6
    assert grew("ttscale_tokens_total", direction="completion", strategy="passthrough") == 8
    assert grew("ttscale_request_duration_seconds_count", route=route, strategy="passthrough") == 2
    assert value(after, "ttscale_requests_in_flight", route=route) == 0


def test_metrics_never_label_a_model_name_a_client_made_up(proxy):
    httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "made-up-name-123", "messages": MSG})
    assert not any(dict(labels).get("model") == "made-up-name-123" for _, labels in samples(proxy))


def test_health_reports_the_upstream_down_and_back():
    port = free_port()
    with running_proxy(ServeConfig(upstreams=[f"http://127.0.0.1:{port}"], upstream_retries=0)) as p:
        down = httpx.get(f"{p.url}/health")
        assert down.status_code == 503 and down.json()["status"] == "upstream_unavailable"
        assert str(port) in down.json()["upstreams"][0]
        assert httpx.post(f"{p.url}/tokenize", json={"prompt": "a"}).status_code == 502


def test_a_served_backend_has_no_upstream_routes():
    from ttscale.backends.scripted import ScriptedBackend

    with running_proxy(ServeConfig(served_model_name="m"), backend=ScriptedBackend(lambda _r, _i: "ok")) as p:
        r = httpx.post(f"{p.url}/tokenize", json={"prompt": "a"})
        assert r.status_code == 404 and "--upstream" in error(r)["message"]
        assert httpx.get(f"{p.url}/health").json() == {"status": "ok"}
        assert "ttscale_requests_total" in httpx.get(f"{p.url}/metrics").text


def test_usage_is_read_from_json_answers_and_the_last_stream_block():
    assert reported_usage(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 5}}') == (3, 5)
    assert reported_usage(b'{"choices": []}') is None and reported_usage(b"not json") is None
    block = b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 7}}\n\ndata: [DONE]\n\n'
    assert stream_usage(block) == (2, 7)
    assert stream_usage(b'data: {"choices": [{"delta": {}}], "usage": null}\n\n') is None


def test_workers_share_their_metrics(upstream):
    """`ttscale serve --workers 2`: whichever worker answers /metrics counts every worker's requests."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = spawn_process_group([sys.executable, "-m", "ttscale.cli", "serve", "--upstream", upstream.url,
                                "--workers", "2", "--port", str(port)])
    try:
        deadline = time.monotonic() + 120
        while True:  # polling the proxy's readiness, bounded by the deadline
            assert proc.poll() is None and time.monotonic() < deadline, "the proxy did not start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.2)
        for _ in range(6):  # new connections: the kernel spreads them over both workers
            r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 2})
            assert r.status_code == 200, r.text
        for _ in range(4):
            found = {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(
                httpx.get(f"{url}/metrics").text) for s in family.samples}
            assert value(found, "ttscale_requests_total", route="/v1/chat/completions", model=MODEL,
                         strategy="passthrough", status="200") == 6
    finally:
        stop_process_group(proc)


@pytest.mark.parametrize(("model", "status", "code"), [
    ("sc-2/standin+500", 502, None),  # every branch fails before a token
    ("hogwild/standin", 400, "unsupported_strategy"),  # the strategy cannot run on this upstream
])
def test_a_streamed_run_that_fails_before_its_first_token_gets_the_errors_status(proxy, model, status, code):
    """Clients branch on the status: a 200 whose stream holds only an error read as a success."""
    r = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": model, "messages": MSG, "max_tokens": 8,
                                                                "stream": True}, timeout=60)
    assert r.status_code == status, r.text
    e = error(r)
    assert e["message"] and (code is None or e["code"] == code)


def test_a_streamed_run_still_streams_its_progress_and_answer(proxy):
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=60, json={
            "model": f"sc-2/{MODEL}", "messages": MSG, "max_tokens": 8, "stream": True,
            "ttscale": {"progress": True}}) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    events = [json.loads(ln[6:]).get("ttscale", {}).get("event") for ln in lines[:-1]]
    assert events.count("spawned") == 2 and events[-1] == "done" and lines[-1] == "data: [DONE]"


# ------------------------------------------------------------------ stream_options, broken streams, fan-out hints


@pytest.mark.parametrize("model", [MODEL, f"sc-2/{MODEL}"])
@pytest.mark.parametrize(("path", "body"), [("/v1/chat/completions", {"messages": MSG}),
                                            ("/v1/completions", {"prompt": "2 + 3 ="})])
def test_stream_options_without_stream_is_refused_as_openai_does(proxy, upstream, model, path, body):
    since = len(upstream.app.state.bodies)
    for stream in ({}, {"stream": False}):
        r = httpx.post(f"{proxy.url}{path}", json={"model": model, **body, "max_tokens": 4, **stream,
                                                   "stream_options": {"include_usage": True}})
        assert r.status_code == 400, r.text
        e = error(r)
        assert e["param"] == "stream_options" and "'stream' is true" in e["message"]
    assert len(upstream.app.state.bodies) == since  # refused before anything reached the upstream
    unset = httpx.post(f"{proxy.url}{path}", json={"model": model, **body, "max_tokens": 4, "stream_options": None})
    assert unset.status_code == 200, unset.text


def stream_data(proxy, path: str, body: dict) -> list[str]:
    """The `data:` payloads of a streamed request, which must start with a 200."""
    with httpx.stream("POST", f"{proxy.url}{path}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        return [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]


@pytest.mark.parametrize("model", [f"{MODEL}+die", f"single/{MODEL}+die"])  # pass-through, strategy run
@pytest.mark.parametrize(("path", "body"), [("/v1/chat/completions", {"messages": MSG}),
                                            ("/v1/completions", {"prompt": "2 + 3 ="})])
def test_a_stream_the_upstream_breaks_ends_with_the_error_then_done(proxy, model, path, body):
    """As vLLM ends a stream it reports an error in, so a client's stream loop ends cleanly."""
    data = stream_data(proxy, path, {"model": model, **body, "max_tokens": 8})
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    assert json.loads(data[-2])["error"]["type"] == "upstream_error"
    assert any(json.loads(d).get("choices") for d in data[:-2])  # the tokens sent before the upstream broke


def done_then_hang_app() -> FastAPI:
    """An upstream whose streams end with `[DONE]` but whose connection then stays open and silent."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "hangs-after-done", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat():
        async def gen():
            yield 'data: {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}\n\n'
            yield "data: [DONE]\n\n"
            await asyncio.Event().wait()  # until the proxy closes the connection (Starlette cancels us then)

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


def test_an_upstream_failing_after_its_done_adds_nothing_to_the_stream():
    with ThreadedServer(done_then_hang_app(), name="done-then-hang", lifespan="off") as up, \
            running_proxy(ServeConfig(upstreams=[up.url], upstream_retries=0, upstream_idle_timeout_s=1.0)) as p:
        data = stream_data(p, "/v1/chat/completions", {"model": "hangs-after-done", "messages": MSG})
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    assert not any("error" in json.loads(d) for d in data[:-1])


def test_atts_over_the_call_limit_is_told_what_to_lower_and_each_remedy_works(proxy, upstream):
    """ATTS at its defaults starts 16 samples × 15 turns × 3 calls = 720 > the default limit of 256."""
    def post(proxy, model: str, ext: dict | None = None) -> dict:
        r = httpx.post(f"{proxy.url}/v1/chat/completions",
                       json={"model": model, "messages": MSG, **({"ttscale": ext} if ext else {})})
        assert r.status_code == 400, r.text
        return error(r)

    e = post(proxy, f"atts/{MODEL}")
    assert e["code"] == "fan_out_limit" and e["param"] == "model" and "720" in e["message"]
    for said in ("ttscale.samples (16, the default)", "ttscale.turns (15, the default)", "ttscale.samples=5",
                 "atts-5/MODEL", "--max-branches"):
        assert said in e["message"], said
    # Each remedy gets past the limit (to the next check: no ATTS target is configured here).
    for model, ext in ((f"atts-5/{MODEL}", None), (f"atts/{MODEL}", {"samples": 5}),
                       (f"atts/{MODEL}", {"turns": 5})):
        assert post(proxy, model, ext)["code"] == "unknown_resource", (model, ext)
    assert post(proxy, f"atts-6/{MODEL}")["code"] == "fan_out_limit"  # 5 is the widest that fits
    with running_proxy(ServeConfig(upstreams=[upstream.url], upstream_retries=0, max_branches=720)) as raised:
        assert post(raised, f"atts/{MODEL}")["code"] == "unknown_resource"

"""Strategy requests on `/v1/completions` send the prompt to the model as it is (no chat template, no system
prompt), strategies that cannot are refused by name, and a prompt too long for the model blames the route's
prompt field. Against the OpenAI-compatible stand-in (tests/backends/standins.py) behind a context limit,
with the proxy under uvicorn; `best-of-n`'s verifier on a served scripted backend.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from tests.backends.standins import MODEL, openai_app
from tests.fixtures.server import running_proxy, standin_proxy
from ttscale.backends.scripted import ScriptedBackend
from ttscale.prompts import MATH_SYSTEM
from ttscale.server.app import ServeConfig
from ttscale.server.build import RAW_PROMPT_STRATEGIES
from ttscale.strategies.registry import strategies
from ttscale.types import GenerationRequest, ScoreRequest

FEW_SHOT = "Q: 1 + 1 =\nA: 2\n\nQ: 2 + 3 =\nA:"
CONTEXT_CHARS = 400  # prompts longer than this overflow the stand-in's context


class ContextLimited:
    """The stand-in behind a context limit: a prompt (or messages) longer than `CONTEXT_CHARS` characters is
    answered with the 400 vLLM sends for a prompt over the model's context; anything else is served."""

    def __init__(self) -> None:
        self.inner = openai_app()
        self.state = self.inner.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.inner(scope, receive, send)
            return
        raw, more = b"", True
        while more:
            msg = await receive()
            raw, more = raw + msg.get("body", b""), msg.get("more_body", False)
        body = json.loads(raw)
        text = body.get("prompt") if isinstance(body.get("prompt"), str) else json.dumps(body.get("messages"))
        if len(text or "") > CONTEXT_CHARS:
            await JSONResponse({"error": {"message": "This model's maximum context length is 2048 tokens. "
                                          "However, you requested 4096 tokens in the messages."}},
                               status_code=400)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await self.inner(scope, replay, send)


upstream, proxy, oai = standin_proxy(ContextLimited, max_tokens=64)


def new_bodies(upstream, since: int) -> list[dict]:
    """Generation bodies the upstream got since `since` (the backend's capability probe does not stream)."""
    return [b for b in upstream.app.state.bodies[since:] if b.get("stream")]


def completion(proxy, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{proxy.url}/v1/completions", json={"max_tokens": 4, **body}, timeout=60)


@pytest.mark.parametrize(("body", "branches"), [
    ({"model": f"sc-2/{MODEL}"}, 2),
    ({"model": f"ffs-3/{MODEL}"}, 3),
    ({"model": f"single/{MODEL}", "stream": True}, 1),
    ({"model": MODEL, "ttscale": {"strategy": "self-consistency", "n": 2}}, 2),
])
def test_a_completion_prompt_reaches_the_model_as_it_is(proxy, upstream, body, branches):
    since = len(upstream.app.state.bodies)
    r = completion(proxy, {"prompt": FEW_SHOT, **body})
    assert r.status_code == 200, r.text
    sent = new_bodies(upstream, since)
    assert len(sent) == branches
    for b in sent:  # raw text to the upstream's /v1/completions: no chat template, no system prompt
        assert b["prompt"] == FEW_SHOT and "messages" not in b and "chat_template_kwargs" not in b
    if body.get("stream"):
        lines = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1]
                       if json.loads(ln[6:])["choices"])
    else:
        assert r.json()["object"] == "text_completion" and r.json()["choices"][0]["text"]


def test_chat_requests_still_go_through_the_template_with_the_system_prompt(oai, upstream):
    since = len(upstream.app.state.bodies)
    oai.chat.completions.create(model=f"sc-2/{MODEL}", messages=[{"role": "user", "content": FEW_SHOT}],
                                max_tokens=4)
    sent = new_bodies(upstream, since)
    assert [b["messages"] for b in sent] == [[{"role": "system", "content": MATH_SYSTEM},
                                              {"role": "user", "content": FEW_SHOT}]] * 2
    assert all("prompt" not in b for b in sent)


@pytest.mark.parametrize("name", ["pdr", "sr", "atts", "parscale", "hogwild", "parathinker"])
def test_strategies_that_send_more_than_the_prompt_are_refused_on_completions(proxy, upstream, name):
    since = len(upstream.app.state.bodies)
    r = completion(proxy, {"model": f"{name}/{MODEL}", "prompt": FEW_SHOT})
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert e["code"] == "unsupported_strategy" and e["param"] == "model"
    assert f"'{name}'" in e["message"] and "/v1/chat/completions" in e["message"]
    assert new_bodies(upstream, since) == []


def test_a_refused_strategy_named_in_the_ttscale_object_blames_that_field(proxy):
    r = completion(proxy, {"model": MODEL, "prompt": FEW_SHOT, "ttscale": {"strategy": "pdr"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ttscale.strategy", r.text


def test_every_raw_prompt_strategy_is_a_registered_one():
    assert RAW_PROMPT_STRATEGIES.issubset(cls.name for cls in strategies().values())


def test_a_verifier_scores_the_answer_after_the_raw_prompt():
    scores: list[ScoreRequest] = []

    def loglik(request: ScoreRequest) -> list[float]:
        scores.append(request)
        return [-0.5]

    backend = ScriptedBackend(["\\boxed{5}", "\\boxed{5} again"], score_fn=loglik)
    with running_proxy(ServeConfig(served_model_name="m"), backend=backend) as p:
        r = completion(p, {"model": "m", "prompt": FEW_SHOT,
                           "ttscale": {"strategy": "best-of-n", "n": 2, "verifier": "loglik"}})
    assert r.status_code == 200 and r.json()["ttscale"]["answer"] == "5", r.text
    generated: list[GenerationRequest] = backend.requests
    assert [(g.prompt, g.messages) for g in generated] == [(FEW_SHOT, None)] * 2
    assert [(s.prompt, s.messages) for s in scores] == [(FEW_SHOT, None)] * 2


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"model": f"sc-2/{MODEL}", "prompt": "x" * 1000}, "prompt"),
    ("/v1/completions", {"model": f"single/{MODEL}", "prompt": "x" * 1000, "stream": True}, "prompt"),
    ("/v1/chat/completions", {"model": f"sc-2/{MODEL}", "messages": [{"role": "user", "content": "x" * 1000}]},
     "messages"),
])
def test_a_prompt_too_long_for_the_model_blames_the_routes_prompt_field(proxy, path, body, param):
    r = httpx.post(f"{proxy.url}{path}", json={"max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert e["code"] == "context_length_exceeded" and e["param"] == param
    assert "maximum context length" in e["message"]

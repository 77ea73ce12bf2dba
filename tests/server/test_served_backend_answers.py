"""What a client of a strategy route is told when the answer cannot be what it asked for: a budget that ran out
before any branch finished is a `length` cut-off (not an empty `stop`), and a field no strategy can apply is a
400 that says where the request can go on this server (the proxy passes it through; `ttscale serve --backend`
and the vLLM plugin cannot). A real uvicorn server (or the plugin's own router under ASGI) over the scripted
backend."""

from __future__ import annotations

import json
from argparse import Namespace
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI

from tests.fixtures.server import running_proxy
from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.server import vllm_plugin
from ttscale.server.app import ServeConfig

MSG = [{"role": "user", "content": "What is 2 + 3?"}]
LONG = Script(text=" ".join(f"w{i}" for i in range(200)) + " \\boxed{5}")
REFUSED = [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
           ({"response_format": {"type": "json_object"}}, "response_format"),
           ({"n": 2}, "n")]


def sse_chunks(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_a_budget_spent_before_any_branch_finished_is_a_length_cut_off():
    """Non-streamed and streamed, a voting strategy and `single`: finish reason `length`, the text generated so
    far, no answer, and the fallbacks name the budget. A budget that leaves room for the answers: `stop`."""
    with running_proxy(ServeConfig(served_model_name="m"), backend=ScriptedBackend([LONG])) as p:
        url = f"{p.url}/v1/chat/completions"
        cut = {"ttscale": {"budget": {"total_tokens": 30}}, "max_tokens": 500}
        r = httpx.post(url, json={"model": "self-consistency-2/m", "messages": MSG, **cut}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        (choice,) = body["choices"]
        assert choice["finish_reason"] == "length"
        assert choice["message"]["content"].startswith("w0 w1") and "boxed" not in choice["message"]["content"]
        assert body["ttscale"]["answer"] is None
        assert [f for f in body["ttscale"]["fallbacks"] if "total_tokens budget ran out" in f]

        streamed = httpx.post(url, json={"model": "m", "messages": MSG, "stream": True, **cut}, timeout=60)
        chunks = sse_chunks(streamed.text)
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        (last,) = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert last["choices"][0]["finish_reason"] == "length" and content.startswith("w0 w1")
        assert "streamed_text_replaced" not in last["ttscale"]  # the cut text is what was streamed
        assert [f for f in last["ttscale"]["fallbacks"] if "total_tokens budget ran out" in f]

        ok = httpx.post(url, json={"model": "self-consistency-2/m", "messages": MSG, "max_tokens": 500},
                        timeout=60).json()
        assert ok["choices"][0]["finish_reason"] == "stop" and ok["ttscale"]["answer"] == "5"
        assert ok["ttscale"]["fallbacks"] == []


@pytest.mark.parametrize("patch,param", REFUSED)
def test_a_served_backend_does_not_offer_a_pass_through_it_has_not(patch, param):
    """`ttscale serve --backend` runs a plain name as `single` and has no upstream: the 400 says so, and the
    proxy (which has one) still offers it."""
    with running_proxy(ServeConfig(served_model_name="m"), backend=ScriptedBackend(["\\boxed{5}"])) as p:
        for model in ("m", "sc-2/m"):
            r = httpx.post(f"{p.url}/v1/chat/completions", json={"model": model, "messages": MSG, **patch})
            assert r.status_code == 400, r.text
            e = r.json()["error"]
            assert e["param"] == param and e["code"] == "unsupported_parameter", e
            assert "no upstream" in e["message"] and "to pass it through to the upstream" not in e["message"]
            assert "`single`" in e["message"]


@pytest.fixture
def plugin_app(monkeypatch) -> tuple[FastAPI, vllm_plugin.TTScaleEndpointPlugin]:
    """The plugin's router and state as vLLM mounts them, over the scripted backend instead of vLLM's engine
    client (the real vLLM server runs in tests/server/test_vllm_plugin.py)."""
    monkeypatch.delenv("TTSCALE_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.setattr(vllm_plugin, "_attached_backend", lambda _client, _args: ScriptedBackend(["\\boxed{5}"]))
    app = FastAPI()
    plugin = vllm_plugin.register()
    plugin.attach_router(app)
    return app, plugin


@pytest.mark.parametrize("patch,param", REFUSED)
async def test_the_vllm_plugin_points_to_vllms_own_routes(plugin_app, patch, param):
    """Inside vLLM a plain name runs `single` on the /ttscale routes: a request no strategy can serve is sent to
    vLLM's own /v1 routes, not told to go without a strategy (that is the same route here)."""
    app, plugin = plugin_app
    await plugin.init_state(SimpleNamespace(), app.state, Namespace(model="/models/m", served_model_name=["m"],
                                                                   api_key=None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
        for model in ("m", "sc-2/m"):
            r = await c.post("/ttscale/v1/chat/completions", json={"model": model, "messages": MSG, **patch})
            assert r.status_code == 400, r.text
            e = r.json()["error"]
            assert e["param"] == param and e["code"] == "unsupported_parameter", e
            assert "vLLM server's own /v1 routes" in e["message"] and "without /ttscale" in e["message"]
            assert "send the request without a strategy" not in e["message"]
        ok = await c.post("/ttscale/v1/chat/completions", json={"model": "m", "messages": MSG})
        assert ok.status_code == 200 and ok.json()["ttscale"]["answer"] == "5"

"""The ttscale router inside a real vLLM server process, through vLLM 0.32's `vllm.endpoint_plugins`."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.fixtures.real_backends import VLLMServer
from tests.fixtures.server import plugin_env

pytestmark = pytest.mark.vllm


KEY = "sekret"  # the server's --api-key: vLLM's own routes and the plugin's both ask for it
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def plugin_server(tiny_model_dir, tmp_path_factory) -> Iterator[VLLMServer]:
    """A vLLM OpenAI server started with VLLM_PLUGINS=ttscale (endpoint plugins are opt-in in vLLM) and an API
    key."""
    server = VLLMServer(tiny_model_dir, tmp_path_factory.mktemp("vllm-plugin") / "server.log",
                        extra_args=["--api-key", KEY])
    with plugin_env():
        server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_plugin_serves_a_strategy_request_inside_vllm(plugin_server):
    assert "Loaded endpoint plugin ttscale" in plugin_server.log_path.read_text(errors="replace")
    c = openai.OpenAI(base_url=f"{plugin_server.base_url}/ttscale/v1", api_key=KEY, max_retries=0, timeout=120)
    name = plugin_server.served_name
    r = c.chat.completions.create(model=f"self-consistency-2/{name}", messages=[{"role": "user", "content": "2+3?"}],
                                  max_tokens=8, extra_body={"ttscale": {"include_traces": True}})
    spent = r.usage.model_extra["ttscale"]
    assert spent["branches"] == 2 and r.usage.completion_tokens == 16 == spent["generated_tokens"]
    assert [t["num_tokens"] for t in r.model_extra["ttscale"]["traces"]] == [8, 8]

    chunks = [ch.choices[0].delta.content for ch in c.chat.completions.create(
        model=f"single/{name}", messages=[{"role": "user", "content": "hi"}], max_tokens=12, stream=True)
        if ch.choices and ch.choices[0].delta.content]
    assert len(chunks) >= 2

    assert [m.id for m in c.models.list().data] == [name]
    bad = httpx.post(f"{plugin_server.base_url}/ttscale/v1/chat/completions", headers=AUTH,
                     json={"model": f"nope-2/{name}", "messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_strategy"
    # vLLM's own routes are untouched.
    plain = httpx.post(f"{plugin_server.base_url}/v1/completions", headers=AUTH,
                       json={"model": name, "prompt": "a", "max_tokens": 3})
    assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 3


def test_plugin_routes_take_the_vllm_servers_api_key(plugin_server):
    """vLLM's auth middleware guards only its own prefixes (/v1, ...): the plugin's /ttscale routes check the
    server's --api-key themselves (they generated for anyone before)."""
    base, name = plugin_server.base_url, plugin_server.served_name
    body = {"model": f"self-consistency-2/{name}", "messages": [{"role": "user", "content": "2+3?"}], "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        for r in (httpx.post(f"{base}/ttscale/v1/chat/completions", json=body, headers=headers),
                  httpx.post(f"{base}/ttscale/v1/completions", json={**body, "prompt": "2+3="}, headers=headers),
                  httpx.get(f"{base}/ttscale/v1/models", headers=headers)):
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert httpx.get(f"{base}/v1/models", headers=headers).status_code == 401  # vLLM's own, as before
    ok = httpx.post(f"{base}/ttscale/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8


def test_plugin_api_keys_are_the_servers_and_ttscales(monkeypatch):
    """Any of vLLM's --api-key values (else VLLM_API_KEY) and TTSCALE_API_KEY; none of them set: no auth."""
    from argparse import Namespace

    from ttscale.server.vllm_plugin import api_keys

    for var in ("VLLM_API_KEY", "TTSCALE_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert api_keys(Namespace(api_key=None)) == [] == api_keys(Namespace())
    assert api_keys(Namespace(api_key=["a", "b"])) == ["a", "b"]
    assert api_keys(Namespace(api_key="a")) == ["a"]
    monkeypatch.setenv("VLLM_API_KEY", "env")
    assert api_keys(Namespace(api_key=None)) == ["env"]
    assert api_keys(Namespace(api_key=["a"])) == ["a"]  # --api-key takes precedence, as in vLLM
    monkeypatch.setenv("TTSCALE_API_KEY", "t")
    assert api_keys(Namespace(api_key=["a"])) == ["a", "t"]


def test_plugin_is_opt_in(vllm_server):
    """Without VLLM_PLUGINS naming it, vLLM does not load the plugin (its documented security posture)."""
    assert httpx.get(f"{vllm_server.base_url}/ttscale/health").status_code == 404


def test_plugin_forwards_request_parameters_to_the_engine(plugin_server):
    """Inside vLLM, branches run on its engine client: stop strings, logprobs, penalties and chat template
    arguments reach vLLM's SamplingParams and chat template (ttscale/backends/vllm.py)."""
    c = openai.OpenAI(base_url=f"{plugin_server.base_url}/ttscale/v1", api_key=KEY, max_retries=0, timeout=120)
    model = f"self-consistency-2/{plugin_server.served_name}"
    msgs = [{"role": "user", "content": "2+3?"}]
    whole = c.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0, logprobs=True,
                                      top_logprobs=2)
    text = whole.choices[0].message.content
    content = whole.choices[0].logprobs.content
    assert len(content) == 16 and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.logprob >= max(t.logprob for t in e.top_logprobs) - 1e-4 for e in content)  # greedy
    # the sampled token as text (it was `token_id:N`): greedy, so the first of its top logprobs
    assert all(e.token == e.top_logprobs[0].token and not e.token.startswith("token_id:") for e in content)
    p = next(p for p in range(3, len(text) - 3) if text.find(text[p:p + 3]) == p and text[p:p + 3].strip())
    cut = c.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0, stop=[text[p:p + 3]])
    assert cut.choices[0].message.content == text[:p] and cut.choices[0].finish_reason == "stop"
    tuned = c.chat.completions.create(model=model, messages=msgs, max_tokens=6, presence_penalty=0.5,
                                      extra_body={"repetition_penalty": 1.3, "min_p": 0.01, "min_tokens": 6,
                                                  "chat_template_kwargs": {"enable_thinking": False}})
    assert tuned.usage.completion_tokens == 12 and tuned.choices[0].message.content is not None

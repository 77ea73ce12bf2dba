"""`ttscale serve --backend engine:MODEL`: the same API served from our engine (real uvicorn, real weights)."""

from __future__ import annotations

import openai
import pytest

from tests.fixtures.server import running_proxy
from ttscale.server.app import ServeConfig


@pytest.fixture(scope="module")
def engine_server(tiny_model_dir):
    from ttscale.backends.engine import EngineBackend, EngineConfig

    be = EngineBackend(EngineConfig(model=str(tiny_model_dir), dtype="float32", device="cpu", kv_memory_gb=0.05))
    with running_proxy(ServeConfig(served_model_name="tiny", max_n=4), backend=be) as p:
        yield p


def test_engine_backend_serves_plain_and_strategy_names(engine_server):
    c = openai.OpenAI(base_url=f"{engine_server.url}/v1", api_key="x", max_retries=0, timeout=120)
    plain = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert plain.usage.completion_tokens == 5 and plain.model_extra["ttscale"]["strategy"].startswith("single")
    sc = c.completions.create(model="self-consistency-2/tiny", prompt="2+3=", max_tokens=4)
    assert sc.usage.model_extra["ttscale"]["branches"] == 2 and sc.usage.completion_tokens == 8
    streamed = [ch.choices[0].delta.content for ch in c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True)
        if ch.choices and ch.choices[0].delta.content]
    assert len(streamed) >= 2
    for other in ("other", "self-consistency-2/other"):  # the prefixed one ran on "tiny", answering as "other"
        with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
            c.chat.completions.create(model=other, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="self-consistency-5/tiny", messages=[{"role": "user", "content": "hi"}])

"""Hogwild through `ttscale serve` on our engine (real uvicorn, the openai client): its workers are Context
branches, so a streamed request gets their progress as chunks and then the answer."""

from __future__ import annotations

import openai
import pytest

from tests.fixtures.server import running_proxy
from ttscale.server.app import ServeConfig


@pytest.fixture(scope="module")
def engine_server(tiny_model_dir):
    from ttscale.backends.engine import EngineBackend, EngineConfig

    be = EngineBackend(EngineConfig(model=str(tiny_model_dir), dtype="float32", device="cpu", kv_memory_gb=0.05,
                                    stream_interval_ms=0))
    with running_proxy(ServeConfig(served_model_name="tiny", max_n=4), backend=be) as p:
        yield p


def test_hogwild_streams_worker_progress_and_the_answer(engine_server):
    c = openai.OpenAI(base_url=f"{engine_server.url}/v1", api_key="x", max_retries=0, timeout=300)
    chunks = list(c.chat.completions.create(
        model="hogwild-2/tiny", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True},
        extra_body={"ttscale": {"progress": "deltas"}}))
    events = [ch.model_extra["ttscale"] for ch in chunks if (ch.model_extra or {}).get("ttscale")]
    deltas = [e for e in events if e.get("event") == "delta"]
    spawned = [e["branch"] for e in events if e.get("event") == "spawned"]
    assert len(spawned) == 2 and {e["branch"] for e in deltas} == set(spawned)
    assert sum(e["n_tokens"] for e in deltas) >= 2 * 6
    done = events[-1]
    assert done["event"] == "done" and done["strategy"].startswith("hogwild")
    assert done["decision"]["forwards"] >= 6
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == sum(e["n_tokens"] for e in deltas)
    assert usage.model_extra["ttscale"]["branches"] == 2

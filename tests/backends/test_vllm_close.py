"""Closing in-process vLLM at the end of a process skips the teardown, and nothing breaks because of it.

Real vLLM in a fresh interpreter (the session's engine shares this one's process-wide vLLM state)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.fixtures.real_backends import (
    TINY_KV_CACHE_BYTES,
    require_vllm,
    spawn_process_group,
    stop_process_group,
    vllm_env,
)

pytestmark = pytest.mark.vllm

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, threading
    from ttscale.backends.base import process_ending
    from ttscale.backends import vllm_inprocess
    from ttscale.backends.vllm import VLLMBackend
    from ttscale.types import GenerationRequest, SamplingSpec

    MODEL, KV = sys.argv[1], int(sys.argv[2])

    async def tokens(backend, rid):
        req = GenerationRequest(request_id=rid, prompt_token_ids=[101, 202, 303, 404],
                                sampling=SamplingSpec(temperature=0.7, top_p=0.9, max_tokens=5, seed=3))
        return [t async for d in backend.generate(req) for t in d.token_ids]

    async def main():
        first = VLLMBackend(MODEL, dtype="float32", kv_cache_memory_bytes=KV, max_num_seqs=4)
        a = await tokens(first, "a")
        with process_ending():
            await first.close()
        alive = [t.name for t in threading.enumerate() if t.name == "vllm-engine"]
        print("after ending close:", len(vllm_inprocess._UNFREED), "unfreed,", len(alive), "engine threads")
        second = VLLMBackend(MODEL, dtype="float32", kv_cache_memory_bytes=KV, max_num_seqs=4)
        b = await tokens(second, "b")  # builds a second engine: the first one's teardown runs first
        print("after second start:", len(vllm_inprocess._UNFREED), "unfreed")
        await second.close()
        print("same tokens:", a == b, len(a))
        third = VLLMBackend(MODEL, dtype="float32", kv_cache_memory_bytes=KV, max_num_seqs=4)
        await tokens(third, "c")
        with process_ending():
            await third.close()  # the process exits with this engine stopped, not torn down

    asyncio.run(main())
    print("done")
    """
)


def test_an_engine_closed_as_the_process_ends_is_stopped_and_the_next_one_still_starts(tiny_model_dir):
    require_vllm()
    # its own process group, killed with the test run even when that is killed (real_backends' guard)
    proc = spawn_process_group([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(TINY_KV_CACHE_BYTES)],
                               env=vllm_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        stop_process_group(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "after ending close: 1 unfreed, 0 engine threads" in out, out
    assert "after second start: 0 unfreed" in out, out
    assert "same tokens: True 5" in out, out
    assert out.rstrip().endswith("done"), out
    assert "Traceback" not in err, err[-3000:]

"""The scheduler's queue logic (no model) and the one sampling-parameter type."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.backends.engine import Engine, SamplingParams
from ttscale.backends.engine.backend import to_params
from ttscale.backends.engine.kv_cache import BlockPool, KVCache, Sequence
from ttscale.backends.engine.request import Request
from ttscale.backends.engine.scheduler import Scheduler
from ttscale.errors import ConfigError
from ttscale.strategies.base import StrategyConfig
from ttscale.types import DEFAULT_MAX_TOKENS, SamplingSpec


def _req(i: int, n: int, **sampling) -> Request:
    return Request(f"r{i}", list(range(i * 1000, i * 1000 + n)), SamplingSpec(**sampling), None, seed=i)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=12), chunk=st.integers(1, 600),
       max_running=st.integers(1, 8), running=st.integers(0, 8))
def test_a_prefill_plan_keeps_the_token_budget_the_running_cap_and_arrival_order(lengths, chunk, max_running,
                                                                                  running):
    cache = KVCache(BlockPool(1, 1, 2, num_blocks=8, block_size=16))
    sched = Scheduler(block_size=16, prefill_chunk=chunk, max_running=max_running)
    for i, n in enumerate(lengths):
        assert sched.add(_req(i, n))
    sched.running.extend(_req(100 + i, 1) for i in range(running))

    def setup(r: Request) -> None:
        r.seq = Sequence.new(cache)

    work = sched.plan_prefill(setup)
    assert sum(w.count for w in work) <= chunk
    assert len(work) <= max(0, max_running - running)
    assert all(1 <= w.count <= len(w.request.prompt_ids) and w.start == 0 for w in work)
    order = [sched.waiting.index(w.request) for w in work]
    assert order == sorted(order)
    if running < max_running:  # distinct prompts never wait for each other: the oldest always starts
        assert work and work[0].request is sched.waiting[0]


def test_requests_leave_the_queues_as_the_scheduler_says():
    cache = KVCache(BlockPool(1, 1, 2, num_blocks=8, block_size=4))
    sched = Scheduler(block_size=4, eos=[7], max_context=12)
    a, b = _req(0, 3, max_tokens=3), _req(1, 3, stop_token_ids=[9], ignore_eos=True)
    assert sched.add(a) and sched.add(b) and not sched.add(_req(0, 2))  # a live id is refused
    for r in (a, b):
        r.seq = Sequence.new(cache)
        r.seq.write.reserve(3)
        r.seq.write.length = 3
        sched.admit(r)
    assert sched.running == [a, b] and not sched.waiting
    assert sched.token_stop(a, 7) == "stop" and sched.token_stop(b, 7) is None  # b ignores end-of-sequence
    assert sched.token_stop(b, 9) == "stop" and sched.token_stop(a, 9) is None
    a.output_ids = [1, 2]
    assert sched.length_stop(a) is None
    a.output_ids.append(3)
    assert sched.length_stop(a) == "length"
    b.output_ids = list(range(9))  # 3 prompt + 9 generated tokens fill the context of 12
    assert sched.length_stop(b) is None
    b.output_ids.append(9)
    assert sched.length_stop(b) == "length"
    b.output_ids = [5]

    # the next decode step: pending tokens from the host; a launched step's tokens on device, unless the
    # request ends by length when that step is read (a has 2 of its 3 tokens, one more in flight)
    a.output_ids, a.pending, b.pending = [1, 2], None, 4
    assert sched.decode_batch({}) == ([b], [4], [-1], [0])
    b.pending = None
    assert sched.decode_batch({id(a): 0, id(b): 1}) == ([b], [0], [1], [1])
    a.output_ids, b.pending = [1], 4
    assert sched.decode_batch({id(a): 3}) == ([a, b], [0, 4], [3, -1], [1, 0])

    used = cache.pool.num_used
    b.output_ids, b.pending = [5, 6], 6
    sched.preempt(b)
    assert b.seq is None and cache.pool.num_used < used and sched.waiting == [b] and sched.running == [a]
    assert b.prefill_ids == b.prompt_ids + [5] and b.prefilled == 0  # 6 is sampled, written on resume
    sched.release(a, "stop")
    assert a.finished and a.seq is None and "r0" not in sched.requests and sched.running == []


def test_one_sampling_type_with_one_max_tokens_default():
    assert SamplingParams is SamplingSpec
    assert SamplingSpec().max_tokens == StrategyConfig().max_tokens == DEFAULT_MAX_TOKENS
    assert StrategyConfig(max_tokens=7).sampling().max_tokens == 7
    s = SamplingSpec(temperature=0.0, stop=["x"])
    assert to_params(s) is s and to_params(s, detokenize=False).detokenize is False and s.detokenize


def test_the_engine_refuses_what_it_cannot_apply(tiny_llama):
    _, model = tiny_llama
    eng = Engine(model, num_blocks=32, block_size=4)
    with pytest.raises(ConfigError, match="does not apply repetition_penalty"):
        eng.add_request("a", [1, 2], SamplingSpec(max_tokens=4, repetition_penalty=1.2))
    with pytest.raises(ConfigError, match="does not apply min_p"):
        eng.fork("a", ["b"], params=SamplingSpec(min_p=0.1))
    eng.close()

"""Native runs stepped in the engine's own loop (`Engine.add_native`): the same tokens as a standalone run,
per-stream outputs, token caps, and an abort that frees the run's KV blocks in the next step."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.native import byte_decode, byte_encode
from ttscale.backends.engine.engine import Engine, SamplingParams
from ttscale.backends.engine.native import (
    HogwildRun,
    HogwildSpec,
    NativeDone,
    NativeOutput,
    ParaThinkerRun,
    ParaThinkerSpec,
    SamplingRow,
)

THINK = [250, 251, 252]
SUMMARY = 254


def _hogwild(steps: int = 10, workers: int = 2, seed: int = 7) -> HogwildSpec:
    return HogwildSpec(
        prompt_ids=byte_encode("Solve: 2+3. "), workers=workers, max_steps=steps,
        others_header=byte_encode("\n[others]\n"), own_header=byte_encode("\n[own]\n"),
        pivot=byte_encode("<...>\n"), step_prefix=[byte_encode(n) for n in ("A: ", "B: ", "C: ")][:workers],
        check_ids=byte_encode("Quick check? "), check_every=4,
        final_ids=byte_encode(" final answer is \\boxed{"), final_tokens=3,
        sampling=SamplingRow(temperature=1.0, top_p=1.0, seed=seed),
    )


def _parathinker(seed: int) -> ParaThinkerSpec:
    return ParaThinkerSpec(prompt_ids=byte_encode("Q: 2+2?"), paths=3, path_starts=[[t] for t in THINK],
                           path_ends=[240, 241, 242], summary_prefix=[SUMMARY], max_think=12, max_summary=4,
                           finish_share=0.6, end_ids=list(range(100, 130)),
                           sampling=SamplingRow(1.0, 1.0, 0, seed), use_segment_ids=False)


def _engine(model) -> Engine:
    return Engine(model, None, num_blocks=256, cuda_graphs=False)


def _drive(eng: Engine, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if not eng.has_work():
            return
        eng.step()
    raise AssertionError("the engine did not finish its work")


def _streams(got: list, n: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for o in got:
        if isinstance(o, NativeOutput):
            out[o.stream] += o.token_ids
    return out


def test_engine_stepped_hogwild_equals_the_standalone_run_beside_ordinary_requests(native_pair):
    """Stepped by the engine, on the engine's cache, interleaved with an ordinary request, a Hogwild run
    writes exactly the tokens of the same run driven alone; stream i carries worker i's kept tokens (worker
    0's followed by the forced final answer); its blocks are all back at the end."""
    _, model = native_pair
    alone = HogwildRun(model, _hogwild(), decode=byte_decode).run()
    eng = _engine(model)
    free0 = eng.cache.pool.num_free
    got: list = []
    eng.add_native("hw", HogwildRun(model, _hogwild(), decode=byte_decode, cache=eng.cache), got.append)
    eng.add_request("plain", byte_encode("hello"), SamplingParams(max_tokens=6, seed=1))
    _drive(eng)
    done = got[-1]
    assert isinstance(done, NativeDone) and done.finish == "done" and done.error is None
    out = done.outcome
    assert out.worker_tokens == alone.worker_tokens and out.final_tokens == alone.final_tokens
    assert _streams(got, 2) == [alone.worker_tokens[0] + alone.final_tokens, alone.worker_tokens[1]]
    assert done.generated == [len(t) for t in _streams(got, 2)] and done.steps == alone.forwards
    assert 0 < done.peak_blocks == alone.peak_blocks
    eng.prefix.clear()
    assert eng.cache.pool.num_free == free0


@pytest.mark.parametrize("kind", ["hogwild", "parathinker"])
def test_abort_frees_the_runs_blocks_in_the_next_step(native_pair, kind):
    _, model = native_pair
    eng = _engine(model)
    free0 = eng.cache.pool.num_free
    got: list = []
    job = (HogwildRun(model, _hogwild(steps=200), decode=byte_decode, cache=eng.cache) if kind == "hogwild"
           else ParaThinkerRun(model, _parathinker(3), cache=eng.cache))
    eng.add_native("r", job, got.append)
    for _ in range(4):
        eng.step()
    assert eng.cache.pool.num_free < free0 and not any(isinstance(o, NativeDone) for o in got)
    eng.abort("r")
    eng.step()
    assert eng.cache.pool.num_free == free0, "one step after the abort every block is back"
    assert isinstance(got[-1], NativeDone) and got[-1].finish == "abort"
    assert not eng.has_work()


@settings(max_examples=8, deadline=None)
@given(cap=st.integers(1, 30), workers=st.integers(1, 3))
def test_a_token_cap_stops_the_run_within_one_step_per_stream(native_pair, cap, workers):
    _, model = native_pair
    eng = _engine(model)
    got: list = []
    eng.add_native("r", HogwildRun(model, _hogwild(steps=100, workers=workers), decode=byte_decode,
                                   cache=eng.cache), got.append, max_generated=cap)
    _drive(eng)
    done = got[-1]
    assert done.finish == "budget"
    assert cap <= sum(done.generated) <= cap + workers - 1
    assert sum(len(t) for t in _streams(got, workers)) == sum(done.generated)


def test_concurrent_parathinker_runs_do_not_interfere(native_pair):
    """Two ParaThinker runs stepped together in one engine write what each writes alone: a run changes
    nothing shared (the model is only read; each run has its own segments)."""
    _, model = native_pair
    alone = [ParaThinkerRun(model, _parathinker(s)).run() for s in (1, 2)]
    eng = _engine(model)
    got: dict[str, list] = {"a": [], "b": []}
    for rid, s in (("a", 1), ("b", 2)):
        eng.add_native(rid, ParaThinkerRun(model, _parathinker(s), cache=eng.cache), got[rid].append)
    _drive(eng)
    for rid, ref in zip("ab", alone, strict=True):
        out = got[rid][-1].outcome
        assert out.path_tokens == ref.path_tokens and out.summary_tokens == ref.summary_tokens
        assert _streams(got[rid], 4) == [*ref.path_tokens, ref.summary_tokens]
    assert alone[0].path_tokens != alone[1].path_tokens, "different seeds: the comparison can fail"


def test_a_failing_run_is_reported_and_the_engine_goes_on(native_pair):
    _, model = native_pair
    eng = _engine(model)
    free0 = eng.cache.pool.num_free
    got: list = []
    spec = _hogwild()
    spec.prompt_ids = [10_000]  # outside the vocabulary of 256
    eng.add_native("bad", HogwildRun(model, spec, cache=eng.cache), got.append)
    eng.add_request("plain", byte_encode("hi"), SamplingParams(max_tokens=3, seed=1))
    _drive(eng)
    assert got[-1].finish == "error" and got[-1].error
    eng.prefix.clear()
    assert eng.cache.pool.num_free == free0

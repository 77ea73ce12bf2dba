"""CUDA only: Hogwild and ParScale decode steps replayed as CUDA graphs give the tokens of the eager path,
and a second run on the same cache replays the captured graphs instead of capturing again."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.native import byte_decode, tiny_hf
from tests.native.test_hogwild import _spec
from ttscale.backends.engine.kv_cache import KVCache
from ttscale.backends.engine.loader import model_from_hf
from ttscale.backends.engine.native import HogwildRun, SamplingRow
from ttscale.backends.engine.parscale_model import load_parscale, write_parscale_checkpoint

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _hogwild(model, graphs: bool, temperature: float, first: HogwildRun | None = None) -> tuple[HogwildRun, list]:
    spec = _spec("combined", workers=3, steps=40)
    spec.sampling = SamplingRow(temperature=temperature, top_p=0.9, seed=5)
    spec.stop_on_boxed = False
    run = HogwildRun(model, spec, decode=byte_decode, is_boundary=lambda t: len(t) >= 7, cuda_graphs=graphs,
                     cache=first.cache if first else None, graphs=first.graphs if first else None)
    return run, run.run().worker_tokens


def test_hogwild_graphs_match_eager_and_are_reused():
    hf = tiny_hf("qwen2", layers=2, seed=4)
    gpu = model_from_hf(hf, dtype="float32", device="cuda")
    _, eager = _hogwild(gpu, False, 1.0)
    run, graphed = _hogwild(gpu, True, 1.0)
    assert run.graphs is not None and run.graphs.captures > 0
    assert graphed == eager
    used = run.cache.pool.num_used
    captures = run.graphs.captures
    _, again = _hogwild(gpu, True, 1.0, first=run)
    assert again == eager
    assert run.graphs.captures == captures, "a second identical run should replay, not capture"
    assert run.cache.pool.num_used == used, "a finished run releases its segments"


def test_hogwild_graphs_greedy_match_cpu():
    hf = tiny_hf("qwen2", layers=2, seed=4)
    _, cpu = _hogwild(model_from_hf(hf, dtype="float32", device="cpu"), False, 0.0)
    _, gpu = _hogwild(model_from_hf(hf, dtype="float32", device="cuda"), True, 0.0)
    assert [t[:12] for t in gpu] == [t[:12] for t in cpu]


def test_parscale_graphs_match_eager(tmp_path):
    hf = tiny_hf("qwen2", layers=2, seed=21)
    pm = load_parscale(write_parscale_checkpoint(tmp_path, hf, n=4, n_tokens=48, seed=4), "float32", "cuda")
    cache = KVCache.for_model(pm.cfg, num_blocks=128)
    runner = pm.graph_runner(cache)
    ids = list(range(3, 40))
    eager = pm.generate(cache, ids, 48, temperature=1.0, top_p=0.9, seed=2)
    graphed = pm.generate(cache, ids, 48, temperature=1.0, top_p=0.9, seed=2, graphs=runner)
    assert graphed["token_ids"] == eager["token_ids"]
    torch.testing.assert_close(torch.tensor(graphed["logprobs"]), torch.tensor(eager["logprobs"]))
    assert runner.captures > 0


def test_engine_stepped_hogwild_with_a_lent_runner_matches_the_standalone_run():
    """In the engine's loop, on the engine's cache, with a graph runner lent by the engine's pool: the tokens
    of the standalone graphed run; the blocks and the runner come back at the end."""
    from ttscale.backends.engine.engine import Engine

    hf = tiny_hf("qwen2", layers=2, seed=4)
    gpu = model_from_hf(hf, dtype="float32", device="cuda")
    _, alone = _hogwild(gpu, True, 1.0)
    eng = Engine(gpu, None, num_blocks=512, fused_kernels=False)
    spec = _spec("combined", workers=3, steps=40)
    spec.sampling = SamplingRow(temperature=1.0, top_p=0.9, seed=5)
    spec.stop_on_boxed = False
    runner = eng.native_runners.take()
    assert runner is not None and runner.cache is eng.cache
    free0 = eng.cache.pool.num_free
    got: list = []
    job = HogwildRun(gpu, spec, decode=byte_decode, is_boundary=lambda t: len(t) >= 7, cache=eng.cache,
                     graphs=runner, on_release=lambda: eng.native_runners.give_back(runner))
    eng.add_native("r", job, got.append)
    while eng.has_work():
        eng.step()
    assert got[-1].finish == "done" and got[-1].outcome.worker_tokens == alone
    assert eng.cache.pool.num_free == free0
    assert eng.native_runners.take() is runner, "the runner went back to the pool"

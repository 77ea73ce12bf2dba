"""CUDA only: CUDA graphs + fused kernels give the same tokens as the eager CPU reference."""

import pytest
import torch

from tests.fixtures.engine import make_tiny
from ttscale.backends.engine import Engine, SamplingParams
from ttscale.backends.engine.loader import model_from_hf

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_graphs_and_kernels_match_cpu(arch):
    hf = make_tiny(arch)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 33, 70)]
    sp = [SamplingParams(temperature=0.0, max_tokens=40, detokenize=False),
          SamplingParams(temperature=0.0, max_tokens=25, detokenize=False),
          SamplingParams(temperature=1.0, top_p=1.0, max_tokens=30, seed=3, detokenize=False)]
    cpu = Engine(model_from_hf(hf, dtype="float32", device="cpu"), num_blocks=256, block_size=16)
    ref = [r.output_ids for r in cpu.generate(prompts, sp)]
    gpu = Engine(model_from_hf(hf, dtype="float32", device="cuda"), num_blocks=256, block_size=16)
    assert gpu.graphs is not None and gpu.model.kernels is not None
    got = [r.output_ids for r in gpu.generate(prompts, sp)]
    assert got[:2] == ref[:2]
    assert got[2][:10] == ref[2][:10]  # sampled: equal while logits agree to float precision
    assert gpu.graphs.captures > 0


def test_a_shape_is_captured_only_when_consecutive_steps_repeat_it():
    """Decode steps whose batch shape differs from the step before run eagerly (a one-step shape is not worth a
    ~50 ms capture); a shape two steps in a row, or at its third step, is captured and replayed from then on.
    The tokens are those of an engine that captures every shape at once."""
    hf = make_tiny("qwen2")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 21, 40, 17)]
    sp = [SamplingParams(temperature=0.0, max_tokens=m, detokenize=False) for m in (3, 30, 31, 12)]
    eng = Engine(model_from_hf(hf, dtype="float32", device="cuda"), num_blocks=256, block_size=16)
    keys: list[tuple] = []
    run = eng.graphs.run

    def recording(meta, st, filtered, n_top):
        keys.append((meta.shape_key(), filtered, n_top))
        return run(meta, st, filtered, n_top)

    eng.graphs.run = recording
    got = [r.output_ids for r in eng.generate(prompts, sp)]
    captured: set[tuple] = set()
    seen: dict[tuple, int] = {}
    eager, last = 0, None
    for k in keys:  # the rule, step by step
        if k not in captured:
            seen[k] = seen.get(k, 0) + 1
            if k == last or seen[k] >= 3:
                captured.add(k)
            else:
                eager += 1
        last = k
    assert set(eng.graphs.graphs) == captured and eng.graphs.captures == len(captured) > 0
    assert eng.graphs.eager_steps == eager
    assert any(keys.count(k) == 1 for k in keys)  # the run had a one-step shape (the last request alone)
    every = Engine(model_from_hf(hf, dtype="float32", device="cuda"), num_blocks=256, block_size=16)
    every.graphs.capture_on_repeat = False
    assert [r.output_ids for r in every.generate(prompts, sp)] == got


def test_bf16_fork_runs_with_graphs():
    hf = make_tiny("qwen2")
    eng = Engine(model_from_hf(hf, dtype="bfloat16", device="cuda"), num_blocks=512, block_size=16)
    eng.add_request("p", list(range(100)),
                    SamplingParams(temperature=1.0, top_p=1.0, max_tokens=30, seed=1, detokenize=False))
    eng.step()
    eng.fork("p", [f"c{i}" for i in range(9)])
    while eng.has_work():
        eng.step()
    assert eng.cache.pool.num_used == 1 + len(eng.prefix.held_blocks())

"""Compiling the Triton kernels before the first step (`Engine.precompile_kernels`).

On CPU: the kinds of step it runs give back every KV block, also when the pool is too small for the larger
ones. On CUDA: after it, real steps (prefill, decode of 1..64 branches sharing a prompt, with and without
top-p) meet no Triton specialisation it has not compiled.
"""

import pytest
import torch

from tests.fixtures.engine import make_tiny
from ttscale.backends.engine import Engine, SamplingParams
from ttscale.backends.engine.loader import model_from_hf
from ttscale.backends.engine.precompile import dry_launches, launch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("num_blocks", [512, 12])
def test_kinds_of_step_give_back_every_block(tiny_llama, num_blocks):
    eng = Engine(tiny_llama[1], num_blocks=num_blocks, block_size=16, cuda_graphs=False)
    free = eng.cache.pool.num_free
    info = eng.precompile_kernels()
    assert eng.cache.pool.num_free == free
    assert info["seconds"] >= 0
    out = eng.generate([list(range(20))], [SamplingParams(temperature=0.0, max_tokens=5, detokenize=False)])
    assert len(out[0].output_ids) == 5


def _jit_functions():
    from ttscale.backends.engine import kernels, sample_kernels

    return {f"{m.__name__}.{n}": f for m in (kernels, sample_kernels) for n, f in vars(m).items()
            if hasattr(f, "device_caches")}


def _compiled(fns) -> dict[str, int]:
    return {name: sum(len(c[0]) for c in f.device_caches.values()) for name, f in fns.items()}


@cuda
@pytest.mark.cuda
def test_dry_launch_compiles_and_does_not_run():
    from ttscale.backends.engine import kernels

    gu = torch.randn(3, 2 * 1000, device="cuda")
    y = torch.full((3, 1000), 7.0, device="cuda")
    with dry_launches():
        launch(kernels._silu_mul, (3, 1), gu, y, 1000, BLOCK=1024)
    torch.cuda.synchronize()
    assert bool((y == 7.0).all())
    assert _compiled({"silu": kernels._silu_mul})["silu"] >= 1
    launch(kernels._silu_mul, (3, 1), gu, y, 1000, BLOCK=1024)
    g, u = gu.chunk(2, -1)
    torch.testing.assert_close(y, torch.nn.functional.silu(g) * u)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("arch,dtype", [("qwen2", "bfloat16"), ("llama", "float32")])
def test_steps_after_precompile_compile_nothing(arch, dtype):
    fns = _jit_functions()
    eng = Engine(model_from_hf(make_tiny(arch), dtype=dtype, device="cuda"), num_blocks=2048, block_size=16)
    assert eng.kernel_compiles is not None
    before = _compiled(fns)
    prompt = list(range(3, 90))
    for n, top_p in ((1, 1.0), (8, 0.95), (64, 0.9), (3, 1.0)):
        eng.add_request(f"p{n}", prompt, SamplingParams(temperature=0.8, top_p=top_p, max_tokens=40, seed=n,
                                                        detokenize=False))
        eng.step()
        if n > 1:
            eng.fork(f"p{n}", [f"p{n}-{i}" for i in range(n - 1)])
        while eng.has_work():
            eng.step()
    assert _compiled(fns) == before

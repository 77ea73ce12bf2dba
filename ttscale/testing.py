"""Helpers for tests: tiny random-weight checkpoints built offline from a transformers config.

Tests about behaviour (streaming, abort, prefix caching, scoring, exactness of our engine) need a real
model that vLLM, `transformers` and our engine all load, but not a good one. A 2-layer, 64-wide model
with the SmolLM2 tokenizer loads in a second, runs fast on 2 CPU cores, and still has a real chat
template and vocabulary.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from ttscale.errors import ConfigError
from ttscale.models import atomic_build, default_tokenizer_dir

Arch = Literal["llama", "qwen2", "qwen3"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# head_dim 32: the smallest head size vLLM's CPU attention backend supports.
_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,
}

_ARCH = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files (and chat template) of a model folder."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def _write_tiny(out: Path, arch: Arch, seed: int, overrides: dict[str, Any], tokenizer_dir: Path) -> None:
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    copy_tokenizer(tokenizer_dir, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    cfg_cls_name, model_cls_name = _ARCH[arch]
    params = dict(_BASE)
    params.update(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    params.update(overrides)
    config = getattr(transformers, cfg_cls_name)(**params)
    config.architectures = [model_cls_name]
    gen = torch.Generator().manual_seed(seed)
    model = getattr(transformers, model_cls_name)(config).to(torch.float32)
    # Fill every tensor from our own generator so the weights depend only on `seed`, not on how
    # transformers' initialisers consume the global RNG in this version.
    std = float(params["initializer_range"])
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(
        bos_token_id=params["bos_token_id"], eos_token_id=params["eos_token_id"],
        pad_token_id=params["pad_token_id"],
    ).save_pretrained(str(out))


def build_tiny_model(
    path: str | Path,
    arch: Arch = "llama",
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random-weight model folder at `path` (config + safetensors + SmolLM2 tokenizer).

    Deterministic under `seed`: the same arguments give byte-identical weights. `overrides` replace
    config fields (e.g. `num_hidden_layers=4`, `max_position_embeddings=256`). Returns the folder;
    an already complete folder is reused (the build is atomic and locked, so parallel callers agree).
    """
    if arch not in _ARCH:
        raise ConfigError(f"unknown tiny-model arch {arch!r}; known: {', '.join(sorted(_ARCH))}")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else default_tokenizer_dir()
    target = Path(path)
    return atomic_build(target, lambda tmp: _write_tiny(tmp, arch, seed, overrides, tok_dir))

"""Our PyTorch inference engine: paged KV in shared segments, fork/abort, continuous batching.

Low-level API (for strategies that lay out KV themselves, see API.md): `KVCache`, `Segment`, `View`,
`Sequence`, `ForwardItem`, `Model.forward`. High-level: `Engine` (requests, steps) and `EngineBackend`
(the Backend protocol). Importing this package does not import torch-heavy modules until used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BlockPool": "kv_cache", "KVCache": "kv_cache", "Segment": "kv_cache", "View": "kv_cache",
    "Sequence": "kv_cache", "OutOfKVBlocks": "kv_cache",
    "Model": "model", "ModelConfig": "model", "ForwardItem": "model",
    "load_model": "loader", "model_from_hf": "loader", "load_tokenizer": "loader",
    "Engine": "engine", "SamplingParams": "engine", "RequestOutput": "engine",
    "EngineBackend": "backend", "EngineConfig": "backend",
}

if TYPE_CHECKING:  # pragma: no cover
    from ttscale.backends.engine.backend import EngineBackend, EngineConfig
    from ttscale.backends.engine.engine import Engine, RequestOutput, SamplingParams
    from ttscale.backends.engine.kv_cache import (
        BlockPool,
        KVCache,
        OutOfKVBlocks,
        Segment,
        Sequence,
        View,
    )
    from ttscale.backends.engine.loader import load_model, load_tokenizer, model_from_hf
    from ttscale.backends.engine.model import ForwardItem, Model, ModelConfig

__all__ = [
    "BlockPool", "Engine", "EngineBackend", "EngineConfig", "ForwardItem", "KVCache", "Model", "ModelConfig",
    "OutOfKVBlocks", "RequestOutput", "SamplingParams", "Segment", "Sequence", "View", "load_model",
    "load_tokenizer", "model_from_hf",
]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'ttscale.backends.engine' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"ttscale.backends.engine.{mod}"), name)

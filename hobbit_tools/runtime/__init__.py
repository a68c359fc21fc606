"""The bundled runtime: reads prepared shards and generates, experts behind a backend."""

from __future__ import annotations

from pathlib import Path

import torch

from .generate import Chunk, Generation, Runtime, SamplingParams
from .loader import ModelFiles, build_model, compute_dtype, load_resident_experts, tokenizer

__all__ = ["Chunk", "Generation", "Runtime", "SamplingParams", "load"]


def load(
    model_dir: str | Path,
    *,
    precision: str = "high",
    dtype: str | torch.dtype | None = None,
    max_context: int | None = None,
) -> Runtime:
    """Load a prepared model dir. precision: which expert shard ("high" or "low");
    dtype: compute dtype (default: the dense shard's); max_context: KV cache length
    (default: the model's, at most 4096)."""
    files = ModelFiles(model_dir)
    dt = compute_dtype(files, dtype)
    backend = load_resident_experts(files, precision, dt)
    model = build_model(files, backend, dt, max_context)
    info = {
        "model_dir": str(files.dir),
        "family": files.config.family,
        "precision": precision,
        "expert_type": files.manifest["types"][precision],
        "dtype": str(dt).removeprefix("torch."),
        "context": model.cache.max_len,
        "resident_expert_bytes": backend.nbytes,
    }
    return Runtime(model, tokenizer(files), info)

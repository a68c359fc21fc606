"""The bundled runtime: reads prepared shards and generates, experts behind a backend."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import HobbitError
from .budget import parse_memory
from .generate import Chunk, Generation, Runtime, SamplingParams
from .loader import ModelFiles, build_model, compute_dtype, load_resident_experts, tokenizer

__all__ = ["Chunk", "Generation", "Runtime", "SamplingParams", "load"]


def load(
    model_dir: str | Path,
    *,
    precision: str = "high",
    memory: int | str | None = None,
    policy: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_context: int | None = None,
    io_threads: int = 2,
    direct_io: bool = True,
) -> Runtime:
    """Load a prepared model dir.

    precision: which expert shard ("high" or "low").
    memory: expert cache budget: bytes, "1.5GiB", or a share of the high-precision expert
        bytes ("30%"). Given, experts are offloaded: read from the shards on demand.
    policy: "resident" (all experts loaded up front; the default without `memory`),
        "lru" (the default with it), "lfu", or "ondemand" (no cache).
    dtype: compute dtype (default: the dense shard's). max_context: KV cache length
    (default: the model's, at most 4096). direct_io: O_DIRECT reads (default).
    """
    files = ModelFiles(model_dir)
    dt = compute_dtype(files, dtype)
    policy = policy or ("lru" if memory is not None else "resident")
    if policy == "resident":
        backend = load_resident_experts(files, precision, dt)
        cache_bytes = backend.nbytes
    else:
        from .cache import OffloadedExperts
        from .policies import make_policy
        from .store import ExpertStore

        pol = make_policy(policy)
        store = ExpertStore(files, [precision], dt, direct=direct_io)
        top_k = files.config.top_k
        if memory is None and pol.keep:
            raise HobbitError(
                f"policy {policy} caches experts: give a memory budget (e.g. memory='30%')"
            )
        slot = store.p[precision].slot_bytes
        budget = (
            parse_memory(memory, files.manifest["expert_shard_bytes"]["high"])
            if memory
            else top_k * slot
        )
        backend = OffloadedExperts(
            store, precision, budget, pol, min_slots=top_k, io_threads=io_threads
        )
        cache_bytes = backend.arena.nbytes
    model = build_model(files, backend, dt, max_context)
    info = {
        "model_dir": str(files.dir),
        "family": files.config.family,
        "precision": precision,
        "policy": policy,
        "expert_type": files.manifest["types"][precision],
        "dtype": str(dt).removeprefix("torch."),
        "context": model.cache.max_len,
        "cache_bytes": cache_bytes,
        "dense_bytes": model.dense_bytes,
        "kv_bytes": model.cache.nbytes,
        "expert_shard_bytes": files.manifest["expert_shard_bytes"][precision],
    }
    return Runtime(model, tokenizer(files), info)

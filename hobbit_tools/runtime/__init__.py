"""The bundled runtime: reads prepared shards and generates, experts behind a backend."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .. import validate
from ..errors import HobbitError
from . import ggml, prefill
from .budget import return_large_blocks
from .generate import Chunk, Generation, Runtime, SamplingParams
from .io import READS_PER_THREAD
from .loader import (
    ModelFiles,
    build_model,
    compute_dtype,
    context_length,
    context_source,
    tokenizer,
)
from .policies import CLIFF_POLICY
from .strategy import (
    STRATEGIES,
    Strategy,
    build_backend,
    default_memory,
    default_policy,
    full_cache_bytes,
    strategy,
)

__all__ = ["Chunk", "Generation", "Runtime", "SamplingParams", "STRATEGIES", "Strategy", "load"]


return_large_blocks()


def load(
    model_dir: str | Path,
    *,
    precision: str = "high",
    memory: int | str | None = None,
    policy: str | Strategy | None = None,
    dynamic_precision: bool | None = None,
    prefetch_depth: int | None = None,
    cache_policy: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_context: int | None = None,
    tokens: int | None = None,
    io_threads: int = 2,
    config: str | Path | bool | None = None,
    packs: bool = True,
    kernels: str | dict[str, str] | None = None,
    threads: int | None = None,
    warm_up: bool = True,
) -> Runtime:
    """Load a prepared model dir.

    precision: which expert shard serves when dynamic precision is off ("high" or "low").
    memory: expert cache budget: bytes, "1.5GiB", or a share ("30%") of what all experts
        take in memory at high precision. Given, experts are offloaded: read on demand. By
        default, what this process may use (the smaller of MemAvailable and its cgroup's
        limit) less dense, KV and a floor (budget.py); `info["memory_source"]` says so.
    policy: "resident" (all experts loaded up front; the default when no budget is given
        and they fit in the default one), "lru" (the default otherwise), "lfu", "ondemand" (no cache), "lru+prefetch", or "hobbit"
        (dynamic precision + adaptive prefetch + multidimensional cache). Switches override
        one part of it: dynamic_precision, prefetch_depth (0 = off), cache_policy
        ("lru", "lfu", "hobbit", "lcu").
    dtype: compute dtype (default: the dense shard's). max_context: KV cache length
    (default: the model's, at most 4096). tokens: what this run will hold at most (prompt
    and new tokens; `hobbit run` knows): the KV cache and the default budget's share for it
    are sized to that, not to max_context.
    config: the tuned config from `hobbit profile` (default: the one next to the shards, if
        any, used when no policy is given; False: none). It sets the strategy and, unless
        `memory` is given, the budget.
    packs: read experts from the slot packs where current (False: always convert from the
        shards after the read; for comparisons). Used by the torch kernels only.
    kernels: which compute path serves the quantized expert types: "ggml" (on the GGUF
        bytes in place, rewritten in ggml's interleaved layout where it has one for the
        type), "ggml-plain" (the same without that rewrite: cheaper per miss, slower per
        use), "torch" (converted after the read, or from a slot pack), or a dict
        {type: path}; default: the tuned config's measured choice, else ggml where it loads.
    threads: compute threads of ggml's kernels (process-wide; default: the CPUs this process
        may use that nothing else keeps busy, looked at once). torch gets one thread unless
        it computes experts (then as many): decode's attention and norms are too small to
        share out, and a second torch thread cost the demo 2.7x of its decode speed.
    warm_up: run a short prompt and a decode step through a resident model before
        returning, then forget them (`_warm_up`), so the first prompt is not the one that
        pays for first calls; as llama.cpp does at load. Offloaded models skip it (it would
        fill their cache with a made-up prompt's experts).
    """
    from .generate import rss_bytes

    if threads:
        ggml.set_threads(threads)

    floor = rss_bytes()  # the interpreter, torch and hobbit, before the model
    files = ModelFiles(model_dir)
    dt = compute_dtype(files, dtype)
    if tokens:
        validate.max_context(max_context, files.config.max_context, context_source(files))
        max_context = min(context_length(files, max_context), max(int(tokens), 1))
    # below one token's working set lru never hits: unless told, use a policy that does
    below_cliff = CLIFF_POLICY if policy is None and cache_policy is None else None
    tuned = None
    if policy is None and config is not False:
        tuned = _tuned_config(files, config)
        if tuned is not None:
            from ..profile.config import strategy_from

            policy = dataclasses.replace(
                strategy_from(tuned),
                **{
                    k: v
                    for k, v in {
                        "dynamic_precision": dynamic_precision,
                        "prefetch_depth": prefetch_depth,
                        "cache": cache_policy,
                    }.items()
                    if v is not None
                },
            )
            if memory is None:  # the tuned budget, unless less memory is free now
                now = default_memory(files, dt, max_context, packs)
                default_policy(now)  # refuses when not even the dense part fits
                memory = min(tuned["runtime"]["memory"], now.budget)
    auto = None
    if memory is None and _caches(policy):
        auto = default_memory(files, dt, max_context, packs)
        chosen = default_policy(auto)  # refuses when not even the dense part fits
        policy = policy or chosen
        if policy != "resident":
            memory = auto.budget
    if not isinstance(policy, Strategy):
        policy = strategy(
            policy or ("lru" if memory is not None else "resident"),
            dynamic_precision=dynamic_precision,
            prefetch_depth=prefetch_depth,
            cache=cache_policy,
        )
    validate.strategy(
        policy, files.config, where=f"tuned config {tuned['path']}: " if tuned else ""
    )
    model = build_model(files, None, dt, max_context)
    if isinstance(kernels, str):
        kernels = dict.fromkeys(files.manifest["types"].values(), kernels)
    if kernels is None and tuned is not None:
        kernels = tuned.get("runtime", {}).get("kernels")
    prefill.set_route((tuned or {}).get("runtime", {}).get("prefill_route"))
    backend = build_backend(
        files,
        policy,
        precision,
        memory,
        dt,
        model,
        io_threads,
        packs,
        kernels or {},
        below_cliff=below_cliff,
    )
    model.experts = backend
    torch.set_num_threads(ggml.threads() if "torch" in _kernels(backend).values() else 1)
    prefill.warm(_route_shapes(model))
    warm_s = _warm_up(model) if warm_up and policy.cache == "resident" else 0.0
    cache_bytes = backend.stats().get("cache_bytes", getattr(backend, "nbytes", 0))
    dense_bytes = model.dense_bytes
    info = {
        "model_dir": str(files.dir),
        "family": files.config.family,
        "policy": policy.name,
        "strategy": {
            **{k: v for k, v in vars(policy).items() if not isinstance(v, torch.Tensor)},
            **({"cache": backend.policy.name} if hasattr(backend, "policy") else {}),
        },
        "cliff": getattr(backend, "cliff", None),
        "precision": "high+low" if policy.dynamic_precision else precision,
        "expert_type": "+".join(
            files.manifest["types"][p]
            for p in (["high", "low"] if policy.dynamic_precision else [precision])
        ),
        "dtype": str(dt).removeprefix("torch."),
        "context": model.cache.max_len,
        "cache_bytes": cache_bytes,
        "dense_bytes": dense_bytes,
        "kv_bytes": model.cache.nbytes,
        # what the process holds, by part (KV as allocated now: it grows with the context)
        "memory": {
            "runtime": floor,
            "dense": dense_bytes,
            "kv": model.cache.nbytes,
            "expert_cache": cache_bytes,
            "staging": _staging_bytes(backend, io_threads),
        },
        "expert_shard_bytes": files.manifest["expert_shard_bytes"]["high"],
        "full_cache_bytes": full_cache_bytes(
            files,
            backend.store.p["high"].slot_bytes
            if hasattr(backend, "store")
            else backend.arena.slot_bytes,
        ),
        "config": tuned["path"] if tuned else None,
        # set when no budget was given: how the default one was found
        "memory_source": auto.describe() if auto else None,
        "memory_available": auto.available.bytes if auto else None,
        # per quantized expert precision in use: whether loads read a slot pack (no
        # conversion after the read)
        "packed": _packed(backend),
        # per expert precision: which kernels compute it ("ggml" on the GGUF bytes, "torch")
        "kernels": _kernels(backend),
        # how offloaded loads reach the disk (batched direct reads, or reader threads)
        "io": getattr(backend, "io", None),
        "threads": {"ggml": ggml.threads(), "torch": torch.get_num_threads()},
        # GGUF types whose many-token matmuls take torch's bf16 GEMM, from how many tokens
        "prefill_route": dict(prefill.ROUTE),
        "warm_up_s": warm_s,
    }
    return Runtime(model, tokenizer(files), info)


# tokens of the warm-up prompt: enough for the many-token kernels and their scratch
WARM_UP_TOKENS = 32


def _warm_up(model) -> float:
    """A short prompt and one decode step through the model, then forgotten (KV cache and
    expert state reset): the first call of every graph, kernel and scratch buffer (code
    pages faulted in, ggml's thread pool started, buffers first touched) happens here, at
    load, not in the user's first prompt. Returns the seconds it took."""
    t0 = time.perf_counter()
    n = min(WARM_UP_TOKENS, model.cache.max_len - 1)
    if n >= 1:
        tokens = torch.zeros(n, dtype=torch.long)
        model.forward(tokens)
        model.forward(tokens[:1])
    model.reset()
    return time.perf_counter() - t0


def _route_shapes(model) -> list[tuple[int, int]]:
    """(out, in) of the matrices a prefill may send through `prefill`'s route: the experts'
    and the dense ones held as GGUF bytes."""
    c = model.cfg
    shapes = [(c.expert_ffn, c.hidden_size), (c.hidden_size, c.expert_ffn)]
    for lw in model.w.layers:
        for w in (lw.wq, lw.wk, lw.wv, lw.wo):
            if isinstance(w, ggml.Linear):
                shapes.append(w.shape)
    return shapes


def _staging_bytes(backend, io_threads: int) -> int:
    """Staging buffers of the torch kernels' loads, one per read in flight (ggml's loads read
    into the slot), and the scratch of ggml's repacking, one per reading thread."""
    store = getattr(backend, "store", None)
    if store is None:
        return 0
    torch_loads = [p.staging_bytes for p in store.p.values() if p.kernel == "torch" and not p.pack]
    repack = (io_threads + 1) * store.repack_scratch_bytes()  # + the model's thread
    return READS_PER_THREAD * io_threads * max(torch_loads, default=0) + repack


def _caches(policy: str | Strategy | None) -> bool:
    """Whether `policy` (None: the default) needs an expert budget or may load them all."""
    cache = policy.cache if isinstance(policy, Strategy) else policy
    return cache not in ("resident", "ondemand")


def _kernels(backend) -> dict[str, str]:
    store = getattr(backend, "store", None)
    if store is None:
        return getattr(backend, "kernels", {})  # resident: its store is closed
    return {n: p.path for n, p in store.p.items()}


def _packed(backend) -> dict[str, bool]:
    from .pack import UNPACKED_TYPES

    store = getattr(backend, "store", None)
    if store is None:
        return {}
    return {
        n: p.pack is not None
        for n, p in store.p.items()
        if p.qtype not in UNPACKED_TYPES and p.kernel == "torch"
    }


def _tuned_config(files: ModelFiles, config: str | Path | bool | None) -> dict | None:
    from ..profile.config import config_path, read_config
    from ..profile.device import fingerprint

    path = Path(config) if isinstance(config, str | Path) else config_path(files.dir)
    if not path.is_file():
        if config is not None:
            raise HobbitError(f"tuned config {path} does not exist; make one with `hobbit profile`")
        return None
    cfg = read_config(path, files.dir, fingerprint(files.dir))
    cfg["path"] = str(path)
    return cfg

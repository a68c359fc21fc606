"""Named offloading strategies (the baselines and HOBBIT) and building their backend.

A strategy is data: which cache policy, whether dynamic precision and prefetch are on. The
named ones are the comparisons of `hobbit bench`; every switch can be overridden alone, for
ablations (`hobbit` minus one technique).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import validate
from ..errors import BudgetBelowMinimum, HobbitError
from .budget import Available, DefaultBudget, default_budget, parse_memory
from .loader import ModelFiles, context_length, dense_bytes, kv_bytes, load_resident_experts
from .offload import OffloadedExperts, OffloadOptions, RouterView
from .policies import cliff, make_policy
from .precision import PrecisionRule
from .store import ExpertStore


@dataclass(frozen=True)
class Strategy:
    name: str
    cache: str = "lru"  # resident | ondemand | lru | lfu | hobbit | lcu
    dynamic_precision: bool = False
    prefetch_depth: int = 0
    low_share: float = 0.25  # of the budget, for low-precision copies (dynamic precision only)
    t1: float | torch.Tensor = 0.6
    t2: float | torch.Tensor = 0.9
    skip: str = "drop"
    cache_weights: tuple[float, ...] | None = None


STRATEGIES = {
    s.name: s
    for s in [
        Strategy("resident", cache="resident"),
        Strategy("ondemand", cache="ondemand"),
        Strategy("lru"),
        Strategy("lfu", cache="lfu"),
        Strategy("lru+prefetch", prefetch_depth=2),
        Strategy("hobbit", cache="hobbit", dynamic_precision=True, prefetch_depth=2),
    ]
}


def strategy(name: str, **overrides) -> Strategy:
    if name not in STRATEGIES:
        raise HobbitError(f"unknown policy {name!r} (choose from {', '.join(STRATEGIES)})")
    return dataclasses.replace(
        STRATEGIES[name], **{k: v for k, v in overrides.items() if v is not None}
    )


def build_backend(
    files: ModelFiles,
    s: Strategy,
    precision: str,
    memory,
    dtype,
    model,
    io_threads=2,
    packs=True,
    kernels: dict[str, str] | None = None,
    below_cliff: str | None = None,
):
    """The ExpertBackend for strategy `s`; `model` supplies the routers for prefetching.
    below_cliff: the cache policy to use instead of lru when the budget holds less than one
    token's working set (`policies.cliff`), where lru never hits; the backend's `cliff`
    says so either way (None above the cliff)."""
    if s.cache == "resident":
        return load_resident_experts(files, precision, dtype, packs, kernels)
    cfg = files.config
    precisions = [precision]
    if s.dynamic_precision:
        if "low" not in files.precisions:
            raise HobbitError(
                f"policy {s.name} loads unimportant experts in low precision, but {files.dir} has "
                "no low-precision shard: prepare with --low TYPE, or pass --no-dynamic-precision"
            )
        precisions = ["high", "low"]
    store = ExpertStore(
        files, sorted(set(precisions) | {"high"}), dtype, packs=packs, kernels=kernels
    )
    slot = {p: store.p[p].slot_bytes for p in precisions}
    need = working_minimum(cfg.top_k, slot)  # per cache, keyed like `budgets` below
    if memory is None:
        if s.cache != "ondemand":
            store.close()
            raise HobbitError(
                f"policy {s.name} caches experts: give a memory budget, e.g. --memory 30%"
            )
        budget = max(need.values())
    else:
        full = full_cache_bytes(files, store.p["high"].slot_bytes)
        try:
            budget = validate.memory_budget(parse_memory(memory, full), memory, full)
        except HobbitError:
            store.close()
            raise
    if s.dynamic_precision:
        # the low share, moved as far as needed for each cache to hold one layer's top-k
        low = max(int(budget * s.low_share), need["low"])
        budgets = {"low": min(low, max(budget - need["high"], need["low"]))}
        budgets["high"] = budget - budgets["low"]
    else:
        budgets = {precision: budget}
    if any(budgets[p] < need[p] for p in budgets):
        store.close()
        minimum = sum(need.values())
        raise BudgetBelowMinimum(
            f"a memory budget of {budget:,} bytes is below this model's working minimum, "
            f"which needs at least {cfg.top_k} (one layer's top-k) experts per cache = {minimum:,} bytes",
            minimum,
        )
    low_over_high = (
        (store.p["low"].load_bytes / store.p["high"].load_bytes) if "low" in store.p else 1.0
    )
    warning = cliff(sum(cfg.moe_layers), cfg.top_k, sum(budgets[p] // slot[p] for p in budgets))
    cache = s.cache
    if warning and below_cliff and cache == "lru":
        cache = below_cliff
        warning += f"; using {cache} instead of lru"
    policy = make_policy(
        cache,
        num_layers=cfg.num_layers,
        low_over_high=low_over_high,
        weights=s.cache_weights,
    )
    options = OffloadOptions(
        rule=PrecisionRule(s.t1, s.t2) if s.dynamic_precision else None,
        skip=s.skip,
        prefetch_depth=s.prefetch_depth,
        io_threads=io_threads,
    )
    routers = {i: model.w.layers[i].router for i, m in enumerate(cfg.moe_layers) if m}
    router = RouterView(routers, model.select) if s.prefetch_depth else None
    backend = OffloadedExperts(store, budgets, policy, options, router)
    backend.cliff = warning
    return backend


def working_minimum(top_k: int, slot_bytes: dict[str, int]) -> dict[str, int]:
    """The least each precision's cache works with: one layer's top-k experts in it (a
    budget below this cannot hold what a single layer computes)."""
    return {p: top_k * b for p, b in slot_bytes.items()}


def full_cache_bytes(files: ModelFiles, high_slot_bytes: int) -> int:
    """What every expert takes held at high precision, ready for the kernel: the base of a
    percentage budget ("30%" = room for 30% of the experts at high precision)."""
    cfg = files.config
    return sum(cfg.moe_layers) * cfg.num_experts * high_slot_bytes


def default_memory(
    files: ModelFiles,
    dtype: torch.dtype,
    max_context: int | None,
    packs: bool = True,
    available: Available | None = None,
) -> DefaultBudget:
    """The expert budget when none is given, from what this process may use (budget.py),
    computed before the dense weights or any expert is loaded."""
    store = ExpertStore(files, ["high"], dtype, packs=packs)
    experts = full_cache_bytes(files, store.p["high"].slot_bytes)
    store.close()
    ctx = context_length(files, max_context)
    return default_budget(
        experts, dense_bytes(files, dtype), kv_bytes(files, ctx, dtype), available
    )


def default_policy(auto: DefaultBudget) -> str:
    """Without a profile or a budget: every expert loaded when they fit, else offloaded
    (lru: no thresholds are fitted without a profile)."""
    if auto.budget <= 0:
        raise HobbitError(
            f"this model does not fit here: {auto.describe()}; free memory or raise the "
            "process's memory limit"
        )
    return "resident" if auto.fits else "lru"

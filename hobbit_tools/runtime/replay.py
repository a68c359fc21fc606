"""Routing traces: write them from a run, replay them for any policy and budget, no model.

A trace is JSON lines: a header (model shape, bytes per expert and per slot and precision),
then one record per MoE layer call: the token, the layer, every token's selected experts and
weights, what the runtime did, and (with prefetch) the experts predicted for later layers.
Replay re-derives the precision levels from the weights with any thresholds, runs a
simulated cache with the real policies and the real serving rule, and reports hits, bytes
read, miss penalty (a high miss costs 1, a low miss B_low/B_high) and prefetch recall.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import HobbitError
from .budget import parse_memory
from .policies import Policy, make_policy
from .precision import HIGH, LOW, SKIP, PrecisionRule, serve_from, unimportance


def write_trace(path: str | Path, header: dict, records: list[dict]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def read_trace(path: str | Path) -> tuple[dict, list[dict]]:
    try:
        lines = Path(path).read_bytes().decode("utf-8").splitlines()
        header = json.loads(lines[0])
        records = [json.loads(line) for line in lines[1:] if line.strip()]
    except (OSError, IndexError, ValueError) as e:  # ValueError: bad JSON or UTF-8
        raise HobbitError(
            f"{path} is not a readable trace ({e}); record one with `hobbit run --trace`"
        ) from e
    if not isinstance(header, dict) or header.get("kind") != "hobbit-trace":
        raise HobbitError(f"{path} is not a hobbit trace (no hobbit-trace header)")
    return header, records


def replay(
    header: dict,
    records: list[dict],
    *,
    memory: int | str,
    cache_policy: str = "lru",
    rule: PrecisionRule | None = None,
    low_share: float = 0.25,
    cache_weights: tuple[float, ...] | None = None,
) -> dict:
    """Simulate the cache over a trace. rule None: every expert at high precision."""
    expert_bytes, slot_bytes = header["expert_bytes"], header["slot_bytes"]
    moe_layers = header.get("moe_layers", header["num_layers"])
    budget = parse_memory(memory, slot_bytes["high"] * header["num_experts"] * moe_layers)
    if rule is not None and "low" not in slot_bytes:
        raise HobbitError(
            "this trace has no low-precision shard sizes; it was recorded without one"
        )
    if rule is None:
        slots = {"high": budget // slot_bytes["high"]}
    else:
        low = int(budget * low_share)
        slots = {"high": (budget - low) // slot_bytes["high"], "low": low // slot_bytes["low"]}
    ratio = expert_bytes.get("low", expert_bytes["high"]) / expert_bytes["high"]
    policy = make_policy(cache_policy, header["num_layers"], ratio, cache_weights)
    sim = SimulatedCache(slots, policy)
    out = {"hits": 0, "misses": 0, "bytes_read": 0, "miss_penalty": 0.0}
    served = {"high": 0, "low": 0, "skip": 0}
    recall = RecallCounter()
    for tick, r in enumerate(records, start=1):
        ids = torch.tensor(r["ids"])
        weights = torch.tensor(r["weights"])
        layer, token = r["layer"], r["token"]
        if r["tokens"] == 1:
            recall.settle(layer, set(r["ids"][0]))
            recall.predict(layer, r.get("predicted") or {})
        if rule is None:
            level, top1 = torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool)
        else:
            level, top1 = rule.levels(layer, ids, weights), unimportance(weights) == 0
        hits, misses = [], []
        for e in sorted(set(ids.flatten().tolist())):
            mask = ids == e
            lv = level[mask]
            keep = lv != SKIP
            served["skip"] += int((~keep).sum())
            if not keep.any():
                continue
            want = HIGH if bool((lv[keep] == HIGH).any()) else LOW
            has_top1 = bool(top1[mask][keep].any())
            choice = serve_from(
                sim.has((layer, e, "high")), sim.has((layer, e, "low")), want, has_top1
            )
            n = int(keep.sum())
            if choice is not None:
                hits.append((layer, e, choice))
                served[choice] += n
            else:
                precision = "high" if want == HIGH else "low"
                misses.append((layer, e, precision))
                served[precision] += n
        # as the backend: hits are pinned and touched first, then each miss takes a slot
        for key in hits:
            policy.touch(key, tick, token)
        pinned = set(hits)
        for key in misses:
            sim.insert(key, pinned, layer)
            pinned.add(key)
            policy.touch(key, tick, token)
            out["bytes_read"] += expert_bytes[key[2]]
            out["miss_penalty"] += 1.0 if key[2] == "high" else ratio
        out["hits"] += len(hits)
        out["misses"] += len(misses)
    total = out["hits"] + out["misses"]
    return {
        **out,
        "hit_rate": out["hits"] / total if total else 1.0,
        "share": {k: v / max(sum(served.values()), 1) for k, v in served.items()},
        "prefetch_recall": recall.result(),
        "slots": slots,
        "cache_policy": cache_policy,
    }


def replay_ids(trace: list[tuple[int, list[int]]], policy: Policy, slots: int) -> dict:
    """The bare cache on a plain trace [(layer, [experts...]), ...], one entry per MoE layer
    call, all at high precision: hits and misses. For testing policies by hand."""
    sim = SimulatedCache({"high": slots}, policy)
    hits = misses = 0
    for tick, (layer, experts) in enumerate(trace, start=1):
        keys = [(layer, e, "high") for e in dict.fromkeys(experts)]
        for key in keys:
            policy.touch(key, tick, tick)
        for key in keys:
            if sim.has(key):
                hits += 1
            else:
                misses += 1
                sim.insert(key, set(keys), layer)
    return {"hits": hits, "misses": misses}


class SimulatedCache:
    """Slots per precision, no bytes: the same eviction decisions the real cache makes."""

    def __init__(self, slots: dict[str, int], policy: Policy):
        self.slots = slots
        self.policy = policy
        self.keys: dict[str, set] = {p: set() for p in slots}

    def has(self, key) -> bool:
        return key[2] in self.keys and key in self.keys[key[2]]

    def insert(self, key, pinned: set, layer: int) -> None:
        if not self.policy.keep:
            return
        keys = self.keys[key[2]]
        if len(keys) >= self.slots[key[2]]:
            evictable = [k for k in keys if k not in pinned]
            if not evictable:
                return  # served from a slot freed right after use
            keys.discard(self.policy.victim(evictable, layer))
        keys.add(key)


class RecallCounter:
    """Share of each layer's actually selected experts that were predicted d layers ahead."""

    def __init__(self):
        self.pending: dict[tuple[int, int], set[int]] = {}
        self.counts: dict[int, list[int]] = {}

    def predict(self, layer: int, predicted: dict) -> None:
        for depth, (target, ids) in enumerate(sorted((int(t), v) for t, v in predicted.items()), 1):
            self.pending[(target, depth)] = set(ids)

    def settle(self, layer: int, actual: set[int]) -> None:
        for target, depth in [k for k in self.pending if k[0] == layer]:
            c = self.counts.setdefault(depth, [0, 0])
            c[0] += len(self.pending.pop((target, depth)) & actual)
            c[1] += len(actual)

    def result(self) -> dict[int, float]:
        return {d: p / a for d, (p, a) in sorted(self.counts.items()) if a}

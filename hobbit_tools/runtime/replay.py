"""Routing traces: write them from a run, replay them for any policy and budget, no model.

A trace is JSON lines: a header (model shape, bytes per expert and per slot and precision),
then one record per MoE layer call: the token, the layer, every token's selected experts and
weights, what the runtime did, and (with prefetch) the experts predicted for later layers.
`read_trace` also reads other engines' CSV routing traces (`csv_trace.py`).

Replay re-derives the precision levels from the weights with any thresholds (as the runtime
does), runs a simulated cache with the real policies and the real serving rule, and reports
hits, bytes read, miss penalty (a high miss costs 1, a low miss B_low/B_high) and prefetch
recall. The cache holds bytes per precision (the budget), each key taking its layer's size:
with one size for all layers, as in a hobbit model, that is the runtime's slot count.
With `split` F, only the part of the trace after the first F of its tokens is scored (the
cache runs over all of it), so a policy fitted on the part before is judged on unseen data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import HobbitError
from .budget import parse_memory
from .policies import PRECISIONS, Belady, Policy, cliff, make_policy
from .precision import HIGH, LOW, SKIP, PrecisionRule, serve_from


def write_trace(path: str | Path, header: dict, records: list[dict]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def read_trace(path: str | Path, **csv_options) -> tuple[dict, list[dict]]:
    """A trace from `hobbit run --trace` (JSON lines) or a CSV routing trace (told apart by
    the first character; csv_options go to `csv_trace.read_csv_trace`)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise HobbitError(f"cannot read trace {path} ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise HobbitError(
            f"{path} is not a readable trace (not UTF-8 text: {e.reason} at byte {e.start}); "
            "record one with `hobbit run --trace`"
        ) from e
    if not text.lstrip().startswith("{"):
        from .csv_trace import read_csv_trace

        return read_csv_trace(path, text, **csv_options)
    lines = text.splitlines()
    try:
        header = json.loads(lines[0])
        records = [json.loads(line) for line in lines[1:] if line.strip()]
    except (IndexError, ValueError) as e:  # ValueError: bad JSON
        raise HobbitError(
            f"{path} is not a readable trace ({e}); record one with `hobbit run --trace`"
        ) from e
    if not isinstance(header, dict) or header.get("kind") != "hobbit-trace":
        raise HobbitError(f"{path} is not a hobbit trace (no hobbit-trace header)")
    return header, records


@dataclass
class Tick:
    """One MoE layer call as the cache sees it: per distinct expert (sorted), the precision
    it is wanted at, whether it is some token's top-1, and how many rows it serves."""

    layer: int
    token: int
    rows: int
    wants: list[tuple[int, int, bool, int]]  # (expert, HIGH or LOW, has top-1, rows)
    skipped: int


@dataclass
class Requests:
    """A trace turned into cache requests under one precision rule."""

    header: dict
    ticks: list[Tick]
    recall: dict[int, float] = field(default_factory=dict)

    def cut(self, split: float) -> int:
        """Index of the first tick after the first `split` share of the trace's token rows,
        moved on to where a token starts."""
        rows = np.cumsum([t.rows for t in self.ticks])
        i = int(np.searchsorted(rows, split * rows[-1], side="left")) if len(rows) else 0
        while 0 < i < len(self.ticks) and self.ticks[i].token == self.ticks[i - 1].token:
            i += 1
        return i

    def head(self, n: int) -> Requests:
        return Requests(self.header, self.ticks[:n], self.recall)

    def future(self) -> dict:
        """Per key, the ticks it is used at (a high copy: any request of its expert; a low
        copy: a low-precision request), for Belady."""
        out: dict = {}
        for tick, t in enumerate(self.ticks, start=1):
            for e, want, _, _ in t.wants:
                out.setdefault((t.layer, e, "high"), []).append(tick)
                if want == LOW:
                    out.setdefault((t.layer, e, "low"), []).append(tick)
        return {k: np.array(v, np.int64) for k, v in out.items()}


def requests(header: dict, records: list[dict], rule: PrecisionRule | None) -> Requests:
    """Precision levels per row by the runtime's own rule (`PrecisionRule.row`), grouped
    per expert as the runtime groups them; prefetch recall from the recorded predictions."""
    ticks, recall = [], RecallCounter()
    for r in records:
        ids, layer = r["ids"], r["layer"]
        if r["tokens"] == 1:
            recall.settle(layer, set(ids[0]))
            recall.predict(layer, r.get("predicted") or {})
        groups: dict[int, list] = {}
        skipped = 0
        for row, weights in zip(ids, r["weights"], strict=True):
            if rule is None:
                levels, top1 = [HIGH] * len(row), [True] * len(row)
            else:
                levels, top1 = rule.row(layer, row, weights)
            for e, lv, t1 in zip(row, levels, top1, strict=True):
                if lv == SKIP:
                    skipped += 1
                    continue
                g = groups.setdefault(e, [LOW, False, 0])
                g[0] = min(g[0], lv)  # HIGH < LOW: any row wanting high makes it high
                g[1] = g[1] or t1
                g[2] += 1
        wants = [(e, *groups[e]) for e in sorted(groups)]
        ticks.append(Tick(layer, r["token"], len(ids), wants, skipped))
    return Requests(header, ticks, recall.result())


def replay(
    header: dict,
    records: list[dict] | Requests,
    *,
    memory: int | str,
    cache_policy: str = "lru",
    rule: PrecisionRule | None = None,
    low_share: float = 0.25,
    cache_weights: tuple[float, ...] | None = None,
    split: float | None = None,
    per_tick: bool = False,
) -> dict:
    """Simulate the cache over a trace. rule None: every expert at high precision. records
    may be `requests(header, records, rule)` already made (to replay it many times).
    per_tick: also give `per_tick_penalty`, every tick's miss penalty (an array)."""
    if rule is not None and "low" not in header["slot_bytes"]:
        raise HobbitError(
            "this trace has no low-precision shard sizes; it was recorded without one"
        )
    reqs = records if isinstance(records, Requests) else requests(header, records, rule)
    sizes = layer_bytes(header)
    moe_layers = header.get("moe_layers", header["num_layers"])
    budget = parse_memory(memory, full_bytes(header))
    if rule is None:
        capacity = {"high": budget}
    else:
        low = int(budget * low_share)
        capacity = {"high": budget - low, "low": low}
    mean_read = {p: float(v[v > 0].mean()) for p, v in sizes["read"].items()}
    ratio = mean_read.get("low", mean_read["high"]) / mean_read["high"]
    if cache_policy == "belady":
        policy: Policy = Belady(reqs.future())
    else:
        policy = make_policy(cache_policy, header["num_layers"], ratio, cache_weights)
    start = reqs.cut(split) if split is not None else 0
    out = SimulatedCache(capacity, sizes, policy).run(reqs.ticks, start, ratio)
    penalties = out.pop("per_tick_penalty")
    if per_tick:
        out["per_tick_penalty"] = penalties
    total = out["hits"] + out["misses"]
    slots = {
        p: int(c // sizes["slot"][p][sizes["slot"][p] > 0].mean()) for p, c in capacity.items()
    }
    return {
        **out,
        "hit_rate": out["hits"] / total if total else 1.0,
        "share": {k: v / max(sum(out["served"].values()), 1) for k, v in out["served"].items()},
        "prefetch_recall": reqs.recall,
        "slots": slots,
        "cliff": cliff(moe_layers, header["top_k"], sum(slots.values())),
        "cache_policy": cache_policy,
        "scored_from_tick": start,
    }


def full_bytes(header: dict) -> int:
    """What every expert takes at high precision: the base of a percentage budget."""
    per_layer = (header.get("layer_bytes") or {}).get("high")
    if per_layer:
        return int(sum(per_layer)) * header["num_experts"]
    moe_layers = header.get("moe_layers", header["num_layers"])
    return header["slot_bytes"]["high"] * header["num_experts"] * moe_layers


def layer_bytes(header: dict) -> dict[str, dict[str, np.ndarray]]:
    """Per precision, per layer: bytes one expert takes in a slot ("slot") and to read
    ("read"), from the header's `layer_bytes` or, for every layer alike, its per-precision
    sizes."""
    n = header["num_layers"]
    per_layer = header.get("layer_bytes") or {}
    out: dict[str, dict[str, np.ndarray]] = {"slot": {}, "read": {}}
    for kind, sizes in (("slot", header["slot_bytes"]), ("read", header["expert_bytes"])):
        for p, b in sizes.items():
            layers = per_layer.get(p)
            out[kind][p] = np.array(layers if layers else [b] * n, np.int64)
    return out


class SimulatedCache:
    """Bytes per precision, no data: the same eviction decisions the real cache makes.
    Residency lives in arrays over the policy's key ids: a lookup is one index, a victim
    one pass over the resident ids."""

    def __init__(self, capacity: dict[str, int], sizes: dict, policy: Policy):
        self.capacity = capacity
        self.policy = policy
        self.used = dict.fromkeys(capacity, 0)
        self.slot, self.read = sizes["slot"], sizes["read"]
        most = {p: int(c // max(int(self.slot[p].min()), 1)) + 1 for p, c in capacity.items()}
        self.resident = {p: np.zeros(most[p], np.int64) for p in capacity}
        self.n = dict.fromkeys(capacity, 0)
        policy.t.array(self, "where", -1)  # position in self.resident[precision], or -1
        policy.t.array(self, "pinned", False, dtype=bool)

    def has(self, i: int) -> bool:
        return self.where[i] >= 0

    def insert(self, i: int, precision: str, layer: int) -> None:
        if not self.policy.keep or precision not in self.capacity:
            return
        size = int(self.slot[precision][layer])
        while self.used[precision] + size > self.capacity[precision]:
            held = self.resident[precision][: self.n[precision]]
            evictable = held[~self.pinned[held]]
            if not len(evictable):
                return  # served from a slot freed right after use
            self._remove(int(evictable[self.policy.pick(evictable, layer)]), precision)
        j = self.n[precision]
        self.resident[precision][j] = i
        self.where[i] = j
        self.n[precision] += 1
        self.used[precision] += size

    def _remove(self, i: int, precision: str) -> None:
        j, last = self.where[i], self.n[precision] - 1
        moved = self.resident[precision][last]
        self.resident[precision][j] = moved
        self.where[moved] = j
        self.where[i] = -1
        self.n[precision] = last
        self.used[precision] -= int(self.slot[precision][self.policy.t.layer[i >> 1]])

    def run(self, ticks: list[Tick], start: int, ratio: float) -> dict:
        """Every tick through the cache as the backend does it: hits are pinned and touched
        first, then each miss takes a slot. Counts from tick index `start` on."""
        policy, table = self.policy, self.policy.t
        hits = misses = bytes_read = 0
        served = {"high": 0, "low": 0, "skip": 0}
        per_tick = np.zeros(len(ticks))  # miss penalty of every tick, scored or not
        for tick, t in enumerate(ticks, start=1):
            scored = tick > start
            layer = t.layer
            hit_ids, miss_ids = [], []
            for e, want, top1, rows in t.wants:
                i = table.id((layer, e, "high"))
                choice = serve_from(self.where[i] >= 0, self.where[i + 1] >= 0, want, top1)
                if choice is not None:
                    hit_ids.append(i + (choice == "low"))
                else:
                    miss_ids.append(i + (want == LOW))
                if scored:
                    served[choice or PRECISIONS[want]] += rows
            for i in hit_ids:
                policy.touch_id(i, tick, t.token)
                self.pinned[i] = True
            for i in miss_ids:
                precision = PRECISIONS[i & 1]
                self.insert(i, precision, layer)
                self.pinned[i] = True
                policy.touch_id(i, tick, t.token)
                per_tick[tick - 1] += 1.0 if precision == "high" else ratio
                if scored:
                    bytes_read += int(self.read[precision][layer])
            self.pinned[hit_ids] = False
            self.pinned[miss_ids] = False
            if scored:
                hits += len(hit_ids)
                misses += len(miss_ids)
                served["skip"] += t.skipped
        return {
            "hits": hits,
            "misses": misses,
            "bytes_read": bytes_read,
            "miss_penalty": float(per_tick[start:].sum()),
            "served": served,
            "per_tick_penalty": per_tick,
        }


def replay_ids(trace: list[tuple[int, list[int]]], policy: Policy, slots: int) -> dict:
    """The bare cache on a plain trace [(layer, [experts...]), ...], one entry per MoE layer
    call, all at high precision: hits and misses. For testing policies by hand."""
    layers = max((layer for layer, _ in trace), default=0) + 1
    sizes = {"slot": {"high": np.ones(layers, np.int64)}, "read": {"high": np.ones(layers)}}
    ticks = [
        Tick(layer, tick, 1, [(e, HIGH, True, 1) for e in sorted(set(experts))], 0)
        for tick, (layer, experts) in enumerate(trace, start=1)
    ]
    out = SimulatedCache({"high": slots}, sizes, policy).run(ticks, 0, 1.0)
    return {"hits": out["hits"], "misses": out["misses"]}


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

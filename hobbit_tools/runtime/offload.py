"""The offloading expert backend: HOBBIT's three techniques over the expert cache.

Per MoE layer call: the model has routed x [T, D] to ids/weights [T, K]. Then
1. decide: a level per (token, slot) from the precision rule (high, low or skip);
2. look up each selected expert: a cached copy serves (a low copy serves tokens that wanted
   high too, except a token's top-1 expert); a miss is queued at top priority at the level
   its most demanding token wants;
3. prefetch (decode): predict the next layers' experts from this layer's gate input and queue
   the missing ones at low priority, protected from eviction until their layer comes;
4. compute the cached experts while the missing ones load, each as soon as it arrives;
5. combine: skipped slots contribute nothing (their weight is dropped, or with
   `skip="renormalize"` the kept weights are rescaled to the full mass).
Counters, recall per prefetch depth and an optional routing trace are kept as it goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import HobbitError
from . import aio
from .aio import AsyncReads
from .cache import Entry, ExpertCache
from .experts import Combiner, Group, group_rows, groupable
from .io import DEMAND, PREFETCH, IOPool
from .policies import Policy
from .precision import HIGH, LEVEL_NAMES, LOW, SKIP, PrecisionRule, serve_from, skip_weights
from .store import ExpertStore

PRECISION_OF = {HIGH: "high", LOW: "low"}


@dataclass
class OffloadOptions:
    rule: PrecisionRule | None = None  # None: every expert at high precision, none skipped
    skip: str = "drop"  # or "renormalize"
    prefetch_depth: int = 0  # layers looked ahead (0: no prefetch)
    adaptive_depth: bool = True  # look at l+2 only when l+1's predictions are all cached
    io_threads: int = 2


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    io_wait_s: float = 0.0
    compute_s: float = 0.0
    loads: dict[str, int] = field(default_factory=lambda: {"high": 0, "low": 0})
    served: dict[str, int] = field(default_factory=lambda: {"high": 0, "low": 0, "skip": 0})
    prefetch_loads: int = 0
    prefetch_used: int = 0
    prefetch_unused: int = 0  # predicted wrongly: cancelled before the read, or read in vain
    prefetch_cancelled: int = 0
    recall: dict[int, list[int]] = field(default_factory=dict)  # depth -> [predicted, actual]


class OffloadedExperts:
    """ExpertBackend that reads experts from the shards into an `ExpertCache`."""

    def __init__(
        self,
        store: ExpertStore,
        budgets: dict[str, int],
        policy: Policy,
        options: OffloadOptions,
        router: RouterView | None = None,
    ):
        self.store = store
        self.policy = policy
        self.o = options
        self.pool = IOPool(options.io_threads)
        self.reads, self.io = _batched_reads(store, options)
        self.cache = ExpertCache(store, budgets, policy, self.pool, self.reads)
        self.router = router
        self.top_k = store.files.config.top_k
        self.c = Counters()
        self.tick = 0
        self.token = 0
        self._last_layer = 10**9
        self._predicted: dict[tuple[int, int], set[int]] = {}  # (target layer, depth) -> ids
        self._last_predictions: dict[int, list[int]] = {}
        self.trace: list[dict] | None = None
        self._low_cached = "low" in self.cache.arenas  # whether a lookup has two copies to try
        self._deferred: list[Entry] = []  # pinned until the caller has computed them
        # the store has already read one expert, to learn its slot layout
        self._bytes_at_start = store.bytes_read

    # -- ExpertBackend -------------------------------------------------------------------------
    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                defer: bool = False):  # fmt: skip
        self.release()
        self.tick += 1
        if layer <= self._last_layer:
            self.token += 1
        self._last_layer = layer
        T = x.shape[0]
        # decisions run on Python lists: a few dozen tiny torch ops per layer would cost
        # more than the expert compute of a small model
        ids_l, w_l = ids.tolist(), weights.tolist()
        level, top1 = self._decide(layer, ids_l, w_l)
        weights = self._skip_weights(weights, level)
        out = Combiner(x, weights)
        self.cache.poll()  # prefetches that have arrived meanwhile
        if T == 1 and (self._predicted or self.cache.awaiting):
            self._settle_prefetches(layer, set(ids_l[0]))
        ready, waiting, missing, record = [], {}, [], []
        for e, rows, slots in group_rows(ids_l):
            if T == 1:  # decode: one (token, slot) per expert
                want, has_top1 = level[0][slots[0]], top1[0][slots[0]]
                self.c.served["skip"] += want == SKIP
            else:
                kept = [(r, k) for r, k in zip(rows, slots, strict=True) if level[r][k] != SKIP]
                self.c.served["skip"] += len(rows) - len(kept)
                rows, slots = [r for r, _ in kept], [k for _, k in kept]
                high = any(level[r][k] == HIGH for r, k in kept)
                want = SKIP if not kept else HIGH if high else LOW
                has_top1 = any(top1[r][k] for r, k in kept)
            if want == SKIP:
                record.append((e, "skip", "-"))
                continue
            entry = self._lookup(layer, e, want, has_top1)
            if entry is not None:
                self.c.hits += 1
                self.cache.pin(entry)
                self.policy.touch_id(entry.id, self.tick, self.token)
                if entry.ready:
                    ready.append((entry, rows, slots))
                else:  # still loading (a prefetch): wait for it like a miss
                    self.cache.hurry(entry)
                    waiting[entry.future] = (entry, rows, slots)
                record.append((e, entry.key[2], "hit"))
            else:
                self.c.misses += 1
                missing.append(((layer, e, PRECISION_OF[want]), rows, slots))
                record.append((e, PRECISION_OF[want], "miss"))
            self.c.served[PRECISION_OF[want] if entry is None else entry.key[2]] += len(rows)
        try:
            self._start(missing, waiting, layer)
            if T == 1 and self.o.prefetch_depth and self.router is not None:
                self._prefetch(layer, x)
            self.cache.flush()  # the layer's misses and prefetches: one doorbell
            if defer and not waiting and not missing and len(ready) == self.top_k:
                group = Group.of([entry.expert for entry, _, _ in sorted(ready, key=_slot)])
                if group is not None:  # every expert in memory: the caller computes them
                    self._deferred = [entry for entry, _, _ in ready]
                    if self.trace is not None:
                        self._record(layer, ids_l, weights, level, record)
                    return group
            self._compute_ready(out, x, ready)
            self._start(missing, waiting, layer)  # into the slots those hits held pinned
            while waiting or missing:
                if not waiting:
                    raise HobbitError("the expert cache has no free slot; raise the memory budget")
                t0 = time.perf_counter()
                done = self.cache.wait(list(waiting))
                self.c.io_wait_s += time.perf_counter() - t0
                arrived = [waiting.pop(fut) for fut in done]
                for entry, _, _ in arrived:
                    self.cache.finish(entry)
                self._compute_ready(out, x, arrived)
                self._start(missing, waiting, layer)
        except BaseException:
            self.cache.abort()
            raise
        if self.trace is not None:
            self._record(layer, ids_l, weights, level, record)
        return out.result()

    def release(self) -> None:
        """The experts last handed back (`forward(defer=True)`) have been computed."""
        for entry in self._deferred:
            self.cache.unpin(entry)
        self._deferred = []

    def new_sequence(self) -> None:
        self.release()
        self.policy.new_sequence()
        for entry in list(self.cache.entries.values()):
            if entry.protected_for is not None:
                self.c.prefetch_cancelled += self.cache.cancel(entry)
        self._predicted.clear()
        self._last_layer = 10**9

    def stats(self) -> dict:
        c = self.c
        served = sum(c.served.values()) or 1
        return {
            "hits": c.hits,
            "misses": c.misses,
            "hit_rate": c.hits / max(c.hits + c.misses, 1),
            "bytes_read": self.store.bytes_read - self._bytes_at_start,
            "io_wait_s": c.io_wait_s,
            "compute_s": c.compute_s,
            "evictions": self.cache.evictions,
            "loads": dict(c.loads),
            "served": dict(c.served),
            "share": {k: v / served for k, v in c.served.items()},
            "prefetch_loads": c.prefetch_loads,
            "prefetch_used": c.prefetch_used,
            "prefetch_unused": c.prefetch_unused,
            "prefetch_cancelled": c.prefetch_cancelled,
            "prefetch_stolen": self.cache.stolen,
            "prefetch_recall": {d: p / a if a else 0.0 for d, (p, a) in sorted(c.recall.items())},
            "cache_bytes": self.cache.nbytes,
        }

    def close(self) -> None:
        self.release()
        self.cache.settle()  # no read may outlive the files it reads
        self.pool.close()
        if self.reads is not None:
            self.reads.close()
        self.store.close()

    # -- decisions -----------------------------------------------------------------------------
    def _decide(self, layer: int, ids: list, weights: list) -> tuple[list, list]:
        """Per (token, slot) of ids/weights [T][K] lists: level (HIGH/LOW/SKIP), is top-1."""
        if self.o.rule is None:
            return [[HIGH] * len(row) for row in ids], [[True] * len(row) for row in ids]
        rows = [self.o.rule.row(layer, i, w) for i, w in zip(ids, weights, strict=True)]
        return [lv for lv, _ in rows], [t for _, t in rows]

    def _skip_weights(self, weights: torch.Tensor, level: list) -> torch.Tensor:
        if not any(SKIP in row for row in level):
            return weights
        return skip_weights(weights, torch.tensor(level) == SKIP, self.o.skip)

    def _lookup(self, layer: int, e: int, want: int, has_top1: bool) -> Entry | None:
        entries = self.cache.entries
        high = entries.get((layer, e, "high"))
        if high is not None or not self._low_cached:  # the high copy always serves
            return high
        low = entries.get((layer, e, "low"))
        return low if serve_from(False, low is not None, want, has_top1) else None

    # -- loading ---------------------------------------------------------------------------------
    def _start(self, missing: list, waiting: dict, layer: int) -> None:
        while missing:
            key, rows, slots = missing[0]
            entry = self.cache.load(key, DEMAND, layer)
            if entry is None:
                return
            missing.pop(0)
            self.cache.pin(entry)
            self.policy.touch_id(entry.id, self.tick, self.token)
            waiting[entry.future] = (entry, rows, slots)
            self._count_load(key[2])

    def _count_load(self, precision: str) -> None:
        self.c.loads[precision] += 1

    def _compute_ready(self, out: Combiner, x, ready: list) -> None:
        """Experts in memory (cached, or arrived together): for one token in one ggml call
        where they allow it."""
        if x.shape[0] == 1 and groupable([entry.expert for entry, _, _ in ready]):
            t0 = time.perf_counter()
            out.add_group([e.expert for e, _, _ in ready], x, [s[0] for _, _, s in ready])
            self.c.compute_s += time.perf_counter() - t0
            for entry, _, _ in ready:
                self.cache.unpin(entry)
            return
        for entry, rows, slots in ready:
            self._compute(out, x, entry, rows, slots)

    def _compute(self, out: Combiner, x, entry: Entry, rows, slots) -> None:
        t0 = time.perf_counter()
        out.add(entry.expert, x, rows, slots)
        self.c.compute_s += time.perf_counter() - t0
        self.cache.unpin(entry)

    # -- prefetch ----------------------------------------------------------------------------------
    def _prefetch(self, layer: int, x: torch.Tensor) -> None:
        """Layer-level adaptive prefetch: x through the next layers' gates in one matmul."""
        predictions = self.router.predict(layer, x, self.o.prefetch_depth)
        self._last_predictions = {t: ids[0].tolist() for t, ids, _ in predictions}
        queue_more = True
        for depth, (target, ids, weights) in enumerate(predictions, start=1):
            self._predicted[(target, depth)] = set(ids[0].tolist())
            if not queue_more:
                continue
            level, top1 = self._decide(target, ids.tolist(), weights.tolist())
            all_cached = True
            for slot, e in enumerate(ids[0].tolist()):
                lv = level[0][slot]
                if lv == SKIP or self._lookup(target, e, lv, top1[0][slot]) is not None:
                    continue
                all_cached = False
                key = (target, e, PRECISION_OF[lv])
                # leave a layer's worth of slots for demand loads
                if key in self.cache.entries or self.cache.free_slots(key[2]) <= self.top_k:
                    continue
                entry = self.cache.load(key, PREFETCH, layer)
                if entry is not None:
                    self.cache.protect(entry, target)
                    self.c.prefetch_loads += 1
                    self._count_load(key[2])
            # adaptive: look further ahead only while the nearer layers are already cached
            queue_more = all_cached or not self.o.adaptive_depth

    def _settle_prefetches(self, layer: int, actual: set[int]) -> None:
        """Layer `layer` is here: count recall, release or cancel what was prefetched for it."""
        for depth in range(1, self.o.prefetch_depth + 1):
            predicted = self._predicted.pop((layer, depth), None)
            if predicted is not None:
                r = self.c.recall.setdefault(depth, [0, 0])
                r[0] += len(predicted & actual)
                r[1] += len(actual)
        for entry in self.cache.awaiting_layer(layer):
            if entry.key[1] in actual:
                self.c.prefetch_used += 1
                self.cache.unprotect(entry)
            else:
                self.c.prefetch_unused += 1
                self.c.prefetch_cancelled += self.cache.cancel(entry)

    # -- trace -------------------------------------------------------------------------------------
    def start_trace(self) -> None:
        self.trace = []

    def trace_header(self) -> dict:
        cfg = self.store.files.config
        return {
            "kind": "hobbit-trace",
            "version": 1,
            "model": str(self.store.files.dir),
            "num_layers": cfg.num_layers,
            "moe_layers": sum(cfg.moe_layers),
            "num_experts": cfg.num_experts,
            "top_k": cfg.top_k,
            "expert_bytes": {p: v.load_bytes for p, v in self.store.p.items()},
            "slot_bytes": {p: v.slot_bytes for p, v in self.store.p.items()},
        }

    def _record(self, layer, ids, weights, level, record) -> None:
        self.trace.append(
            {
                "token": self.token,
                "layer": layer,
                "tokens": len(ids),
                "ids": ids,
                "weights": [[round(w, 5) for w in row] for row in weights.float().tolist()],
                "levels": [[LEVEL_NAMES[v] for v in row] for row in level],
                "served": record,
                "predicted": self._last_predictions,
            }
        )
        self._last_predictions = {}


def _batched_reads(store: ExpertStore, options: OffloadOptions) -> tuple[AsyncReads | None, str]:
    """Kernel AIO for the loads that are plain direct reads (`store.reads_async`), where this
    system has it (and HOBBIT_IO is not "threads"); with what serves the loads, in words."""
    batched = [p for p in store.p if store.reads_async(p)]
    threads = f"{options.io_threads} reader threads"
    why = "" if batched else "no precision is plain direct reads"
    if not why:
        why = aio.available()
    if not why:
        try:
            reads = aio.AsyncReads()
        except OSError as e:
            why = str(e)
        else:
            rest = [p for p in store.p if p not in batched]
            return reads, "batched direct reads (kernel AIO)" + (
                f" for {'+'.join(batched)}; {threads} for {'+'.join(rest)}" if rest else ""
            )
    return None, f"{threads} ({why})"


class RouterView:
    """The routers of all MoE layers stacked [Lm, E, D], for predicting later layers'
    experts from an earlier layer's gate input in one matmul."""

    def __init__(self, routers: dict[int, torch.Tensor], select):
        self.layers = sorted(routers)
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.stacked = torch.stack([routers[layer] for layer in self.layers])
        self.select = select  # (logits [T, E], layer) -> ids, weights (the family's routing)

    def predict(self, layer: int, x: torch.Tensor, depth: int):
        i = self.index[layer]
        targets = self.layers[i + 1 : i + 1 + depth]
        if not targets:
            return []
        w = self.stacked[i + 1 : i + 1 + len(targets)]  # [p, E, D]
        logits = (x @ w.flatten(0, 1).T).view(x.shape[0], len(targets), -1)  # [T, p, E]
        return [(t, *self.select(logits[:, d], t)) for d, t in enumerate(targets)]


def _slot(item) -> int:
    return item[2][0]  # (entry, rows, slots): one token's top-k slot

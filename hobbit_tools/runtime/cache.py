"""The offloading expert backend: a byte-budgeted cache of experts over the shards.

Per MoE layer call: route (done by the model) -> look up each selected expert -> compute the
cached ones at once while the missing ones load on the I/O threads -> compute each missing
one as soon as it arrives -> combine. With many tokens (prefill) each needed expert is loaded
once for all of them. Slots come from one preallocated arena; an expert in use is pinned and
never evicted under the kernel. Which expert to evict is the policy's call, nothing else is.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from functools import partial

import torch

from ..errors import HobbitError
from .experts import Combiner, Expert, dispatch
from .io import DEMAND, IOPool
from .policies import Key, Policy
from .store import ExpertStore, SlotArena


@dataclass
class Entry:
    key: Key
    slot: int
    future: Future | None = None
    expert: Expert | None = None
    pins: int = 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    io_wait_s: float = 0.0
    compute_s: float = 0.0
    evictions: int = 0
    loads: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / max(self.hits + self.misses, 1),
            "bytes_read": self.bytes_read,
            "io_wait_s": self.io_wait_s,
            "compute_s": self.compute_s,
            "evictions": self.evictions,
            "loads": dict(self.loads),
        }


class OffloadedExperts:
    """ExpertBackend over an ExpertStore, one precision, `budget` bytes of expert memory."""

    def __init__(
        self,
        store: ExpertStore,
        precision: str,
        budget: int,
        policy: Policy,
        min_slots: int,
        io_threads: int = 2,
    ):
        self.store = store
        self.precision = precision
        self.policy = policy
        slot_bytes = store.p[precision].slot_bytes
        n = budget // slot_bytes
        if n < min_slots:
            raise HobbitError(
                f"a memory budget of {budget:,} bytes holds {n} experts; this model needs at "
                f"least {min_slots} (one layer's top-k) = {min_slots * slot_bytes:,} bytes"
            )
        self.arena = SlotArena(slot_bytes, n)
        self.entries: dict[Key, Entry] = {}
        self.pool = IOPool(io_threads)
        self.clock = 0
        self.s = CacheStats()

    # -- ExpertBackend -------------------------------------------------------------------
    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        self.clock += 1
        out = Combiner(x, weights)
        ready, waiting, missing = [], {}, []
        for e, rows, slots in dispatch(ids):
            key = (layer, e, self.precision)
            self.policy.touch(key, self.clock)
            entry = self.entries.get(key)
            if entry is None:
                self.s.misses += 1
                missing.append((key, rows, slots))
                continue
            self.s.hits += 1
            entry.pins += 1
            if entry.expert is not None:
                ready.append((entry, rows, slots))
            else:  # still loading (a prefetch): wait for it like a miss
                waiting[entry.future] = (entry, rows, slots)
        try:
            self._start(missing, waiting, layer)
            for entry, rows, slots in ready:
                self._compute(out, x, entry, rows, slots)
            while waiting or missing:
                if not waiting:
                    raise HobbitError("expert cache has no free slot; raise the memory budget")
                t0 = time.perf_counter()
                done, _ = wait(list(waiting), return_when=FIRST_COMPLETED)
                self.s.io_wait_s += time.perf_counter() - t0
                for fut in done:
                    entry, rows, slots = waiting.pop(fut)
                    entry.expert = fut.result()
                    self._compute(out, x, entry, rows, slots)
                self._start(missing, waiting, layer)
        except BaseException:
            self._abort(waiting)
            raise
        return out.result()

    def new_sequence(self) -> None:
        self.policy.new_sequence()

    def stats(self) -> dict:
        return {**self.s.as_dict(), "cache_bytes": self.arena.nbytes, "cache_slots": self.arena.n}

    def close(self) -> None:
        self.pool.close()
        self.store.close()

    # -- mechanism ---------------------------------------------------------------------------
    def _compute(self, out: Combiner, x, entry: Entry, rows, slots) -> None:
        t0 = time.perf_counter()
        out.add(entry.expert, x, rows, slots)
        self.s.compute_s += time.perf_counter() - t0
        entry.pins -= 1
        if not self.policy.keep and entry.pins == 0:
            self._drop(entry)

    def _start(self, missing: list, waiting: dict, layer: int) -> None:
        """Queue demand loads for as many missing experts as there are slots to put them in."""
        while missing:
            slot = self._free_slot(layer)
            if slot is None:
                return
            key, rows, slots = missing.pop(0)
            entry = Entry(key, slot, pins=1)
            read = partial(self.store.read, key[0], key[1], key[2], self.arena.view(slot))
            entry.future = self.pool.submit(read, DEMAND)
            self.entries[key] = entry
            waiting[entry.future] = (entry, rows, slots)
            self.s.bytes_read += self.store.p[key[2]].expert_bytes
            self.s.loads[key[2]] = self.s.loads.get(key[2], 0) + 1

    def _free_slot(self, layer: int) -> int | None:
        slot = self.arena.acquire()
        if slot is not None:
            return slot
        candidates = [k for k, en in self.entries.items() if en.pins == 0 and en.expert is not None]
        if not candidates:
            return None
        victim = self.entries[self.policy.victim(candidates, layer)]
        self.s.evictions += 1
        self._drop(victim, release=False)
        return victim.slot

    def _drop(self, entry: Entry, release: bool = True) -> None:
        del self.entries[entry.key]
        entry.expert = None
        if release:
            self.arena.release(entry.slot)

    def _abort(self, waiting: dict) -> None:
        """A load failed: cancel or finish the rest so no thread writes into a freed slot."""
        for fut, (entry, _, _) in waiting.items():
            if not fut.cancel():
                try:
                    fut.result()
                except BaseException:
                    pass
            if entry.key in self.entries:
                self._drop(entry)
        for entry in [e for e in self.entries.values() if e.expert is None]:
            self._drop(entry)
        for entry in self.entries.values():
            entry.pins = 0

"""The expert cache mechanism: entries in arena slots, loads on the I/O pool, pins, eviction.

One arena per precision (separate high and low caches sharing one byte budget). Every slot
is in exactly one state, changed only by the thread that runs the model:

    FREE      in its arena's free list
    LOADING   an entry's read is queued or running on an I/O thread, which writes the slot
    READY     the entry's expert is in the slot (protected: prefetched for a layer, unused)
    PINNED    READY and in use by a kernel
    STOPPING  the entry was given up while its read runs; the slot frees once the read ends

An I/O job writes only the slot it was given (and a staging buffer leased for it alone). A
PINNED or protected entry is never evicted; which READY entry to evict is the policy's call.
Nothing frees a LOADING slot: `settle` stops every read and waits for it first (errors,
close). No decisions about what to load live here: see `offload.py`.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial

from .experts import Expert
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
    protected_for: int | None = None  # prefetched for this layer, not yet used
    stop: bool = False  # set by the cache: the read in flight should give up
    urgent: bool = False  # a prefetch the model now waits for: it no longer yields

    @property
    def ready(self) -> bool:
        return self.expert is not None

    @property
    def state(self) -> str:
        if self.stop:
            return "STOPPING"
        if not self.ready:
            return "LOADING"
        return "PINNED" if self.pins else "READY"


class ExpertCache:
    def __init__(self, store: ExpertStore, budgets: dict[str, int], policy: Policy, pool: IOPool):
        self.store = store
        self.policy = policy
        self.pool = pool
        self.arenas = {
            p: SlotArena(store.p[p].slot_bytes, budget // store.p[p].slot_bytes)
            for p, budget in budgets.items()
        }
        self.entries: dict[Key, Entry] = {}
        self.stopping: list[Entry] = []  # reads told to stop; their slots free once they have
        self.evictions = 0
        self.stolen = 0  # prefetched entries given up to a demand load

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arenas.values())

    def get(self, key: Key) -> Entry | None:
        return self.entries.get(key)

    def load(self, key: Key, priority: int, layer_now: int) -> Entry | None:
        """Queue a read of `key` into a free or freed slot; None if every slot is in use.
        A demand load may take the slot of a prefetch not yet used; a prefetch may not."""
        slot = self._free_slot(key[2], layer_now)
        if slot is None and priority == DEMAND:
            slot = self._steal_prefetch(key[2])
        if slot is None:
            return None
        entry = Entry(key, slot)

        def between_chunks() -> bool:  # on the I/O thread: True = give up the read
            if priority != DEMAND and not entry.urgent:
                self.pool.yield_to_demand()
            return entry.stop

        read = partial(self.store.read, *key, self.arenas[key[2]].view(slot), stop=between_chunks)
        entry.future = self.pool.submit(read, priority)
        self.entries[key] = entry
        return entry

    def finish(self, entry: Entry) -> None:
        """The load completed: take the expert (raises the read's error, if any)."""
        if entry.expert is None:
            entry.expert = entry.future.result()

    def unpin(self, entry: Entry) -> None:
        entry.pins -= 1
        if not self.policy.keep and entry.pins == 0 and entry.protected_for is None:
            self.drop(entry)

    def cancel(self, entry: Entry) -> bool:
        """Drop an unused prefetch: cancelled if still queued, stopped if being read (its
        slot is freed once the reader has let go of it), else just unprotected. Returns
        whether a read was cancelled or stopped."""
        entry.protected_for = None
        if entry.pins == 0 and entry.future is not None and entry.future.cancel():
            self.drop(entry)
            return True
        if entry.pins == 0 and not entry.ready and entry.future is not None:
            entry.stop = True
            if self.entries.get(entry.key) is entry:
                del self.entries[entry.key]
            self.stopping.append(entry)
            return True
        if not self.policy.keep and entry.pins == 0 and entry.ready:
            self.drop(entry)
        return False

    def reap(self) -> None:
        """Free the slots of stopped reads that have let go of them."""
        if not self.stopping:
            return
        still = []
        for entry in self.stopping:
            if entry.future.done():
                self.arenas[entry.key[2]].release(entry.slot)
            else:
                still.append(entry)
        self.stopping = still

    def drop(self, entry: Entry) -> None:
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
            entry.expert = None
            self.arenas[entry.key[2]].release(entry.slot)

    def free_slots(self, precision: str) -> int:
        """Slots a load of this precision could take now without touching pinned, protected
        or loading entries."""
        self.reap()
        free = len(self.arenas[precision].free)
        return free + sum(1 for e in self.entries.values() if self._evictable(e, precision))

    def _evictable(self, e: Entry, precision: str) -> bool:
        return e.key[2] == precision and e.pins == 0 and e.ready and e.protected_for is None

    def _free_slot(self, precision: str, layer_now: int) -> int | None:
        self.reap()
        slot = self.arenas[precision].acquire()
        if slot is not None:
            return slot
        candidates = [k for k, e in self.entries.items() if self._evictable(e, precision)]
        if not candidates:
            return None
        victim = self.entries.pop(self.policy.victim(candidates, layer_now))
        victim.expert = None
        self.evictions += 1
        return victim.slot

    def _steal_prefetch(self, precision: str) -> int | None:
        """Last resort for a demand load: a protected prefetch, queued (cancel) or unused."""
        for entry in list(self.entries.values()):
            if entry.key[2] != precision or entry.protected_for is None or entry.pins:
                continue
            if entry.ready or entry.future.cancel():
                del self.entries[entry.key]
                entry.expert = None
                self.stolen += 1
                return entry.slot
        return None

    def settle(self) -> None:
        """Stop every read in flight (queued ones cancelled, running ones told to stop) and
        wait for each to end: afterwards no I/O thread writes into any slot."""
        for entry in list(self.entries.values()) + self.stopping:
            if entry.ready or entry.future is None:
                continue
            entry.stop = entry.stop or not entry.future.cancel()
            try:
                entry.future.result()
            except BaseException:  # stopped, cancelled or failed: nothing left writing
                pass

    def abort(self) -> None:
        """A load failed: settle every read (demand and prefetch), then forget everything not
        ready and every pin."""
        self.settle()
        for entry in list(self.entries.values()):
            if not entry.ready:
                self.drop(entry)
            entry.pins = 0
            entry.protected_for = None
        self.reap()

    def check(self) -> None:
        """Asserts the slot state machine's invariant: each slot is FREE or held by exactly
        one entry (cached or STOPPING). For tests and debugging."""
        for precision, arena in self.arenas.items():
            held = [e.slot for e in [*self.entries.values(), *self.stopping]
                    if e.key[2] == precision]  # fmt: skip
            owned = held + arena.free
            assert sorted(owned) == list(range(arena.n)), (precision, sorted(owned), arena.n)

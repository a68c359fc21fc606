"""The expert cache mechanism: entries in arena slots, loads on the I/O pool, pins, eviction.

One arena per precision (separate high and low caches sharing one byte budget). Every slot
is in exactly one state, changed only by the thread that runs the model:

    FREE      in its arena's free list
    LOADING   an entry's read is queued or running on an I/O thread, which writes the slot
    READY     the entry's expert is in the slot (protected: prefetched for a layer, unused)
    PINNED    READY and in use by a kernel
    STOPPING  the entry was given up while its read runs; the slot frees once the read ends

A load is a batched direct read reaped by the model's thread (`aio.py`: GGUF bytes read
into the slot) or a job on the reader threads (loads repacked or converted after the read,
files without O_DIRECT). An I/O job writes only the slot it was given (and a staging buffer
leased for it alone). A PINNED or protected entry is never evicted; which READY entry to
evict is the policy's call.
Nothing frees a LOADING slot: `settle` stops every read and waits for it first (errors,
close). No decisions about what to load live here: see `offload.py`.

The control plane's cost per miss must not grow with the cache: per arena, each slot's key
id and whether it may be evicted live in arrays (`Board`), updated by the transitions
(`finish`, `pin`/`unpin`, `protect`, `drop`), so a victim is one masked pass of the policy's
vectorised ranking over the slots, and prefetches awaiting a layer are indexed by it.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from functools import partial

import numpy as np

from .aio import AsyncReads, batched
from .experts import Expert
from .io import DEMAND, IOPool
from .policies import Key, Policy
from .store import ExpertStore, SlotArena


@dataclass(eq=False)
class Entry:
    key: Key
    slot: int
    id: int = -1  # the policy's key id
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
    def evictable(self) -> bool:
        return self.ready and self.pins == 0 and self.protected_for is None and not self.stop

    @property
    def state(self) -> str:
        if self.stop:
            return "STOPPING"
        if not self.ready:
            return "LOADING"
        return "PINNED" if self.pins else "READY"


class Board:
    """One arena's slots as arrays: the entry holding each, its key id and whether it may be
    evicted now (READY, unpinned, unprotected)."""

    def __init__(self, n: int):
        self.entry: list[Entry | None] = [None] * n
        self.ids = np.full(n, -1, np.int64)
        self.evictable = np.zeros(n, bool)

    def hold(self, entry: Entry) -> None:
        self.entry[entry.slot] = entry
        self.ids[entry.slot] = entry.id
        self.evictable[entry.slot] = False

    def update(self, entry: Entry) -> None:
        if self.entry[entry.slot] is entry:
            self.evictable[entry.slot] = entry.evictable

    def pin(self, entry: Entry) -> None:
        if self.entry[entry.slot] is entry:
            self.evictable[entry.slot] = False

    def let_go(self, entry: Entry) -> None:
        if self.entry[entry.slot] is entry:
            self.entry[entry.slot] = None
            self.ids[entry.slot] = -1
            self.evictable[entry.slot] = False


class ExpertCache:
    def __init__(
        self,
        store: ExpertStore,
        budgets: dict[str, int],
        policy: Policy,
        pool: IOPool,
        reads: AsyncReads | None = None,
    ):
        self.store = store
        self.policy = policy
        self.pool = pool  # reader threads: loads repacked or converted after the read, a large
        # copy's first (checked) read, files without O_DIRECT
        self.reads = reads  # batched direct reads reaped by this thread: every other load
        self.arenas = {
            p: SlotArena(store.p[p].slot_bytes, budget // store.p[p].slot_bytes)
            for p, budget in budgets.items()
        }
        self.boards = {p: Board(a.n) for p, a in self.arenas.items()}
        self.entries: dict[Key, Entry] = {}
        self.awaiting: dict[int, dict[Key, Entry]] = {}  # layer -> prefetches protected for it
        self.stopping: list[Entry] = []  # reads told to stop; their slots free once they have
        self.evictions = 0
        self.stolen = 0  # prefetched entries given up to a demand load

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arenas.values())

    # -- transitions (the model's thread only) ---------------------------------------------
    def load(self, key: Key, priority: int, layer_now: int) -> Entry | None:
        """Queue a read of `key` into a free or freed slot (FREE -> LOADING); None if every
        slot is in use. A demand load may take the slot of a prefetch not yet used; a
        prefetch may not."""
        slot = self._free_slot(key[2], layer_now)
        if slot is None and priority == DEMAND:
            slot = self._steal_prefetch(key[2])
        if slot is None:
            return None
        entry = Entry(key, slot, self.policy.t.id(key))
        view = self.arenas[key[2]].view(slot)
        if self.reads is not None and self.store.batchable(*key):
            pieces, complete = self.store.plan_read(*key, view, stop=lambda: entry.stop)
            name = self.store.p[key[2]].file.name
            entry.future = self.reads.submit(pieces, complete, name, demand=priority == DEMAND)
        else:

            def between_chunks() -> bool:  # on the I/O thread: True = give up the read
                if priority != DEMAND and not entry.urgent:
                    self.pool.yield_to_demand()
                return entry.stop

            read = partial(self.store.read, *key, view, stop=between_chunks)
            entry.future = self.pool.submit(read, priority)
        self.entries[key] = entry
        self.boards[key[2]].hold(entry)
        return entry

    def hurry(self, entry: Entry) -> None:
        """A prefetch still loading that the model now waits for: no longer yields."""
        entry.urgent = True
        if batched(entry.future):
            self.reads.hurry(entry.future)

    def flush(self) -> None:
        """Send the batched reads queued so far to the device (one system call)."""
        if self.reads is not None:
            self.reads.flush()

    def poll(self) -> None:
        """Take in the batched reads that have completed (their Futures become done)."""
        if self.reads is not None:
            self.reads.poll()

    def wait(self, futures: list[Future]) -> list[Future]:
        """Block until at least one of these loads' Futures is done; returns the done ones."""
        while True:
            self.poll()
            done = [f for f in futures if f.done()]
            if done:
                return done
            threaded = [f for f in futures if not batched(f)]
            if not threaded:
                self.reads.wait(futures)
            elif self.reads is None or not self.reads.in_flight:
                wait(threaded, return_when=FIRST_COMPLETED)
            else:  # both kinds pending: take turns
                wait(threaded, timeout=0.0005, return_when=FIRST_COMPLETED)
                self.reads.poll()

    def finish(self, entry: Entry) -> None:
        """The load completed (LOADING -> READY): take the expert (raises the read's error)."""
        if entry.expert is None:
            entry.expert = entry.future.result()
            self.boards[entry.key[2]].update(entry)

    def pin(self, entry: Entry) -> None:
        """In use by the layer now running: never evicted until unpinned."""
        entry.pins += 1
        if entry.protected_for is not None:
            self.unprotect(entry)
        self.boards[entry.key[2]].pin(entry)

    def unpin(self, entry: Entry) -> None:
        entry.pins -= 1
        if not self.policy.keep and entry.pins == 0 and entry.protected_for is None:
            self.drop(entry)
        else:
            self.boards[entry.key[2]].update(entry)

    def protect(self, entry: Entry, layer: int) -> None:
        """A prefetch for `layer`: kept until that layer has run (or it is cancelled)."""
        self.unprotect(entry)
        entry.protected_for = layer
        self.awaiting.setdefault(layer, {})[entry.key] = entry
        self.boards[entry.key[2]].update(entry)

    def unprotect(self, entry: Entry) -> None:
        if entry.protected_for is not None:
            self.awaiting.get(entry.protected_for, {}).pop(entry.key, None)
            entry.protected_for = None
            self.boards[entry.key[2]].update(entry)

    def awaiting_layer(self, layer: int) -> list[Entry]:
        """The prefetches protected for `layer`."""
        return list(self.awaiting.pop(layer, {}).values())

    def cancel(self, entry: Entry) -> bool:
        """Drop an unused prefetch: cancelled if still queued, stopped if being read (its
        slot is freed once the reader has let go of it: LOADING -> STOPPING), else just
        unprotected. Returns whether a read was cancelled or stopped."""
        self.unprotect(entry)
        if entry.pins == 0 and entry.future is not None and entry.future.cancel():
            self.drop(entry)
            return True
        if entry.pins == 0 and not entry.ready and entry.future is not None:
            entry.stop = True
            if batched(entry.future):
                self.reads.cancel(entry.future)  # its reads not yet sent are dropped
            if self.entries.get(entry.key) is entry:
                del self.entries[entry.key]
            self.stopping.append(entry)  # still holds its slot on the board
            return True
        if not self.policy.keep and entry.pins == 0 and entry.ready:
            self.drop(entry)
        return False

    def reap(self) -> None:
        """Free the slots of stopped reads that have let go of them (STOPPING -> FREE)."""
        if not self.stopping:
            return
        still = []
        for entry in self.stopping:
            if entry.future.done():
                self.boards[entry.key[2]].let_go(entry)
                self.arenas[entry.key[2]].release(entry.slot)
            else:
                still.append(entry)
        self.stopping = still

    def drop(self, entry: Entry) -> None:
        if self.entries.get(entry.key) is entry:
            self.arenas[entry.key[2]].release(self._take(entry))

    def _take(self, entry: Entry) -> int:
        """Forget `entry` (cached, not loading); its slot passes to the caller, not freed."""
        del self.entries[entry.key]
        self.unprotect(entry)
        entry.expert = None
        self.boards[entry.key[2]].let_go(entry)
        return entry.slot

    def free_slots(self, precision: str) -> int:
        """Slots a load of this precision could take now without touching pinned, protected
        or loading entries."""
        self.reap()
        return len(self.arenas[precision].free) + int(
            np.count_nonzero(self.boards[precision].evictable)
        )

    def _free_slot(self, precision: str, layer_now: int) -> int | None:
        self.reap()
        slot = self.arenas[precision].acquire()
        if slot is not None:
            return slot
        board = self.boards[precision]
        slots = np.flatnonzero(board.evictable)
        if not len(slots):
            return None
        victim = board.entry[int(slots[self.policy.pick(board.ids[slots], layer_now)])]
        self.evictions += 1
        return self._take(victim)

    def _steal_prefetch(self, precision: str) -> int | None:
        """Last resort for a demand load: a protected prefetch, queued (cancel) or unused."""
        for layer in list(self.awaiting):
            for entry in list(self.awaiting[layer].values()):
                if entry.key[2] != precision or entry.pins:
                    continue
                if entry.ready or entry.future.cancel():
                    self.stolen += 1
                    return self._take(entry)
        return None

    # -- errors and close ----------------------------------------------------------------------
    def settle(self) -> None:
        """Stop every read in flight (queued ones cancelled, running ones told to stop) and
        wait for each to end: afterwards no I/O thread writes into any slot."""
        loading = [e for e in [*self.entries.values(), *self.stopping] if not e.ready and e.future]
        for entry in loading:
            if batched(entry.future):
                entry.stop = True
                self.reads.cancel(entry.future)
            else:
                entry.stop = entry.stop or not entry.future.cancel()
        if self.reads is not None:
            self.reads.drain()
        for entry in loading:
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
                continue
            entry.pins = 0
            self.unprotect(entry)
            self.boards[entry.key[2]].update(entry)
        self.reap()

    def check(self) -> None:
        """Asserts the slot state machine's invariants: each slot is FREE or held by exactly
        one entry (cached or STOPPING), and the board agrees. For tests and debugging."""
        for precision, arena in self.arenas.items():
            board = self.boards[precision]
            held = [e for e in [*self.entries.values(), *self.stopping] if e.key[2] == precision]
            owned = [e.slot for e in held] + arena.free
            assert sorted(owned) == list(range(arena.n)), (precision, sorted(owned), arena.n)
            for e in held:
                assert board.entry[e.slot] is e and board.ids[e.slot] == e.id
                assert board.evictable[e.slot] == (e.evictable and e.key in self.entries)
            for slot in arena.free:
                assert board.entry[slot] is None and not board.evictable[slot]
        for layer, waiting in self.awaiting.items():
            assert all(e.protected_for == layer for e in waiting.values())

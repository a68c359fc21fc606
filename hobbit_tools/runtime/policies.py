"""Eviction policies: plain Python over expert keys, drivable by a recorded routing trace.

A key is (layer, expert, precision). The cache tells a policy which keys were used at which
clock tick (one tick per MoE layer call) and asks it for a victim among the evictable keys.
Policies never see memory, files or tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

Key = tuple[int, int, str]


class Policy:
    name = "base"
    keep = True  # False: drop an expert as soon as it is used (no cache)

    def new_sequence(self) -> None:
        """Counts that are per sequence reset here; recency survives."""

    def touch(self, key: Key, clock: int) -> None:
        raise NotImplementedError

    def victim(self, candidates: Iterable[Key], layer: int) -> Key:
        raise NotImplementedError


class LRU(Policy):
    """Least recently used: mixtral-offloading's cache."""

    name = "lru"

    def __init__(self):
        self.last: dict[Key, int] = {}

    def touch(self, key, clock):
        self.last[key] = clock

    def victim(self, candidates, layer):
        return min(candidates, key=lambda k: self.last.get(k, -1))


class LFU(LRU):
    """Least frequently used in this sequence; ties go to the least recently used."""

    name = "lfu"

    def __init__(self):
        super().__init__()
        self.count: dict[Key, int] = {}

    def new_sequence(self):
        self.count.clear()

    def touch(self, key, clock):
        super().touch(key, clock)
        self.count[key] = self.count.get(key, 0) + 1

    def victim(self, candidates, layer):
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last.get(k, -1)))


class OnDemand(LRU):
    """No cache: every selected expert is read each time it is used."""

    name = "ondemand"
    keep = False


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LRU, LFU, OnDemand)}
CACHE_POLICIES = ("resident", *POLICIES)


def make_policy(name: str) -> Policy:
    from ..errors import HobbitError

    if name not in POLICIES:
        raise HobbitError(f"unknown policy {name!r} (choose from {', '.join(CACHE_POLICIES)})")
    return POLICIES[name]()


def replay(
    trace: Iterable[tuple[int, list[int]]], policy: Policy, slots: int, precision: str = "high"
) -> dict:
    """Runs a routing trace [(layer, [experts...]), ...] (one entry per MoE layer call)
    through `policy` with `slots` cache slots, as the cache would: experts of the current
    call are pinned, so never evicted for one another. Returns hits and misses."""
    cached: set[Key] = set()
    hits = misses = 0
    for clock, (layer, experts) in enumerate(trace, start=1):
        keys = [(layer, e, precision) for e in dict.fromkeys(experts)]
        for key in keys:
            policy.touch(key, clock)
        for key in keys:
            if key in cached:
                hits += 1
                continue
            misses += 1
            if not policy.keep:
                continue
            if len(cached) >= slots:
                evictable = [k for k in cached if k not in keys]
                if not evictable:
                    continue  # computed from a scratch slot, not kept
                cached.discard(policy.victim(evictable, layer))
            cached.add(key)
    return {"hits": hits, "misses": misses}

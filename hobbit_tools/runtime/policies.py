"""Eviction policies: plain Python over expert keys, drivable by a recorded routing trace.

A key is (layer, expert, precision). The cache tells a policy which keys were used at which
clock tick (one tick per MoE layer call) and token, and asks it for a victim among the
evictable keys (ties broken by key, so a replay decides exactly as the cache did). Policies
never see memory, files or tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

Key = tuple[int, int, str]


class Policy:
    name = "base"
    keep = True  # False: drop an expert as soon as it is used (no cache)

    def new_sequence(self) -> None:
        """Counts that are per sequence reset here; recency survives."""

    def touch(self, key: Key, clock: int, token: int = 0) -> None:
        raise NotImplementedError

    def victim(self, candidates: Iterable[Key], layer: int) -> Key:
        raise NotImplementedError


class LRU(Policy):
    """Least recently used: mixtral-offloading's cache."""

    name = "lru"

    def __init__(self):
        self.last: dict[Key, int] = {}

    def touch(self, key, clock, token=0):
        self.last[key] = clock

    def victim(self, candidates, layer):
        return min(candidates, key=lambda k: (self.last.get(k, -1), k))


class LFU(LRU):
    """Least frequently used in this sequence; ties go to the least recently used."""

    name = "lfu"

    def __init__(self):
        super().__init__()
        self.count: dict[Key, int] = {}

    def new_sequence(self):
        self.count.clear()

    def touch(self, key, clock, token=0):
        super().touch(key, clock, token)
        self.count[key] = self.count.get(key, 0) + 1

    def victim(self, candidates, layer):
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last.get(k, -1), k))


class OnDemand(LRU):
    """No cache: every selected expert is read each time it is used."""

    name = "ondemand"
    keep = False


class _SequenceCounts(Policy):
    """Per (layer, expert): last token used, uses and high-precision uses in this sequence."""

    def __init__(self, num_layers: int, low_over_high: float):
        self.n = max(num_layers, 1)
        self.ratio = low_over_high  # B_low / B_high: a low miss costs this share of a high one
        self.last: dict[tuple[int, int], int] = {}
        self.uses: dict[tuple[int, int], int] = {}
        self.high: dict[tuple[int, int], int] = {}
        self.low: dict[tuple[int, int], int] = {}
        self.token = 1

    def new_sequence(self):
        self.uses.clear()
        self.high.clear()
        self.low.clear()

    def touch(self, key, clock, token=0):
        e = key[:2]
        self.token = max(self.token, token, 1)
        self.last[e] = token
        self.uses[e] = self.uses.get(e, 0) + 1
        counts = self.high if key[2] == "high" else self.low
        counts[e] = counts.get(e, 0) + 1

    def distance(self, key: Key, layer: int) -> int:
        """Layers until key's layer comes round again."""
        return (key[0] - layer + self.n) % self.n

    def victim(self, candidates, layer):
        return min(candidates, key=lambda k: (self.priority(k, layer), k))

    def priority(self, key: Key, layer: int) -> float:
        raise NotImplementedError


class Hobbit(_SequenceCounts):
    """HOBBIT's multidimensional priority: recency, frequency, high-precision uses and layer
    distance, weighted (weights sum to 1; `hobbit profile` fits them by trace replay)."""

    name = "hobbit"
    DEFAULT_WEIGHTS = (0.4, 0.2, 0.2, 0.2)  # lru, lfu, lhu, fld

    def __init__(self, num_layers, low_over_high, weights=DEFAULT_WEIGHTS):
        super().__init__(num_layers, low_over_high)
        self.w = weights

    def priority(self, key, layer):
        e, t = key[:2], float(self.token)
        w_lru, w_lfu, w_lhu, w_fld = self.w
        return (
            w_lru * self.last.get(e, 0) / t
            + w_lfu * self.uses.get(e, 0) / t
            + w_lhu * self.high.get(e, 0) / t
            + w_fld * (1 - self.distance(key, layer) / self.n)
        )


class LCU(_SequenceCounts):
    """MoE-APEX's least-cost-utility: precision-weighted uses per token, plus a bonus for
    experts used in the last forward pass whose layer comes soon."""

    name = "lcu"

    def priority(self, key, layer):
        e = key[:2]
        cost = self.high.get(e, 0) + self.ratio * self.low.get(e, 0)
        p = cost / float(self.token)
        if self.last.get(e, -10) >= self.token - 1:
            p += 1.0 / (self.distance(key, layer) + 0.1)
        return p


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LRU, LFU, OnDemand, Hobbit, LCU)}
CACHE_POLICIES = tuple(POLICIES)


def make_policy(name: str, num_layers: int = 1, low_over_high: float = 0.5, weights=None) -> Policy:
    from ..errors import HobbitError

    if name not in POLICIES:
        raise HobbitError(
            f"unknown cache policy {name!r} (choose from {', '.join(CACHE_POLICIES)})"
        )
    cls = POLICIES[name]
    if issubclass(cls, _SequenceCounts):
        return cls(num_layers, low_over_high, **({"weights": weights} if weights else {}))
    return cls()

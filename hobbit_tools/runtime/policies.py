"""Eviction policies: plain Python over expert keys, drivable by a recorded routing trace.

A key is (layer, expert, precision). The cache tells a policy which keys were used at which
clock tick (one tick per MoE layer call) and token, and asks it for a victim among the
evictable keys (ties broken by key, so a replay decides exactly as the cache did). Policies
never see memory, files or tensors.

State lives in numpy arrays indexed by a dense key id (`KeyTable`), and every policy ranks
candidates with one vectorised `scores` (lowest evicted first): the runtime's `victim` and
the replay's `pick` run the same code, and a victim costs one array pass, not a Python loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

Key = tuple[int, int, str]
PRECISIONS = ("high", "low")  # in key order: a high copy sorts before a low one
NEVER = np.iinfo(np.int64).max


class KeyTable:
    """Dense ids for the (layer, expert) pairs seen so far: key id = 2 * pair + precision
    (0 high, 1 low). Arrays registered with `array` grow with the table."""

    def __init__(self):
        self.pairs: dict[tuple[int, int], int] = {}
        self.layer = np.zeros(0, np.int64)  # per pair
        self.code = np.zeros(0, np.int64)  # per key id: sorts like the key tuple
        self._arrays: list[tuple[object, str, int, object]] = []  # (owner, attr, per, fill)

    def __len__(self) -> int:
        return len(self.pairs)

    def id(self, key: Key) -> int:
        pair = self.pairs.get(key[:2])
        if pair is None:
            pair = self._add(key[:2])
        return 2 * pair + (key[2] != "high")

    def key(self, i: int) -> Key:
        layer, expert = divmod(int(self.code[i]) >> 1, 1 << 20)
        return (layer, expert, PRECISIONS[i & 1])

    def array(self, owner, attr: str, fill, per: int = 2, dtype=np.int64) -> None:
        """Give owner.attr an array over keys (per=2) or pairs (per=1), filled with fill."""
        setattr(owner, attr, np.full(per * len(self.layer), fill, dtype))
        self._arrays.append((owner, attr, per, fill))

    def _add(self, pair: tuple[int, int]) -> int:
        i = len(self.pairs)
        self.pairs[pair] = i
        if i >= len(self.layer):
            self._grow(max(64, 2 * len(self.layer)))
        self.layer[i] = pair[0]
        self.code[2 * i : 2 * i + 2] = ((pair[0] << 20) + pair[1]) * 2 + np.arange(2)
        return i

    def _grow(self, n: int) -> None:
        def grown(a, size, fill):
            out = np.full(size, fill, a.dtype)
            out[: len(a)] = a
            return out

        self.layer = grown(self.layer, n, 0)
        self.code = grown(self.code, 2 * n, NEVER)
        for owner, attr, per, fill in self._arrays:
            setattr(owner, attr, grown(getattr(owner, attr), per * n, fill))


class Policy:
    """The interface the runtime's ExpertCache and the replay drive. Subclasses update their
    arrays in `touch` and rank candidate ids in `scores`."""

    name = "base"
    keep = True  # False: drop an expert as soon as it is used (no cache)

    def __init__(self):
        self.t = KeyTable()

    def new_sequence(self) -> None:
        """Counts that are per sequence reset here; recency survives."""

    def touch(self, key: Key, clock: int, token: int = 0) -> None:
        self.touch_id(self.t.id(key), clock, token)

    def touch_id(self, i: int, clock: int, token: int) -> None:
        raise NotImplementedError

    def scores(self, ids: np.ndarray, layer: int) -> tuple[np.ndarray, ...]:
        """Ranks per candidate id, most significant first: the lowest is evicted (ties on
        every rank: the smallest key)."""
        raise NotImplementedError

    def victim(self, candidates: Iterable[Key], layer: int) -> Key:
        cands = list(candidates)
        ids = np.fromiter((self.t.id(k) for k in cands), np.int64, len(cands))
        return cands[self.pick(ids, layer)]

    def pick(self, ids: np.ndarray, layer: int) -> int:
        """Position in ids of the victim."""
        first, *rest = self.scores(ids, layer)
        tied = np.flatnonzero(first == first.min())
        for rank in rest:
            if len(tied) == 1:
                break
            rank = rank[tied]
            tied = tied[rank == rank.min()]
        return int(tied[0]) if len(tied) == 1 else int(tied[np.argmin(self.t.code[ids[tied]])])


class LRU(Policy):
    """Least recently used: mixtral-offloading's cache."""

    name = "lru"

    def __init__(self):
        super().__init__()
        self.t.array(self, "last", -1)

    def touch_id(self, i, clock, token):
        self.last[i] = clock

    def scores(self, ids, layer):
        return (self.last[ids],)


class LFU(LRU):
    """Least frequently used in this sequence; ties go to the least recently used."""

    name = "lfu"

    def __init__(self):
        super().__init__()
        self.t.array(self, "count", 0)

    def new_sequence(self):
        self.count[:] = 0

    def touch_id(self, i, clock, token):
        self.last[i] = clock
        self.count[i] += 1

    def scores(self, ids, layer):
        return self.count[ids], self.last[ids]


class DecayLFU(LRU):
    """Frequency with exponential decay (half-life in tokens), across sequences: recent
    popularity wins over old. Ranked in log2 space, so no count ever needs rescaling:
    rank = log2(sum over uses of 2^(token_of_use / half_life)); ties go to the LRU."""

    name = "decay"
    DEFAULT_HALF_LIFE = 16.0

    def __init__(self, half_life: float = DEFAULT_HALF_LIFE):
        super().__init__()
        self.h = float(half_life)
        self.t.array(self, "rank", -np.inf, dtype=np.float64)

    def touch_id(self, i, clock, token):
        self.last[i] = clock
        r, x = float(self.rank[i]), token / self.h  # log2(2^r + 2^x), in Python floats
        self.rank[i] = x if r == -math.inf else max(r, x) + math.log2(1 + 2.0 ** -abs(r - x))

    def scores(self, ids, layer):
        return self.rank[ids], self.last[ids]


class Forecast(DecayLFU):
    """Evicts the expert whose next use is forecast furthest ahead, in MoE layer calls:
    the layers until its layer comes round, plus num_layers x the tokens expected until its
    expert is chosen again (1 / the chance a token chooses it, less one). Belady's rule with
    the future estimated: the chance decides between experts of unlike popularity, the layer
    cycle between alike ones. Below one token's working set it keeps the popular experts
    resident and streams the rest through the remaining slots.

    The chance is the geometric mean of two frequencies, one decayed with a half-life in
    tokens (follows a change of topic) and one over every token so far (steady where routing
    is steady, the better one once a sequence is long): either alone lost to plain LFU on
    some real trace. An expert chosen at its layer's last visit has at least the chance,
    measured per layer as the run goes, that a layer chooses again what it chose the token
    before: consecutive tokens share experts more often than their frequencies say."""

    name = "forecast"
    DEFAULT_HALF_LIFE = 8.0

    def __init__(self, num_layers: int, half_life: float = DEFAULT_HALF_LIFE):
        super().__init__(half_life)
        self.n = max(num_layers, 1)
        self.t.array(self, "count", 0)
        self.t.array(self, "used_at", -1)  # token of the key's last use
        # per layer, as lists (a touch costs a Python append, not a numpy call): the token
        # of its last visit and of the one before, its uses, and uses of an expert that it
        # had chosen at the visit before
        self.visit: list[int] = []
        self.before: list[int] = []
        self.uses: list[int] = []
        self.repeats: list[int] = []
        self._cover(self.n)
        self.token = 1

    def _cover(self, layers: int) -> None:
        """Per-layer lists long enough for layer indices below `layers`."""
        while len(self.visit) < layers:
            for a, fill in ((self.visit, -1), (self.before, -1), (self.uses, 0), (self.repeats, 0)):
                a.append(fill)

    def touch_id(self, i, clock, token):
        super().touch_id(i, clock, token)
        layer = int(self.t.layer[i >> 1])
        if layer >= len(self.visit):
            self._cover(layer + 1)
        if self.visit[layer] != token:
            self.before[layer], self.visit[layer] = self.visit[layer], token
        was = int(self.used_at[i])
        self.uses[layer] += 1
        self.repeats[layer] += was >= 0 and was == self.before[layer]
        self.used_at[i] = token
        self.count[i] += 1
        if token > self.token:
            self.token = token

    def scores(self, ids, layer):
        # decayed uses now, over the decayed number of tokens so far: the chance lately;
        # count over tokens: the chance over the whole run
        tokens = (1 - 2.0 ** (-self.token / self.h)) / (1 - 2.0 ** (-1 / self.h))
        scale = 1.0 / math.sqrt(tokens * self.token)
        chance = np.sqrt(np.exp2(self.rank[ids] - self.token / self.h) * self.count[ids]) * scale
        layers = self.t.layer[ids >> 1]
        self._cover(int(layers.max()) + 1)  # a candidate's layer may not have run yet
        again = np.array(self.repeats, np.float64) / np.maximum(self.uses, 1)
        fresh = self.used_at[ids] == np.array(self.visit)[layers]
        chance = np.where(fresh, np.maximum(chance, again[layers]), chance)
        gap = 1 / np.maximum(chance, 1e-300) - 1
        dist = (layers - layer - 1) % self.n + 1
        return -(dist + self.n * gap), self.last[ids]


class OnDemand(LRU):
    """No cache: every selected expert is read each time it is used."""

    name = "ondemand"
    keep = False


class LayerPartition(LFU):
    """The budget shared out by layer, equally: a victim comes from the layer holding the
    most evictable entries, chosen inside it by LFU (or LRU with inner="lru"). Keeps every
    layer a resident subset when the cache cannot hold one token's working set, where a
    global LRU cycles and never hits."""

    name = "layer-lfu"

    def __init__(self, inner: str = "lfu"):
        super().__init__()
        self.inner = inner
        self.name = f"layer-{inner}"

    def new_sequence(self):
        if self.inner == "lfu":
            super().new_sequence()

    def scores(self, ids, layer):
        layers = self.t.layer[ids >> 1]
        held = np.bincount(layers)[layers]
        inner = super().scores(ids, layer) if self.inner == "lfu" else (self.last[ids],)
        return (-held, *inner)


class Belady(LRU):
    """The offline optimum (Belady's MIN) for the replay: evicts the copy whose next use
    lies furthest ahead. `future[key]`: the sorted ticks at which key would be used (a high
    copy by any request of its expert, a low copy by a low-precision request). Exact for
    one precision; with two it is each precision's own optimum, a yardstick."""

    name = "belady"

    def __init__(self, future: dict[Key, np.ndarray]):
        super().__init__()
        self.future = future
        self.t.array(self, "next", NEVER)

    def touch_id(self, i, clock, token):
        self.last[i] = clock
        ticks = self.future.get(self.t.key(i))
        j = -1 if ticks is None else int(np.searchsorted(ticks, clock, side="right"))
        self.next[i] = NEVER if j < 0 or j >= len(ticks) else ticks[j]

    def scores(self, ids, layer):
        return (-self.next[ids],)


class _SequenceCounts(Policy):
    """Per (layer, expert): last token used, uses and high/low-precision uses in this
    sequence."""

    def __init__(self, num_layers: int, low_over_high: float):
        super().__init__()
        self.n = max(num_layers, 1)
        self.ratio = low_over_high  # B_low / B_high: a low miss costs this share of a high one
        for attr, fill in (("last_token", -10), ("uses", 0), ("high", 0), ("low", 0)):
            self.t.array(self, attr, fill, per=1)
        self.token = 1

    def new_sequence(self):
        self.uses[:] = 0
        self.high[:] = 0
        self.low[:] = 0

    def touch_id(self, i, clock, token):
        e = i >> 1
        self.token = max(self.token, token, 1)
        self.last_token[e] = token
        self.uses[e] += 1
        (self.low if i & 1 else self.high)[e] += 1

    def distance(self, ids: np.ndarray, layer: int) -> np.ndarray:
        """Layers until each key's layer comes round again."""
        return (self.t.layer[ids >> 1] - layer + self.n) % self.n


class Hobbit(_SequenceCounts):
    """HOBBIT's multidimensional priority: recency, frequency, high-precision uses and layer
    distance, weighted (weights sum to 1; `hobbit profile` fits them by trace replay)."""

    name = "hobbit"
    DEFAULT_WEIGHTS = (0.4, 0.2, 0.2, 0.2)  # lru, lfu, lhu, fld

    def __init__(self, num_layers, low_over_high, weights=DEFAULT_WEIGHTS):
        super().__init__(num_layers, low_over_high)
        self.w = weights

    def scores(self, ids, layer):
        e, t = ids >> 1, float(self.token)
        w_lru, w_lfu, w_lhu, w_fld = self.w
        return (
            w_lru * np.maximum(self.last_token[e], 0) / t
            + w_lfu * self.uses[e] / t
            + w_lhu * self.high[e] / t
            + w_fld * (1 - self.distance(ids, layer) / self.n),
        )


class LCU(_SequenceCounts):
    """MoE-APEX's least-cost-utility: precision-weighted uses per token, plus a bonus for
    experts used in the last forward pass whose layer comes soon."""

    name = "lcu"

    def scores(self, ids, layer):
        e = ids >> 1
        p = (self.high[e] + self.ratio * self.low[e]) / float(self.token)
        recent = self.last_token[e] >= self.token - 1
        return (p + np.where(recent, 1.0 / (self.distance(ids, layer) + 0.1), 0.0),)


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (LRU, LFU, OnDemand, Hobbit, LCU, DecayLFU, Forecast, LayerPartition)
}
POLICIES["layer-lru"] = LayerPartition
CACHE_POLICIES = tuple(POLICIES)
CLIFF_POLICY = "forecast"  # the runtime's default below one token's working set


def make_policy(
    name: str, num_layers: int = 1, low_over_high: float = 0.5, weights: Sequence | None = None
) -> Policy:
    """A policy by name. weights: its parameters where it has any (hobbit: the four
    priority weights; decay: the half-life in tokens)."""
    from ..errors import HobbitError

    if name not in POLICIES:
        raise HobbitError(
            f"unknown cache policy {name!r} (choose from {', '.join(CACHE_POLICIES)})"
        )
    cls = POLICIES[name]
    if issubclass(cls, _SequenceCounts):
        return cls(num_layers, low_over_high, **({"weights": tuple(weights)} if weights else {}))
    if cls is DecayLFU:
        return cls(*weights) if weights else cls()
    if cls is Forecast:
        return cls(num_layers, *(weights or ()))
    if cls is LayerPartition:
        return cls(name.removeprefix("layer-"))
    return cls()


def cliff(num_layers: int, top_k: int, slots: int) -> str | None:
    """A warning when `slots` (experts the cache holds) is below one token's working set
    (num_layers x top_k): recency then runs exactly opposite to the layer cycle, so LRU
    evicts each expert just before its layer comes round again and never hits. None above."""
    need = num_layers * top_k
    if slots >= need:
        return None
    return (
        f"the cache holds {slots} experts, below one token's working set of {need} "
        f"({num_layers} MoE layers x top-{top_k}): LRU never hits there, a policy that "
        f"keeps a frequent subset resident and streams the rest ({CLIFF_POLICY}) does"
    )

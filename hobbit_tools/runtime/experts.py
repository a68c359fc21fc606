"""Routed experts behind one narrow interface: route -> fetch -> compute -> combine.

The model hands each MoE layer's input and routing to an `ExpertBackend`; the backend decides
where expert weights come from (resident here; an offloading cache in `cache.py`) and returns
the weighted sum of expert outputs. Experts are data: three linear maps, never nn.Modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from . import ggml, prefill

Linear = Callable[[torch.Tensor], torch.Tensor]  # x [T, in] -> [T, out]


@dataclass
class Expert:
    """down(silu(gate(x)) * up(x)), computed in the kernels' dtype (`dtype`), which may differ
    from the model's: quantized kernels take bf16 activations even where the dense part runs
    in float32."""

    gate: Linear
    up: Linear
    down: Linear
    nbytes: int = 0
    dtype: torch.dtype | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is None or self.dtype == x.dtype:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        xk = x.to(self.dtype)
        return self.down(F.silu(self.gate(xk)) * self.up(xk)).to(x.dtype)


Matrix = tuple[int, str, tuple[int, int]]  # address of GGUF bytes, GGUF type, (out, in)


class GGUFExpert:
    """An expert computed on its GGUF bytes where they lie (a cache slot), by ggml's kernels:
    down(silu(gate(x)) * up(x)) in one ggml call. One token runs a graph cached per slot
    (`graphs`, keyed by the slot's address, re-pointed at this expert's bytes); more tokens
    build one for the call, or where `prefill.ROUTE` says, take torch's bf16 GEMM. Float32
    inside, the caller's dtype out."""

    def __init__(self, mats: tuple[Matrix, Matrix, Matrix], nbytes: int, slot, graphs: dict):
        self.mats = mats
        self.nbytes = nbytes
        self.slot = slot  # keeps the memory alive
        self.addr = slot.ctypes.data
        self.graphs = graphs
        self.dtype = torch.float32
        self.layout = ggml.ExpertGroup.key([mats])  # what a group graph is built for
        types = {m[1] for m in mats}
        self.qtype = types.pop() if len(types) == 1 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            if prefill.takes(self.qtype, x.shape[0]):
                return prefill.ffn(x, *self.mats).to(x.dtype)
            return ggml.ffn(x, *self.mats).to(x.dtype)
        graph = self.graphs.get(self.addr)
        if graph is None:
            graph = self.graphs[self.addr] = ggml.ExpertFFN(*self.mats)
        graph.bind(*(m[0] for m in self.mats))
        return graph(x).to(x.dtype)


_GROUPS: dict[tuple, ggml.ExpertGroup] = {}  # one graph per group layout (model thread only)


def groupable(experts) -> bool:
    """Whether these experts can run as one ggml call: two or more, all on GGUF bytes, of
    one shape."""
    if len(experts) < 2 or not all(type(e) is GGUFExpert for e in experts):
        return False
    return len({e.mats[0][2] for e in experts}) == 1


def run_group(experts: list[GGUFExpert], x: torch.Tensor, key: tuple | None = None, copy=True):
    """One token x [1, D] through several GGUF experts in one ggml call -> [n, D] float32,
    each row exactly what that expert alone gives. key: `ExpertGroup.key` of their mats,
    where the caller has it. copy=False: a numpy view of the graph's buffer, valid until
    the next group of the same layout runs."""
    mats = [e.mats for e in experts]
    key = ggml.ExpertGroup.key(mats) if key is None else key
    graph = _GROUPS.get(key)
    if graph is None:
        graph = _GROUPS[key] = ggml.ExpertGroup(mats)
    y = graph(mats, x)
    return torch.from_numpy(y.copy()) if copy else y


class Group(NamedTuple):
    """One token's experts handed back for the caller to compute (the model's next decode
    layer graph runs them, `layer_graph.Carry`): their matrices in top-k slot order and
    the layout key (`ExpertGroup.key`) of those. Their memory stays theirs until the
    backend's next call (or `release`)."""

    mats: list
    key: tuple

    @staticmethod
    def of(experts: list) -> Group | None:
        """None where they are not all on GGUF bytes of one layout (a graph is built per
        layout: one precision keeps them few)."""
        if not groupable(experts) or len({e.layout for e in experts}) != 1:
            return None
        return Group([e.mats for e in experts], experts[0].layout * len(experts))


class ExpertBackend(Protocol):
    def forward(
        self,
        layer: int,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        defer: bool = False,
    ) -> torch.Tensor | Group:
        """x [T, D], ids [T, K], weights [T, K] float32 -> sum_k weights * expert_k(x) [T, D].
        defer (one token): may return the experts as a `Group` for the caller to compute
        with `weights` instead, where every one is in memory and none is skipped."""
        ...

    def new_sequence(self) -> None: ...

    def stats(self) -> dict: ...


def dispatch(ids: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Group routing by expert: [(expert, token rows, top-k slots)], experts ascending."""
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    k = ids.shape[1]
    groups = []
    for e, idx in zip(experts.tolist(), torch.split(order, counts.tolist()), strict=True):
        groups.append((e, idx // k, idx % k))
    return groups


def group_rows(ids: list[list[int]]) -> list[tuple[int, list[int], list[int]]]:
    """`dispatch` on Python lists (ids.tolist()): the decode path, where a handful of
    small torch ops per layer would cost more than the grouping."""
    if len(ids) == 1:  # one token: its top-k experts are distinct
        return sorted((e, [0], [k]) for k, e in enumerate(ids[0]))
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for r, row in enumerate(ids):
        for k, e in enumerate(row):
            g = groups.setdefault(e, ([], []))
            g[0].append(r)
            g[1].append(k)
    return [(e, *groups[e]) for e in sorted(groups)]


class Combiner:
    """Collects weighted expert outputs [T, K, D] and sums them over K in slot order, so the
    result is bit-identical whatever order experts are computed in (cached ones first,
    missing ones as they arrive): every backend gives the same logits. One float32 token
    (decode) works on numpy arrays: a dozen torch ops a layer cost more than top-2 small
    experts' bookkeeping should."""

    def __init__(self, x: torch.Tensor, weights: torch.Tensor):
        self.one = x.shape[0] == 1 and x.dtype == torch.float32
        if self.one:
            self.w = weights[0].float().numpy()  # [K]
            self.parts = np.zeros((weights.shape[1], x.shape[1]), np.float32)  # [K, D]
            return
        self.w = weights.to(x.dtype)
        self.parts = x.new_zeros(x.shape[0], weights.shape[1], x.shape[1])

    def add(self, expert: Expert, x: torch.Tensor, rows, slots) -> None:
        """rows, slots: index tensors or lists of the (token, top-k slot) pairs routed here."""
        self.put(rows, slots, expert(x if self.one else x[rows]))

    def put(self, rows, slots, y: torch.Tensor) -> None:
        """An expert's outputs y [len(rows), D] for those (token, slot) pairs."""
        if self.one:
            k = int(slots[0])
            self.parts[k] = y[0].float().numpy() * self.w[k]
            return
        if isinstance(rows, list):
            rows, slots = torch.tensor(rows), torch.tensor(slots)
        self.parts[rows, slots] = y * self.w[rows, slots, None]

    def add_group(self, experts: list, x: torch.Tensor, slots: list[int]) -> None:
        """One token (decode): experts [n] on x [1, D] in one ggml call (`run_group`); slots:
        the top-k slot each serves. The same sums as `add` for each, bit for bit."""
        # by layout, so that a layer's mix of precisions reuses few graphs
        keys = [e.layout for e in experts]
        order = sorted(range(len(experts)), key=keys.__getitem__)
        key = sum((keys[i] for i in order), ())
        y = run_group([experts[i] for i in order], x, key, copy=False)
        ks = [slots[i] for i in order]  # distinct: one token's top-k slots
        if self.one:
            self.parts[ks] = y * self.w[ks, None]
            return
        self.parts[0, ks] = torch.from_numpy(y).to(self.parts.dtype) * self.w[0, ks, None]

    def result(self) -> torch.Tensor:
        if self.one:  # rows added in slot order, as torch's sum over K
            return torch.from_numpy(np.add.reduce(self.parts, axis=0))[None]
        return self.parts.sum(dim=1)


def combine(x, ids, weights, expert: Callable[[int], Expert]) -> torch.Tensor:
    """Compute each selected expert on its tokens and sum the weighted outputs (one token's
    experts in one ggml call where they allow it)."""
    c = Combiner(x, weights)
    groups = [(expert(e), rows, slots) for e, rows, slots in group_rows(ids.tolist())]
    if x.shape[0] == 1 and groupable([g[0] for g in groups]):
        c.add_group([g[0] for g in groups], x, [g[2][0] for g in groups])
        return c.result()
    for e, rows, slots in groups:
        c.add(e, x, rows, slots)
    return c.result()


class ResidentExperts:
    """Every expert of every MoE layer held in memory at one precision (the `resident`
    baseline, and the reference the offloading backends must match token for token)."""

    def __init__(self, experts: dict[int, list[Expert]]):
        self.experts = experts
        self._uses = 0

    def forward(self, layer, x, ids, weights, defer: bool = False):
        self._uses += ids.numel()
        if defer:
            group = Group.of([self.experts[layer][e] for e in ids[0].tolist()])
            if group is not None:
                return group
        return combine(x, ids, weights, self.experts[layer].__getitem__)

    def new_sequence(self) -> None:
        pass

    def stats(self) -> dict:
        # Everything was read at load time; during generation every use is a hit.
        return {
            "hits": self._uses,
            "misses": 0,
            "hit_rate": 1.0,
            "bytes_read": 0,
            "io_wait_s": 0.0,
            "cache_bytes": self.nbytes,
        }

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for layer in self.experts.values() for e in layer)

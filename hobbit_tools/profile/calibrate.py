"""Running the model on calibration text one layer at a time, to learn how it routes.

Nothing here holds more than one expert at each precision: `walk` pushes every window of
tokens through layer 1, then layer 2, ... (the residual of every token is what is kept
between layers), and each MoE layer's experts are read through the runtime's `ExpertStore`
one after the other into one reused slot per precision, computed on every token routed to
them, and released. Each (token, slot) is computed at exactly the precision a
`PrecisionRule` gives it, as if every expert were a cache miss: the worst case for accuracy,
so thresholds fitted with it hold whatever the cache happens to contain.

An `Observer` records, in the same pass: routing, next-layer prediction recall, each
expert's low-vs-high error, and per (token, slot) the error its low copy and its skipping
would add, from which the fit (`fit.expert_tables`) prices every expert's thresholds
without running them.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..runtime import ggml
from ..runtime.budget import trim
from ..runtime.experts import Combiner, dispatch
from ..runtime.precision import HIGH, LOW, SKIP, PrecisionRule, skip_weights, unimportance
from ..runtime.store import ExpertStore, SlotArena

LOGIT_ROWS = 32


@dataclass
class Windows:
    """Token windows scored from an empty cache: inputs, the next tokens as targets, and
    the calibration part each came from."""

    inputs: list[list[int]]
    targets: list[list[int]]
    parts: list[int] = field(default_factory=list)

    @classmethod
    def cut(cls, parts: list[list[int]], window: int) -> Windows:
        """Each part's tokens cut into scored windows of `window` inputs (the last may be
        shorter); no window spans two parts."""
        ins, tgts, idx = [], [], []
        for i, ids in enumerate(parts):
            for start in range(0, len(ids) - 1, window):
                chunk = ids[start : start + window + 1]
                if len(chunk) < 2:
                    break
                ins.append(chunk[:-1])
                tgts.append(chunk[1:])
                idx.append(i)
        return cls(ins, tgts, idx)

    def __add__(self, other: Windows) -> Windows:
        return Windows(
            self.inputs + other.inputs, self.targets + other.targets, self.parts + other.parts
        )

    def select(self, keep: list[int]) -> Windows:
        return Windows(
            [self.inputs[i] for i in keep],
            [self.targets[i] for i in keep],
            [self.parts[i] for i in keep],
        )

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.inputs)


class LayerExperts:
    """The ExpertBackend of a layer-by-layer pass: each routed expert read into this
    precision's one slot, computed on its tokens at the rule's level, then let go."""

    def __init__(self, store: ExpertStore, rule: PrecisionRule | None, observer=None):
        self.store, self.rule, self.observer = store, rule, observer
        self.slots: dict[str, SlotArena] = {}  # per precision, made at its first read
        self.resid_norm: torch.Tensor | None = None  # [T] residual norms, for the observer

    def expert(self, layer: int, e: int, precision: str):
        slot = self.slots.get(precision)
        if slot is None:
            slot = self.slots[precision] = SlotArena(self.store.p[precision].slot_bytes, 1)
        return self.store.read(layer, e, precision, slot.view(0))

    def release(self) -> None:
        """Free the slots and the store's idle read buffers: an expert per precision and
        its staging (~36 MiB of Q8_0 on a 1024x3584 model), which the profile's decodes
        under a memory limit need (measured: without this, 9 MiB was left for their cache
        inside 380 MiB, below one layer's working minimum)."""
        self.slots.clear()
        self.store.staging.clear()

    def forward(self, layer, x, ids, weights):
        if self.observer is not None:
            return self.observer.forward(self, layer, x, ids, weights)
        level = (
            torch.zeros_like(ids) if self.rule is None else self.rule.levels(layer, ids, weights)
        )
        if bool((level == SKIP).any()):
            weights = skip_weights(weights, level == SKIP, "drop")
        out = Combiner(x, weights)
        for e, rows, slots in dispatch(ids):
            lv = level[rows, slots]
            for want, name in ((HIGH, "high"), (LOW, "low")):
                sel = lv == want
                if bool(sel.any()):
                    out.add(self.expert(layer, e, name), x, rows[sel], slots[sel])
        return out.result()

    def new_sequence(self) -> None:
        pass


def walk(model, windows: Windows, backend: LayerExperts, label: str = "") -> list[torch.Tensor]:
    """Every window through every layer, one layer at a time; the final residuals [T, D]
    per window. Attention runs per window (each from position 0, its own KV), the FFN on
    all windows' tokens stacked."""
    model.experts = backend
    hs = [model.embed(torch.tensor(w)) for w in windows.inputs]
    sizes = [len(w) for w in windows.inputs]
    bar = tqdm(
        range(len(model.w.layers)), desc=label, unit="layer", disable=not sys.stderr.isatty()
    )
    try:
        with torch.inference_mode():
            for i in bar:
                hs = [model.attention_step(i, h, 0, *model.rope(0, len(h))) for h in hs]
                h = torch.cat(hs)
                backend.resid_norm = h.float().norm(dim=-1)
                hs = list(model.ffn_step(i, h).split(sizes))
    finally:
        model.experts = None
        backend.release()
        ggml.drop_scratch()
        trim()
    return hs


def part_ppl(model, windows: Windows, hs: list[torch.Tensor]) -> dict[int, float]:
    """Per part: exp(mean NLL) of its windows' targets from their final residuals."""
    nll: dict[int, list[float]] = {}
    with torch.inference_mode():
        for h, target, part in zip(hs, windows.targets, windows.parts, strict=True):
            acc = nll.setdefault(part, [0.0, 0])
            # a few rows at a time: a window's [T, vocab] float32 logits would be the
            # largest allocation of the whole profile (512 x 32k: 64 MiB, twice over)
            for start in range(0, len(target), LOGIT_ROWS):
                rows = slice(start, start + LOGIT_ROWS)
                acc[0] += float(
                    torch.nn.functional.cross_entropy(
                        model.logits(h[rows]), torch.tensor(target[rows]), reduction="sum"
                    )
                )
            acc[1] += len(target)
    return {part: math.exp(v / n) for part, (v, n) in sorted(nll.items())}


@dataclass
class Observer:
    """What an all-high pass records on the fitting tokens, rows [0, n_fit) of each layer's
    input (the rest, held-out tokens, are only computed): routing, prediction recall, each
    expert's low-vs-high error, and per (token, slot) the error its low copy and its
    skipping would add, relative to the token's residual."""

    n_fit: int
    router_view: object | None = None  # RouterView, for prediction recall
    max_depth: int = 3
    ids: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [T, K]
    weights: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [T, K]
    sensitivity: dict[int, list[float]] = field(default_factory=dict)
    e_low: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [T, K]
    e_skip: dict[int, torch.Tensor] = field(default_factory=dict)
    _predicted: dict[int, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)
    _hits: dict[int, list[int]] = field(default_factory=dict)

    def forward(self, backend: LayerExperts, layer, x, ids, weights):
        """All-high outputs; with a low shard, also each fitting (token, slot)'s low output."""
        n = self.n_fit
        self._recall(layer, x[:n], ids[:n])
        self.ids[layer] = ids[:n].clone()
        self.weights[layer] = weights[:n].clone()
        has_low = "low" in backend.store.p
        out = Combiner(x, weights)
        d_low = torch.zeros(ids.shape, dtype=torch.float32)
        size = torch.zeros(ids.shape, dtype=torch.float32)
        err = [float("nan")] * backend.store.files.config.num_experts
        for e, rows, slots in dispatch(ids):
            hi_out = backend.expert(layer, e, "high")(x[rows])
            out.put(rows, slots, hi_out)
            size[rows, slots] = hi_out.float().norm(dim=-1)
            fit = (rows < n).nonzero().flatten()
            if not has_low or len(fit) == 0:
                continue
            lo_out = backend.expert(layer, e, "low")(x[rows[fit]]).float()
            hi = hi_out[fit].float()
            diff = lo_out - hi
            d_low[rows[fit], slots[fit]] = diff.norm(dim=-1)
            err[e] = float(diff.norm() / hi.norm().clamp_min(1e-12))
        if has_low:
            self.sensitivity[layer] = err
        # relative to the residual: what dropping a slot, or taking its low copy, moves
        scale = weights.float() / backend.resid_norm[:, None].clamp_min(1e-12)
        self.e_low[layer] = (d_low * scale)[:n]
        self.e_skip[layer] = (size * scale)[:n]
        return out.result()

    def stats(self) -> dict[int, tuple[torch.Tensor, ...]]:
        """layer -> (ids, weights, e_low, e_skip) over the fitting tokens, for the fit."""
        return {
            layer: (self.ids[layer], self.weights[layer], self.e_low[layer], self.e_skip[layer])
            for layer in self.ids
        }

    def _recall(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> None:
        for d, p_ids in self._predicted.pop(layer, []):
            hit = self._hits.setdefault(d, [0, 0])
            hit[0] += sum(
                len(set(p) & set(a)) for p, a in zip(p_ids.tolist(), ids.tolist(), strict=True)
            )
            hit[1] += ids.numel()
        if self.router_view is None:
            return
        xr = x.to(self.router_view.stacked.dtype)
        for d, (target, p_ids, _) in enumerate(
            self.router_view.predict(layer, xr, self.max_depth), 1
        ):
            self._predicted.setdefault(target, []).append((d, p_ids))

    def recall(self) -> dict[int, float]:
        """Share of each layer's selected experts that the gate of that layer, fed the gate
        input of the layer d MoE layers before, predicts (top-k sets, per token)."""
        return {d: h / n for d, (h, n) in sorted(self._hits.items()) if n}


def score_histogram(weights: dict[int, torch.Tensor], bins: int = 10) -> dict[int, list[int]]:
    """Per layer: how the unimportance scores of selected experts spread over [0, 1]."""
    out = {}
    for layer in sorted(weights):
        s = unimportance(weights[layer]).flatten()
        out[layer] = torch.histc(s, bins=bins, min=0.0, max=1.0).int().tolist()
    return out

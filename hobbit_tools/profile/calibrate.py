"""Running the model on calibration text to learn how it routes.

`CalibrationExperts` is an ExpertBackend with every expert resident at both precisions. It
records each layer's routing (ids, weights) and samples the inputs each expert sees, and it
computes every (token, slot) at exactly the precision a `PrecisionRule` gives it, as if every
expert were a cache miss: the worst case for accuracy, so thresholds fitted with it hold
whatever the cache happens to contain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..runtime.experts import Combiner, Expert, dispatch
from ..runtime.precision import HIGH, LOW, SKIP, PrecisionRule, skip_weights


@dataclass
class RoutingLog:
    ids: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [T, K] chunks
    weights: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [T, D] chunks

    def cat(self, what: str, layer: int) -> torch.Tensor:
        return torch.cat(getattr(self, what)[layer])


class CalibrationExperts:
    def __init__(self, high: dict[int, list[Expert]], low: dict[int, list[Expert]] | None):
        self.high, self.low = high, low
        self.rule: PrecisionRule | None = None  # None: all high
        self.skip = "drop"
        self.log: RoutingLog | None = None

    def forward(self, layer, x, ids, weights):
        if self.log is not None:
            self.log.ids.setdefault(layer, []).append(ids.clone())
            self.log.weights.setdefault(layer, []).append(weights.clone())
            self.log.inputs.setdefault(layer, []).append(x.float().clone())
        level = (
            torch.zeros_like(ids) if self.rule is None else self.rule.levels(layer, ids, weights)
        )
        if bool((level == SKIP).any()):
            weights = skip_weights(weights, level == SKIP, self.skip)
        out = Combiner(x, weights)
        for e, rows, slots in dispatch(ids):
            lv = level[rows, slots]
            for want, bank in ((HIGH, self.high), (LOW, self.low)):
                sel = lv == want
                if bool(sel.any()):
                    out.add(bank[layer][e], x, rows[sel], slots[sel])
        return out.result()

    def new_sequence(self) -> None:
        pass

    def stats(self) -> dict:
        return {
            "hits": 0,
            "misses": 0,
            "hit_rate": 1.0,
            "bytes_read": 0,
            "io_wait_s": 0.0,
            "cache_bytes": 0,
        }


def sensitivity(
    cal: CalibrationExperts, log: RoutingLog, max_rows: int = 64
) -> dict[int, list[float]]:
    """Per layer and expert: relative output error of the low copy against the high one,
    ||low(x) - high(x)|| / ||high(x)||, on the inputs the expert really received."""
    out: dict[int, list[float]] = {}
    for layer in sorted(log.ids):
        ids, xs = log.cat("ids", layer), log.cat("inputs", layer)
        errors = []
        for e in range(len(cal.high[layer])):
            rows = (ids == e).any(dim=-1).nonzero().flatten()[:max_rows]
            if len(rows) == 0:
                errors.append(float("nan"))
                continue
            x = xs[rows].to(_dtype(cal.high[layer][e]))
            hi = cal.high[layer][e](x).float()
            lo = cal.low[layer][e](x).float()
            errors.append(float((lo - hi).norm() / hi.norm().clamp_min(1e-12)))
        out[layer] = errors
    return out


def prediction_recall(log: RoutingLog, router_view, max_depth: int) -> dict[int, float]:
    """Share of each layer's selected experts that the gate of that layer, fed the gate input
    of the layer d MoE layers before, predicts (top-k sets, per token)."""
    layers = sorted(log.ids)
    hits = {d: [0, 0] for d in range(1, max_depth + 1)}
    for layer in layers:
        x = log.cat("inputs", layer)
        for d, (target, ids, _) in enumerate(
            router_view.predict(layer, x.to(router_view.stacked.dtype), max_depth), 1
        ):
            actual = log.cat("ids", target)
            for p_row, a_row in zip(ids.tolist(), actual.tolist(), strict=True):
                hits[d][0] += len(set(p_row) & set(a_row))
                hits[d][1] += len(a_row)
    return {d: h / n for d, (h, n) in hits.items() if n}


def score_histogram(log: RoutingLog, bins: int = 10) -> dict[int, list[int]]:
    """Per layer: how the unimportance scores of selected experts spread over [0, 1]."""
    from ..runtime.precision import unimportance

    out = {}
    for layer in sorted(log.weights):
        s = unimportance(log.cat("weights", layer)).flatten()
        out[layer] = torch.histc(s, bins=bins, min=0.0, max=1.0).int().tolist()
    return out


def _dtype(expert: Expert) -> torch.dtype:
    if getattr(expert, "dtype", None) is not None:
        return expert.dtype
    return getattr(getattr(expert, "gate", None), "dtype", torch.float32)

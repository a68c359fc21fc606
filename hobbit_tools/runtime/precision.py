"""Token-level dynamic precision (HOBBIT technique 1): which copy of a cache-miss expert to
load for a token, or whether to skip it.

The unimportance score of a token's i-th most important selected expert is the routing mass
of the experts ranked above it: s_0 = 0, s_i = w_0 + ... + w_{i-1} (weights normalised to sum
1). On a miss: s < T1 loads the high-precision copy, T1 <= s <= T2 the low one, s > T2 skips
the expert. A token's top-1 expert (s = 0) is therefore high for any T1 > 0, as in the paper;
T1 = 0 sends even the top-1 to the low copy, a choice `hobbit profile` makes per expert where
its measured low-precision error is small enough. A T1 >= 1 keeps everything high. Thresholds
are global, per layer ([L]) or per expert ([L, E]); `hobbit profile` fits them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HIGH, LOW, SKIP = 0, 1, 2
LEVEL_NAMES = ("high", "low", "skip")


def unimportance(weights: torch.Tensor) -> torch.Tensor:
    """weights [T, K] -> s [T, K], in the same slot order."""
    w = weights.float()
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    sorted_w, order = torch.sort(w, dim=-1, descending=True, stable=True)
    s_sorted = sorted_w.cumsum(-1) - sorted_w
    return torch.empty_like(s_sorted).scatter_(-1, order, s_sorted)


def unimportance_row(weights: list[float]) -> list[float]:
    """`unimportance` of one token's weights, as a list (ties ranked by slot, as there)."""
    total = sum(weights) or 1e-12
    s, acc = [0.0] * len(weights), 0.0
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):
        s[i] = acc / total
        acc += weights[i]
    return s


@dataclass
class PrecisionRule:
    """Thresholds T1 <= T2 as floats, [L] or [L, E] tensors."""

    t1: float | torch.Tensor = 0.6  # the paper's Mixtral values, until profiled
    t2: float | torch.Tensor = 0.9

    def levels(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """ids, weights [T, K] -> level per slot [T, K]: HIGH, LOW or SKIP."""
        s = unimportance(weights)
        t1, t2 = self._at(self.t1, layer, ids), self._at(self.t2, layer, ids)
        level = torch.full_like(ids, LOW)
        level[s < t1] = HIGH
        level[s > t2] = SKIP
        return level

    def row(self, layer: int, ids: list[int], weights: list[float]) -> tuple[list[int], list[bool]]:
        """`levels` for one token on Python lists (the decode path: no tensor ops), and which
        slot is the token's top-1 (s = 0). Scores in float64, so a score within float32
        rounding of a threshold may fall on the other side than in `levels`."""
        s = unimportance_row(weights)
        t1, t2 = self._py()
        out = []
        for e, si in zip(ids, s, strict=True):
            out.append(
                HIGH if si < _pick(t1, layer, e) else SKIP if si > _pick(t2, layer, e) else LOW
            )
        return out, [si == 0.0 for si in s]

    def _py(self):
        """The thresholds as Python floats / nested lists (a threshold >= 1 as infinity)."""
        cached = getattr(self, "_py_cache", None)
        if cached is None:

            def conv(t):
                if isinstance(t, torch.Tensor):
                    t = t.tolist()
                if isinstance(t, list):
                    return [conv(v) for v in t]
                return math.inf if float(t) >= 1.0 else float(t)

            cached = self._py_cache = (conv(self.t1), conv(self.t2))
        return cached

    @staticmethod
    def _at(t, layer: int, ids: torch.Tensor):
        # A threshold of 1 admits everything (s < 1 always), whatever rounding does to s.
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return math.inf if float(t) >= 1.0 else float(t)
        if t.dim() == 1:
            return math.inf if float(t[layer]) >= 1.0 else float(t[layer])
        t = t[layer][ids]
        return torch.where(t >= 1.0, torch.full_like(t, math.inf), t)


def _pick(t, layer: int, e: int) -> float:
    """A threshold from `PrecisionRule._py`'s form: global, per layer or per expert."""
    if isinstance(t, float):
        return t
    return t[layer] if isinstance(t[layer], float) else t[layer][e]


def skip_weights(weights: torch.Tensor, skipped: torch.Tensor, mode: str = "drop") -> torch.Tensor:
    """The combine weights [T, K] with the `skipped` slots contributing nothing: dropped, or
    with mode "renormalize" the kept ones scaled up to the full routing mass."""
    kept = weights.masked_fill(skipped, 0.0)
    if mode == "renormalize":
        kept = kept * (weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1e-12))
    return kept


ALL_HIGH = PrecisionRule(t1=float("inf"), t2=float("inf"))


def serve_from(has_high: bool, has_low: bool, want: int, has_top1: bool) -> str | None:
    """Which cached copy serves a lookup, or None for a miss. The high copy always serves;
    the low one serves unless a token wants high precision for its top-1 expert (the paper
    keeps every token's top-1 expert at high precision)."""
    if has_high:
        return "high"
    if has_low and (want == LOW or not has_top1):
        return "low"
    return None

"""Routers: gate logits -> (expert ids, combine weights), each family's exact function.

All take logits [T, E] and return ids [T, K] (int64) and weights [T, K] (float32). Softmax
routers return ids by descending weight; sparsemixer in pick order (its second weight can be
the larger).
"""

from __future__ import annotations

import torch


def softmax_topk(
    logits: torch.Tensor, k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def sparsemixer(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-MoE's inference-time sparsemixer (top-2): each pick is the softmax weight of the
    best remaining expert among those within a relative 2*eps margin of it."""
    scores = logits.float()
    picks, weights = [], []
    masked = scores
    for _ in range(2):
        top, idx = masked.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=top)
        outside = ((top - scores) / factor) > (2 * jitter_eps)
        gates = torch.softmax(masked.masked_fill(outside, float("-inf")), dim=-1)
        picks.append(idx)
        weights.append(gates.gather(-1, idx))
        masked = masked.scatter(-1, idx, float("-inf"))
    return torch.cat(picks, dim=-1), torch.cat(weights, dim=-1)

"""Routers: gate logits -> (expert ids, combine weights), each family's exact function.

All take logits [T, E] and return ids [T, K] (int64) and weights [T, K] (float32). Softmax
routers return ids by descending weight; sparsemixer in pick order (its second weight can be
the larger); DeepSeek's grouped routers by descending choice score.
"""

from __future__ import annotations

import torch

from ..families import GroupedRouting


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


def grouped_topk(
    logits: torch.Tensor, k: int, r: GroupedRouting, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's routers (transformers' DeepseekV2/V3TopkRouter). V2 scores by softmax and
    keeps its greedy or group-limited top-k; V3 (noaux_tc) scores by sigmoid, chooses by
    score + correction `bias` [E] within the groups with the best two-expert sums, and
    combines with the unbiased scores. Weights are times routed_scaling_factor; ids in
    descending order of the choice."""
    logits = logits.float()
    sigmoid = r.method == "noaux_tc"
    scores = logits.sigmoid() if sigmoid else torch.softmax(logits, dim=-1)
    choice = scores + bias if sigmoid and bias is not None else scores
    if r.method != "greedy":
        groups = choice.view(*choice.shape[:-1], r.n_group, -1)  # [T, G, E/G]
        if sigmoid:
            group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = groups.max(dim=-1).values
        keep = torch.topk(group_scores, r.topk_group, dim=-1).indices  # [T, topk_group]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, keep, True)
        # V3 masks with -inf (biased scores may be negative), V2 with 0 (softmax is positive)
        fill = float("-inf") if sigmoid else 0.0
        choice = groups.masked_fill(~mask[..., None], fill).flatten(-2)
    top, ids = torch.topk(choice, k, dim=-1)
    weights = scores.gather(-1, ids) if sigmoid else top
    if r.normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * r.scale

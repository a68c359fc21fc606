"""Fitting the runtime's knobs from measurements, instead of setting them by hand.

Pure functions over callables and traces, so each is testable on synthetic data:
- thresholds: the (T1, T2) with the lowest expected load cost whose perplexity stays within
  the budget over all-high, ranked by a cheap error estimate and confirmed by few runs;
- cache: the eviction policy, HOBBIT's priority weights and the high/low split with the
  lowest miss penalty on a replayed routing trace;
- prefetch depth: the deepest look-ahead whose prediction recall is still worth a read.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import torch

from ..runtime.precision import LOW, SKIP, PrecisionRule
from ..runtime.replay import Requests, replay, requests

# finer above 0.5, where the scores of every expert after a top-2 model's first one lie
T_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


def expected_cost(weights_by_layer: dict[int, torch.Tensor], cost: dict[str, float]) -> Callable:
    """Mean cost per (token, layer) of loading every selected expert at the level a rule
    gives it (as if all were misses); cost per level name: e.g. seconds to read + compute."""

    def f(t1: float, t2: float) -> float:
        rule, total, n = PrecisionRule(t1, t2), 0.0, 0
        for layer, w in weights_by_layer.items():
            ids = torch.zeros_like(w, dtype=torch.long)
            lv = rule.levels(layer, ids, w)
            total += cost["high"] * float((lv == 0).sum()) + cost["low"] * float((lv == LOW).sum())
            total += cost.get("skip", 0.0) * float((lv == SKIP).sum())
            n += w.shape[0]
        return total / max(n, 1)

    return f


def fit_thresholds(
    evaluate: Callable[[float, float], float],
    cost: Callable[[float, float], float],
    proxy: Callable[[float, float], float],
    base_ppl: float,
    budget: float = 0.01,
    grid: tuple[float, ...] = T_GRID,
    max_evals: int = 8,
) -> dict:
    """Cheapest (T1, T2) with evaluate(T1, T2) <= base_ppl * (1 + budget), evaluating few.

    `proxy` is a cheap estimate of the error a pair adds, rising with perplexity. Only the
    pairs no cheaper pair beats on it can be the answer (a cheaper pair with less error
    would meet the budget first): along that front, cost rises while the error falls, so
    the budget is met from some point on, found by bisection with `evaluate` (the end-to-end
    check) in about log2(front) runs. T2 = 1.0 never skips (unimportance is always below 1)
    and T1 = T2 = 1.0 is all-high, which meets the budget by definition."""
    candidates = sorted(
        ((t1, t2) for t1 in grid for t2 in grid if t2 >= t1 and (t1, t2) != (1.0, 1.0)),
        key=lambda t: (cost(*t), -t[0], -t[1]),
    )
    front, least = [], math.inf
    for t in candidates:
        p = proxy(*t)
        if p < least:
            front.append((t, p))
            least = p
    limit = base_ppl * (1 + budget)
    tried: list[dict] = []
    lo, hi, best = -1, len(front), None  # front[lo] fails, front[hi] meets (len: all-high)
    while hi - lo > 1 and len(tried) < max_evals:
        mid = (lo + hi) // 2
        (t1, t2), p = front[mid]
        ppl = evaluate(t1, t2)
        tried.append({"t1": t1, "t2": t2, "ppl": ppl, "cost": cost(t1, t2), "proxy": p})
        if ppl <= limit:
            hi, best = mid, tried[-1]
        else:
            lo = mid
    common = {"limit": limit, "tried": tried, "candidates": len(candidates), "front": len(front)}
    if best is None:
        return {"t1": 1.0, "t2": 1.0, "ppl": base_ppl, "cost": cost(1.0, 1.0), **common}
    return {k: best[k] for k in ("t1", "t2", "ppl", "cost")} | common


def weight_grid(step: float = 0.2) -> list[tuple[float, float, float, float]]:
    """HOBBIT's (w_lru, w_lfu, w_lhu, w_fld) on the simplex, in steps of `step`."""
    n = round(1 / step)
    return [
        tuple(round(k * step, 6) for k in ks)
        for ks in itertools.product(range(n + 1), repeat=4)
        if sum(ks) == n
    ]


# parameterised policies the fit tries besides lru, lfu, lcu and HOBBIT's weight grid:
# (name, parameters); decay and forecast take a half-life in tokens
CANDIDATES = (
    ("layer-lfu", None),
    ("layer-lru", None),
    *(("decay", (h,)) for h in (4.0, 16.0, 64.0)),
    *(("forecast", (h,)) for h in (4.0, 8.0, 16.0, 32.0)),
)


def fit_cache(
    header: dict,
    records: list[dict] | Requests,
    memory: int | str,
    rule: PrecisionRule | None,
    low_shares: tuple[float, ...] = (0.15, 0.25, 0.35),
    step: float = 0.25,
    chunks: int = 8,
    z: float = 1.0,
) -> dict:
    """Policy, parameters and split for the trace: the better of lru and lfu (lowest miss
    penalty), unless a candidate beats it by more than its own noise. The trace is cut into
    `chunks` parts by tokens; a candidate's margin is the mean per-part penalty it saves
    over that baseline less z standard errors, and the largest positive margin wins. So the
    choice is never worse than lru or lfu on the trace it was fitted on, and a candidate
    that only won by luck on some parts of it does not replace them."""
    reqs = records if isinstance(records, Requests) else requests(header, records, rule)
    shares = low_shares if rule is not None else (0.0,)
    plain = [(p, None) for p in ("lru", "lfu", "lcu")] + list(CANDIDATES)
    grid = [("hobbit", w) for w in weight_grid(step)]
    bounds = np.unique([reqs.cut(k / chunks) for k in range(chunks)])
    results, parts, warning = [], [], None
    for share in shares:
        for policy, w in plain + grid:
            r = replay(
                header,
                reqs,
                memory=memory,
                cache_policy=policy,
                rule=rule,
                low_share=share,
                cache_weights=w,
                per_tick=True,
            )
            results.append({"cache_policy": policy, "weights": w, "low_share": share, **_brief(r)})
            parts.append(
                np.add.reduceat(r["per_tick_penalty"], bounds)
                if len(bounds)
                else r["per_tick_penalty"][:0]
            )
            warning = warning or r["cliff"]
    lru = min((r for r in results if r["cache_policy"] == "lru"), key=lambda r: r["miss_penalty"])
    base = min(
        (i for i, r in enumerate(results) if r["cache_policy"] in ("lru", "lfu")),
        key=lambda i: results[i]["miss_penalty"],
    )
    best, best_margin = base, 0.0
    for i, part in enumerate(parts):
        saved = parts[base] - part
        noise = saved.std(ddof=1) / np.sqrt(len(saved)) if len(saved) > 1 else 0.0
        margin = float(saved.mean() - z * noise) if len(saved) else 0.0
        if margin > best_margin:
            best, best_margin = i, margin
    chosen = {**results[best], "margin": best_margin, "baseline": results[base]["cache_policy"]}
    return {"best": chosen, "lru": lru, "candidates": len(results), "cliff": warning}


def fitted_replay(
    header: dict,
    records: list[dict] | Requests,
    memory: int | str,
    rule: PrecisionRule | None,
    split: float,
    step: float = 0.5,
) -> dict:
    """The cache fitted (`fit_cache`) on the part of the trace before `split`, then
    replayed over all of it and scored after: a fit judged on routing it has not seen."""
    reqs = records if isinstance(records, Requests) else requests(header, records, rule)
    fit = fit_cache(header, reqs.head(reqs.cut(split)), memory, rule, step=step)["best"]
    r = replay(
        header,
        reqs,
        memory=memory,
        cache_policy=fit["cache_policy"],
        rule=rule,
        low_share=fit["low_share"] or 0.25,
        cache_weights=fit["weights"],
        split=split,
    )
    return {**r, "cache_policy": "fitted", "fit": fit}


def held_out_summary(rows: list[dict]) -> list[dict]:
    """Per budget of replay rows with belady, lru, lfu and fitted: whether fitted is at
    least max(lru, lfu) and the share of the LRU-to-Belady hit-rate gap it closes."""
    by: dict = {}
    for r in rows:
        by.setdefault(r["memory"], {})[r["cache_policy"]] = r["hit_rate"]
    out = []
    for memory, h in by.items():
        if not {"belady", "lru", "lfu", "fitted"} <= set(h):
            continue
        gap = h["belady"] - h["lru"]
        out.append(
            {
                "memory": memory,
                "fitted_at_least_lru_lfu": h["fitted"] >= max(h["lru"], h["lfu"]),
                "gap_closed": (h["fitted"] - h["lru"]) / gap if gap > 0 else None,
            }
        )
    return out


def _brief(r: dict) -> dict:
    return {k: r[k] for k in ("miss_penalty", "hit_rate", "bytes_read")}


def fit_prefetch_depth(
    recall: dict[int, float], min_recall: float = 0.6, max_depth: int = 3
) -> int:
    """Deepest look-ahead (up to max_depth) whose recall stays >= min_recall: a prefetch that
    is right less often than that costs more reads than the misses it saves."""
    depth = 0
    for d in range(1, max_depth + 1):
        if recall.get(d, 0.0) >= min_recall:
            depth = d
        else:
            break
    return depth

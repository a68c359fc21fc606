"""Fitting the runtime's knobs from measurements, instead of setting them by hand.

Pure functions over callables and traces, so each is testable on synthetic data:
- thresholds, per layer and expert: each expert's (T1, T2) priced by what it would cost to
  load and the error it would add (both measured, weighted by how often it is selected);
  a front of assignments from cheapest to all-high, bisected with end-to-end runs;
- cache: the eviction policy, HOBBIT's priority weights and the high/low split with the
  lowest miss penalty on a replayed routing trace;
- prefetch depth: the deepest look-ahead whose prediction recall is still worth a read.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..runtime.policies import Forecast
from ..runtime.precision import PrecisionRule, unimportance
from ..runtime.replay import Requests, replay, requests

# finer above 0.5, where the scores of every expert after a top-2 model's first one lie
T_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


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


# shares of the budget for low copies the cache fit tries (a rule that serves most selections
# low, as one with T1 = 0 for many experts does, wants the larger ones)
LOW_SHARES = (0.15, 0.25, 0.35, 0.5, 0.65)


# the safe choices: the fit keeps the best of these on the part it saw unless a candidate
# beats it by more than its noise
BASELINES = (("lru", None), ("lfu", None), ("forecast", (Forecast.DEFAULT_HALF_LIFE,)))


def fit_cache(
    header: dict,
    records: list[dict] | Requests,
    memory: int | str,
    rule: PrecisionRule | None,
    low_shares: tuple[float, ...] = LOW_SHARES,
    step: float = 0.25,
    chunks: int = 8,
    z: float = 1.0,
) -> dict:
    """Policy, parameters and split for the trace: every candidate (`cache_candidates`)
    replayed over it, then chosen by `choose_cache`."""
    reqs = records if isinstance(records, Requests) else requests(header, records, rule)
    runs = cache_runs(header, reqs, memory, rule, low_shares, step)
    best, base, margin = choose_cache(runs, reqs, len(reqs.ticks), chunks, z)
    lru = min(
        (r for r in runs if r["cache_policy"] == "lru"), key=lambda r: r["run"]["miss_penalty"]
    )
    return {
        "best": {
            **_brief(runs[best]),
            "margin": margin,
            "baseline": runs[base]["cache_policy"],
        },
        "lru": _brief(lru),
        "candidates": len(runs),
        "cliff": runs[0]["run"]["cliff"],
    }


def cache_candidates(step: float) -> list[tuple[str, tuple | None]]:
    """(policy, parameters): lru, lfu, lcu, the parameterised CANDIDATES and HOBBIT's
    weights on the simplex in steps of `step`."""
    return (
        [(p, None) for p in ("lru", "lfu", "lcu")]
        + list(CANDIDATES)
        + [("hobbit", w) for w in weight_grid(step)]
    )


def cache_runs(
    header: dict,
    reqs: Requests,
    memory: int | str,
    rule: PrecisionRule | None,
    low_shares: tuple[float, ...] = LOW_SHARES,
    step: float = 0.25,
) -> list[dict]:
    """Every candidate (and low share, with a rule) replayed over the trace, with each
    tick's miss penalty: what `choose_cache` decides from, on any prefix of the ticks (a
    cache's decisions on a prefix do not depend on what follows it)."""
    shares = low_shares if rule is not None else (0.0,)
    return [
        {
            "cache_policy": policy,
            "weights": w,
            "low_share": share,
            "run": replay(
                header,
                reqs,
                memory=memory,
                cache_policy=policy,
                rule=rule,
                low_share=share,
                cache_weights=w,
                per_tick=True,
            ),
        }
        for share in shares
        for policy, w in cache_candidates(step)
    ]


def choose_cache(
    runs: list[dict], reqs: Requests, ticks: int, chunks: int = 8, z: float = 1.0
) -> tuple[int, int, float]:
    """(chosen, baseline, margin): indices into runs, judged on their first `ticks` ticks.
    The baseline is the best of BASELINES (lowest miss penalty); a candidate replaces it
    only by beating it by more than its own noise: the part of `ticks` is cut into `chunks`
    by tokens, a candidate's margin is the mean per-chunk penalty it saves over the
    baseline less z standard errors, and the largest positive margin wins. So the choice is
    never worse than lru, lfu or forecast on the ticks it saw, and a candidate that only won
    by luck on some chunks does not replace them."""
    head = reqs.head(ticks)
    bounds = np.unique([head.cut(k / chunks) for k in range(chunks)])
    pens = [r["run"]["per_tick_penalty"][:ticks] for r in runs]
    base = min(
        (i for i, r in enumerate(runs) if (r["cache_policy"], r["weights"]) in BASELINES),
        key=lambda i: pens[i].sum(),
    )
    best, best_margin = base, 0.0
    for i, pen in enumerate(pens):
        saved = np.add.reduceat(pens[base] - pen, bounds) if len(bounds) else pen[:0]
        noise = saved.std(ddof=1) / np.sqrt(len(saved)) if len(saved) > 1 else 0.0
        margin = float(saved.mean() - z * noise) if len(saved) else 0.0
        if margin > best_margin:
            best, best_margin = i, margin
    return best, base, best_margin


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


def _brief(run: dict) -> dict:
    """A candidate's parameters and its run's totals."""
    r = run["run"]
    return {
        **{k: run[k] for k in ("cache_policy", "weights", "low_share")},
        **{k: r[k] for k in ("miss_penalty", "hit_rate", "bytes_read")},
    }


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


# --------------------------------------------------------------------------- per expert


@dataclass
class ExpertTables:
    """What each threshold pair would cost and add in error, per layer and expert.

    pairs [P] (t1, t2), all-high first; per MoE layer: cost [P, E] (load cost summed over
    the expert's selections, as if each were a miss), err [P, E] (the error estimate summed
    the same way, shrunk towards the layer's mean per selection) and n [E] (selections).
    """

    pairs: list[tuple[float, float]]
    cost: dict[int, torch.Tensor]
    err: dict[int, torch.Tensor]
    n: dict[int, torch.Tensor]
    tokens: int
    shape: tuple[int, int]  # [layers, experts] of the threshold tensors


def expert_tables(
    stats: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    level_cost: dict[str, float],
    shape: tuple[int, int],
    grid: tuple[float, ...] = T_GRID,
    shrink: float = 16.0,
    low: bool = True,
) -> ExpertTables:
    """stats: layer -> (ids, weights, e_low, e_skip), each [T, K] over the fitting tokens:
    the experts selected, their routing weights, and the error their low copy and their
    skipping would add (squared here). An expert selected n times has its error per
    selection averaged with its layer's, weighted n : shrink, so a rarely selected expert
    is judged mostly by its layer until it has been seen often. low=False: only pairs with
    T1 = T2 (no low band: where a low copy costs more than it saves)."""
    # T1 = 0: even the expert's top-1 selections go low (where its low error is small)
    firsts = (0.0, *grid) if low else grid
    pairs = sorted(
        ((a, b) for a in firsts for b in grid if (b > a and low) or b == a),
        key=lambda t: (-t[0], -t[1]),
    )
    cost, err, count, tokens = {}, {}, {}, 0
    for layer, (ids, weights, e_low, e_skip) in stats.items():
        s = unimportance(weights)
        e = shape[1]
        ids, lo2, sk2 = ids.flatten(), e_low.flatten().double() ** 2, e_skip.flatten().double() ** 2
        n = torch.zeros(e, dtype=torch.float64).index_add_(0, ids, torch.ones_like(lo2))
        c = torch.zeros(len(pairs), e, dtype=torch.float64)
        r = torch.zeros_like(c)
        s = s.flatten()
        for i, (a, b) in enumerate(pairs):
            high = s < (math.inf if a >= 1.0 else a)
            skip = s > (math.inf if b >= 1.0 else b)
            low_band = ~high & ~skip
            each = (
                level_cost["high"] * high
                + level_cost.get("low", 0.0) * low_band
                + level_cost.get("skip", 0.0) * skip
            )
            c[i].index_add_(0, ids, each.double())
            r[i].index_add_(0, ids, lo2 * low_band + sk2 * skip)
        pooled = r.sum(1, keepdim=True) / n.sum().clamp_min(1.0)  # [P, 1] per selection
        err[layer] = n * (r + shrink * pooled) / (n + shrink)
        cost[layer], count[layer] = c, n
        tokens = weights.shape[0]
    return ExpertTables(pairs, cost, err, count, tokens, shape)


def expert_choice(tables: ExpertTables, lam: float) -> dict:
    """Per expert the pair minimising cost + lam * err (ties to the safer, higher pair):
    the [L, E] thresholds, their total cost per token and error estimate."""
    t1 = torch.ones(tables.shape, dtype=torch.float32)
    t2 = torch.ones(tables.shape, dtype=torch.float32)
    pairs = torch.tensor(tables.pairs, dtype=torch.float32)
    total_cost = total_err = 0.0
    for layer, c in tables.cost.items():
        r = tables.err[layer]
        best = torch.argmin(c + lam * r, dim=0)  # [E]; argmin takes the first (safest) tie
        t1[layer], t2[layer] = pairs[best, 0], pairs[best, 1]
        cols = torch.arange(c.shape[1])
        total_cost += float(c[best, cols].sum())
        total_err += float(r[best, cols].sum())
    n = max(tables.tokens, 1)
    return {"t1": t1, "t2": t2, "cost": total_cost / n, "proxy": total_err / n, "lambda": lam}


def expert_front(tables: ExpertTables, points: int = 48) -> list[dict]:
    """Per-expert threshold choices from cheapest to all-high as the price of error, lam,
    rises over a log grid wide enough to span both ends: each point is the cheapest
    assignment for its error (the Lagrangian of the separable per-expert problem), so cost
    rises and the error estimate falls along the list. Duplicates dropped; all-high itself
    is not listed (it meets any budget)."""
    c_all = sum(float(c[0].sum()) for c in tables.cost.values())  # pair 0 is all-high
    e_all = sum(float(r.max(0).values.sum()) for r in tables.err.values())
    scale = c_all / e_all if e_all > 0 else 1.0
    front, seen = [], set()
    for lam in np.geomspace(scale * 1e-4, scale * 1e6, points):
        p = expert_choice(tables, float(lam))
        key = (p["t1"].numpy().tobytes(), p["t2"].numpy().tobytes())
        if key in seen or bool((p["t1"] >= 1.0).all() and (p["t2"] >= 1.0).all()):
            continue
        seen.add(key)
        front.append(p)
    front.sort(key=lambda p: (p["cost"], -p["proxy"]))
    return front


def bisect_front(
    front: list, meets: Callable[[object], tuple[bool, dict]], max_evals: int = 8
) -> tuple[int | None, list[dict]]:
    """The cheapest point of `front` (sorted by cost, error estimate falling) that `meets`
    the budget, found by bisection assuming the budget, once met, stays met further along:
    (its index, or None for all-high; what every call of `meets` reported)."""
    tried: list[dict] = []
    lo, hi, best = -1, len(front), None  # front[lo] fails, front[hi] meets (len: all-high)
    while hi - lo > 1 and len(tried) < max_evals:
        mid = (lo + hi) // 2
        ok, info = meets(front[mid])
        tried.append({"index": mid, "ok": ok, **info})
        if ok:
            hi, best = mid, mid
        else:
            lo = mid
    return best, tried


def spread(t1: torch.Tensor, t2: torch.Tensor, moe_layers: list[int]) -> dict:
    """Per MoE layer: min, median and max over experts of T1 and of T2."""

    def mmm(t):
        return [round(float(t.min()), 3), round(float(t.median()), 3), round(float(t.max()), 3)]

    return {layer: {"t1": mmm(t1[layer]), "t2": mmm(t2[layer])} for layer in moe_layers}

"""Is the fitted cache policy ever worse than lru or lfu on routing it was not fitted on?

For every trace, budget and split point: the fit (`choose_cache`, the rule `hobbit profile`
and `hobbit replay --split` use) decides on the ticks before the split, and the choice is
scored on the ticks after it against lru, lfu and Belady. Every candidate is replayed once
over the whole trace; a cache's decisions on a prefix do not depend on what follows it, so
each split reuses those runs.

    python scripts/fit_sweep.py TRACE:BUDGETS [TRACE:BUDGETS ...] [--splits 0.3,0.5,0.7]

e.g. `python scripts/fit_sweep.py ../shared/data/traces/qwen3-30b-a3b.route.csv:500MiB,3000MiB,4000MiB
demo.jsonl:15%,25%,40%,60%`. All experts at high precision; prints a row per case and,
per trace, the average share of the LRU-to-Belady gap the fitted choice closes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hobbit_tools.profile.fit import cache_runs, choose_cache
from hobbit_tools.runtime.replay import read_trace, replay, requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("traces", nargs="+", help="TRACE:BUDGET,BUDGET,...")
    ap.add_argument("--splits", default="0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--step", type=float, default=0.5, help="HOBBIT weight grid step")
    args = ap.parse_args()
    splits = [float(s) for s in args.splits.split(",")]
    start = time.perf_counter()
    print(
        f"{'trace':>24} {'split':>5} {'memory':>8} {'fitted':>26} {'misses':>7} "
        f"{'lru':>7} {'lfu':>7} {'belady':>7}  gap closed"
    )
    lost = cases = 0
    for arg in args.traces:
        path, budgets = arg.rsplit(":", 1)
        header, records = read_trace(path)
        reqs = requests(header, records, None)
        closed = []
        for memory in budgets.split(","):
            runs = cache_runs(header, reqs, memory, None, step=args.step)
            belady = replay(header, reqs, memory=memory, cache_policy="belady", per_tick=True)
            pens = [r["run"]["per_tick_penalty"] for r in runs]
            by = {(r["cache_policy"], r["weights"]): p for r, p in zip(runs, pens, strict=True)}
            for split in splits:
                n = reqs.cut(split)
                best, _, _ = choose_cache(runs, reqs, n)
                held = pens[best][n:].sum()
                lru, lfu = by[("lru", None)][n:].sum(), by[("lfu", None)][n:].sum()
                opt = belady["per_tick_penalty"][n:].sum()
                gap = (lru - held) / (lru - opt) if lru > opt else 0.0
                closed.append(gap)
                ok = held <= min(lru, lfu)
                lost += not ok
                cases += 1
                w = runs[best]["weights"]
                name = runs[best]["cache_policy"] + (f" {w}" if w else "")
                print(
                    f"{path[-24:]:>24} {split:5.2f} {memory:>8} {name:>26} {held:7.0f} "
                    f"{lru:7.0f} {lfu:7.0f} {opt:7.0f}  {gap:6.0%}{'' if ok else '  LOSES'}",
                    flush=True,
                )
        print(f"{path[-24:]:>24}: gap closed {np.mean(closed):.0%} on average")
    print(
        f"fitted worse than the better of lru and lfu in {lost} of {cases} cases "
        f"({time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()

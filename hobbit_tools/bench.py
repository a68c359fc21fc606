"""`hobbit bench`: policies side by side, in one process, on the same prompts.

Each run loads the model afresh (cold cache), generates from every prompt, and reports decode
tokens/s, prefill time, bytes read per decoded token and the hit rate; every run is also
given as a ratio to `lru` at the same budget. Reads bypass the page cache (O_DIRECT), so runs
do not warm each other up.
"""

from __future__ import annotations

import gc
import time

from .runtime import load

DEFAULT_PROMPTS = (
    "It was a dark and stormy night, and the rain fell in torrents",
    "The history of the world is the history of",
    "In the beginning of the year the king called his ministers together and said",
)


def bench(
    model_dir: str,
    memories: list[str],
    policies: list[str],
    *,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    max_new_tokens: int = 32,
    precision: str = "high",
    progress=None,
) -> dict:
    runs = []
    for memory in memories:
        for policy in policies:
            # resident and ondemand do not depend on the budget: run them once.
            if policy in ("resident", "ondemand") and any(r["policy"] == policy for r in runs):
                continue
            if progress:
                progress(f"{policy} @ {memory}")
            runs.append(_run(model_dir, memory, policy, prompts, max_new_tokens, precision))
    lru = {r["memory"]: r["decode_tokens_per_s"] for r in runs if r["policy"] == "lru"}
    for r in runs:
        base = lru.get(r["memory"])
        r["speedup_vs_lru"] = r["decode_tokens_per_s"] / base if base else None
    return {"model_dir": str(model_dir), "max_new_tokens": max_new_tokens, "runs": runs}


def _run(model_dir, memory, policy, prompts, max_new_tokens, precision) -> dict:
    t0 = time.perf_counter()
    rt = load(
        model_dir,
        precision=precision,
        memory=None if policy in ("resident", "ondemand") else memory,
        policy=policy,
        max_context=512,
    )
    load_s = time.perf_counter() - t0
    decode_tokens = decode_s = prefill_s = 0.0
    hits = misses = bytes_decode = io_wait = 0.0
    for prompt in prompts:
        g = rt.generate(prompt, max_new_tokens=max_new_tokens, stop_at_eos=False)
        s = g.stats
        steps = len(s["per_token"])
        decode_tokens += steps
        decode_s += s["decode_s"]
        prefill_s += s["prefill_s"]
        hits += s["hits"]
        misses += s["misses"]
        bytes_decode += s["decode_bytes_read_per_token"] * steps
        io_wait += s["io_wait_s"]
    info = rt.info
    if hasattr(rt.model.experts, "close"):
        rt.model.experts.close()
    del rt
    gc.collect()
    return {
        "policy": policy,
        "memory": "all" if policy == "resident" else ("top-k" if policy == "ondemand" else memory),
        "cache_bytes": info["cache_bytes"],
        "load_s": load_s,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s else 0.0,
        "prefill_s_per_prompt": prefill_s / len(prompts),
        "bytes_read_per_token": bytes_decode / decode_tokens if decode_tokens else 0.0,
        "hit_rate": hits / (hits + misses) if hits + misses else 1.0,
        "io_wait_s": io_wait,
        "peak_rss_bytes": s["peak_rss_bytes"],
    }


def format_table(result: dict) -> str:
    head = f"{'policy':<10} {'memory':>7} {'cache MiB':>9} {'decode tok/s':>12} {'vs lru':>6} {'MiB read/tok':>12} {'hit rate':>8} {'prefill s':>9}"
    lines = [head, "-" * len(head)]
    for r in result["runs"]:
        ratio = f"{r['speedup_vs_lru']:.2f}x" if r["speedup_vs_lru"] else "-"
        lines.append(
            f"{r['policy']:<10} {r['memory']:>7} {r['cache_bytes'] / 2**20:>9.0f} "
            f"{r['decode_tokens_per_s']:>12.2f} {ratio:>6} {r['bytes_read_per_token'] / 2**20:>12.1f} "
            f"{r['hit_rate']:>8.1%} {r['prefill_s_per_prompt']:>9.2f}"
        )
    return "\n".join(lines)

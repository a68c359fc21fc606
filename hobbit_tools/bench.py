"""`hobbit bench`: strategies side by side, in one process, on the same prompts.

Each run loads the model afresh (cold cache), generates from every prompt, and reports
decode tokens/s, prefill time, bytes read per decoded token, hit rate and the high/low/skip
shares (and, given a text, perplexity in decode mode); every run is also given as a ratio to
`lru` at the same budget. Reads bypass the page cache (O_DIRECT), so runs do not warm each
other up. The bound is what this machine could do if every byte read overlapped perfectly
with compute: 1 / max(bytes per token / direct-read bandwidth, compute per token), the
compute being resident's in the same bench (or the run's own where it computes less: low
precision, skips); each run's share of its bound is reported, and its time per token outside
I/O waits against resident's: what the cache's control plane costs.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

from . import validate
from .runtime import load, strategy

DEFAULT_PROMPTS = (
    "It was a dark and stormy night, and the rain fell in torrents",
    "The history of the world is the history of",
    "In the beginning of the year the king called his ministers together and said",
)
BUDGET_FREE = ("resident", "ondemand")  # strategies whose memory does not depend on --memory


def bench(
    model_dir: str,
    memories: list[str],
    policies: list[str],
    *,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    max_new_tokens: int = 32,
    precision: str = "high",
    ppl_text: str | None = None,
    ppl_tokens: int = 512,
    repeat: int = 1,
    baseline: str | None = None,
    progress=None,
) -> dict:
    validate.bounded("--repeat", repeat, 1, integer=True)
    validate.bounded("--ppl-tokens", ppl_tokens, 2, integer=True)
    text = validate.utf8_text(ppl_text, "perplexity text") if ppl_text else None
    # every repeat runs the whole list again, interleaved, so that a slow spell of a shared
    # machine hits all strategies alike; perplexity is deterministic and scored once
    reps: list[list[dict]] = []
    for rep in range(repeat):
        runs = []
        for memory in memories:
            for policy in policies:
                if policy in BUDGET_FREE and any(r["policy"] == policy for r in runs):
                    continue
                if progress:
                    progress(
                        f"{policy} @ {memory}" + (f" (repeat {rep + 1})" if repeat > 1 else "")
                    )
                runs.append(
                    _run(
                        model_dir,
                        memory,
                        policy,
                        prompts,
                        max_new_tokens,
                        precision,
                        text if rep == 0 else None,
                        ppl_tokens,
                    )
                )
        lru = {r["memory"]: r["decode_tokens_per_s"] for r in runs if r["policy"] == "lru"}
        for r in runs:
            base = lru.get(r["memory"])
            r["speedup_vs_lru"] = r["decode_tokens_per_s"] / base if base else None
        reps.append(runs)
    runs = reps[0]
    for i, r in enumerate(runs):  # the median of the repeats (vs lru: of the paired ratios)
        tps = [rs[i]["decode_tokens_per_s"] for rs in reps]
        r["decode_tokens_per_s_runs"] = tps
        r["decode_tokens_per_s"] = statistics.median(tps)
        if r["speedup_vs_lru"] is not None:
            r["speedup_vs_lru"] = statistics.median(rs[i]["speedup_vs_lru"] for rs in reps)
    probed = _direct_gbps(model_dir)
    gbps = _bandwidth(probed, runs)
    resident = next((r["compute_s_per_token"] for r in runs if r["policy"] == "resident"), None)
    # the compute a token needs: resident's, measured here (else the least any run showed;
    # runs on a shared machine are noisy upwards)
    compute = resident or min(
        (r["compute_s_per_token"] for r in runs if r["compute_s_per_token"]), default=None
    )
    for r in runs:
        own = r["compute_s_per_token"]
        # a run that computes less than resident (low precision, skips) is bound by its own
        r["bound_tokens_per_s"] = _bound(
            r["bytes_read_per_token"], gbps, min(own, compute) if own and compute else compute
        )
        b = r["bound_tokens_per_s"]
        r["share_of_bound"] = r["decode_tokens_per_s"] / b if b else None
        # the control plane's cost: time outside I/O waits against resident's (same kernels)
        r["outside_io_vs_resident"] = own / resident if own and resident else None
    offloaded = [r for r in runs if r["policy"] not in BUDGET_FREE]
    bound = max(
        (r["bound_tokens_per_s"] for r in offloaded if r["bound_tokens_per_s"]), default=None
    )
    llama = None
    if baseline == "llama.cpp":  # the same split, prompts and tokens; a child process
        from .llamacpp import measure
        from .runtime import ggml

        if progress:
            progress("llama.cpp on the same split")
        llama = measure(
            model_dir, prompts, max_new_tokens, threads=ggml.threads(), precision=precision
        )
        for r in runs:
            r["vs_llamacpp"] = r["decode_tokens_per_s"] / llama["decode_tokens_per_s"]
    return {
        "model_dir": str(model_dir),
        "llama.cpp": llama,
        "max_new_tokens": max_new_tokens,
        "prompts": len(prompts),
        "repeat": repeat,
        "direct_read_gbps": gbps,
        "direct_read_gbps_probed": probed,
        "compute_s_per_token": compute,
        "resident_compute_s_per_token": resident,
        "bound_tokens_per_s": bound,
        "runs": runs,
    }


def _bandwidth(probed: float | None, runs: list[dict]) -> float | None:
    """The read bandwidth the bound assumes: the probe's, or the fastest rate a run of this
    bench read at (bytes per token x tokens/s: the device did at least that) where that is
    more. A short probe on a shared disk can read low; a bound below what a run did is a
    wrong bound, not a fast run."""
    achieved = max(
        (r["bytes_read_per_token"] * r["decode_tokens_per_s"] / 1e9 for r in runs
         if r.get("bytes_read_per_token") and r.get("decode_tokens_per_s")),
        default=0.0,
    )  # fmt: skip
    if not probed:
        return achieved or None
    return max(probed, achieved)


def _bound(bytes_per_token: float, gbps: float | None, compute_s: float | None) -> float | None:
    if not gbps or compute_s is None:
        return None
    return 1.0 / max(bytes_per_token / (gbps * 1e9), compute_s)


def _direct_gbps(model_dir) -> float | None:
    from .profile.device import probe_reads
    from .shards import read_manifest

    m = read_manifest(Path(model_dir))
    shard = next(s["file"] for s in m["shards"] if s["role"] == "experts-high")
    probes, _ = probe_reads(
        Path(model_dir) / shard,
        request_sizes=(1 << 20, 8 << 20),
        queue_depths=(1, 2),
        total_bytes=64 << 20,
    )
    return max((p.gbps for p in probes), default=None)


def parse_policy(spec: str) -> dict:
    """A strategy name with optional switches, for ablations: "hobbit", "tuned", "hobbit:no-prefetch",
    "hobbit:no-dynamic-precision", "hobbit:cache=lru", "lru:prefetch=1", "hobbit:t1=0.4:t2=0.8",
    "hobbit:low-share=0.5", "lru:no-pack", "resident:kernel=torch" (joined by ':')."""
    name, *switches = spec.split(":")
    # "tuned": the config `hobbit profile` wrote next to the shards, at the bench's budget
    options: dict = {
        "policy": None if name == "tuned" else name,
        "config": name == "tuned" or False,
    }
    for sw in switches:
        if sw == "no-prefetch":
            options["prefetch_depth"] = 0
        elif sw == "no-dynamic-precision":
            options["dynamic_precision"] = False
        elif sw == "dynamic-precision":
            options["dynamic_precision"] = True
        elif sw.startswith("cache="):
            options["cache_policy"] = sw.removeprefix("cache=")
        elif sw.startswith("prefetch="):
            options["prefetch_depth"] = int(sw.removeprefix("prefetch="))
        elif sw.split("=")[0] in ("t1", "t2", "low-share") and name != "tuned":
            key, value = sw.split("=", 1)
            options.setdefault("overrides", {})[key.replace("-", "_")] = float(value)
        elif sw == "no-pack":
            options["packs"] = False
        elif sw in ("kernel=ggml", "kernel=torch"):
            options["kernels"] = sw.removeprefix("kernel=")
        elif sw in ("skip=drop", "skip=renormalize") and name != "tuned":
            options.setdefault("overrides", {})["skip"] = sw.removeprefix("skip=")
        else:
            from .errors import HobbitError

            raise HobbitError(
                f"unknown switch {sw!r} in policy {spec!r} (use no-prefetch, no-dynamic-precision, "
                "dynamic-precision, cache=NAME, prefetch=N, t1=X, t2=X, low-share=X, "
                "skip=drop|renormalize, no-pack, kernel=ggml|torch)"
            )
    return options


def _run(model_dir, memory, policy, prompts, max_new_tokens, precision, text, ppl_tokens) -> dict:
    t0 = time.perf_counter()
    options = parse_policy(policy)
    if "overrides" in options:  # thresholds etc.: build the strategy with every switch
        options["policy"] = strategy(
            options["policy"],
            **options.pop("overrides"),
            dynamic_precision=options.pop("dynamic_precision", None),
            prefetch_depth=options.pop("prefetch_depth", None),
            cache=options.pop("cache_policy", None),
        )
    rt = load(
        model_dir,
        precision=precision,
        memory=None if policy in BUDGET_FREE else memory,
        max_context=512,
        **options,
    )
    load_s = time.perf_counter() - t0
    decode_tokens = decode_s = prefill_s = decode_wait = 0.0
    hits = misses = bytes_decode = io_wait = 0.0
    served = {"high": 0, "low": 0, "skip": 0}
    for prompt in prompts:
        s = rt.generate(prompt, max_new_tokens=max_new_tokens, stop_at_eos=False).stats
        steps = len(s["per_token"])
        decode_tokens += steps
        decode_s += s["decode_s"]
        prefill_s += s["prefill_s"]
        hits += s["hits"]
        misses += s["misses"]
        bytes_decode += s["decode_bytes_read_per_token"] * steps
        io_wait += s["io_wait_s"]
        decode_wait += sum(t["io_wait_s"] for t in s["per_token"])
        for k, v in s.get("served", {}).items():
            served[k] += v
    last = s
    ppl = None
    if text is not None:
        from .evaluate import perplexity

        ppl = perplexity(rt, text, max_tokens=ppl_tokens, mode="decode")["ppl"]
    info = rt.info
    if hasattr(rt.model.experts, "close"):
        rt.model.experts.close()
    del rt
    gc.collect()
    total_served = sum(served.values())
    return {
        "policy": policy,
        "memory": "all" if policy == "resident" else ("top-k" if policy == "ondemand" else memory),
        "cache_bytes": info["cache_bytes"],
        "load_s": load_s,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s else 0.0,
        "prefill_s_per_prompt": prefill_s / len(prompts),
        "bytes_read_per_token": bytes_decode / decode_tokens if decode_tokens else 0.0,
        "hit_rate": hits / (hits + misses) if hits + misses else 1.0,
        "share": {k: v / total_served for k, v in served.items()} if total_served else None,
        "prefetch_recall": last.get("prefetch_recall"),
        "io_wait_s": io_wait,
        # decode time not spent waiting for reads: the compute a token costs in this run
        "compute_s_per_token": (decode_s - decode_wait) / decode_tokens if decode_tokens else None,
        "ppl": ppl,
        "peak_rss_bytes": last["peak_rss_bytes"],
    }


def format_table(result: dict) -> str:
    head = (
        f"{'policy':<13}{'memory':>7}{'cache MiB':>10}{'tok/s':>8}{'vs lru':>8}{'bound':>7}"
        f"{'of bound':>9}{'ctl':>6}{'MiB/tok':>9}{'hit rate':>9}{'high/low/skip':>15}"
        f"{'prefill s':>10}{'ppl':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in result["runs"]:
        ratio = f"{r['speedup_vs_lru']:.2f}x" if r["speedup_vs_lru"] else "-"
        bound = f"{r['bound_tokens_per_s']:.1f}" if r.get("bound_tokens_per_s") else "-"
        share = f"{r['share_of_bound']:.0%}" if r.get("share_of_bound") else "-"
        ctl = f"{r['outside_io_vs_resident']:.2f}" if r.get("outside_io_vs_resident") else "-"
        sh = r["share"]
        mix = f"{sh['high']:.0%}/{sh['low']:.0%}/{sh['skip']:.0%}" if sh else "-"
        ppl = f"{r['ppl']:.3f}" if r["ppl"] else "-"
        lines.append(
            f"{r['policy']:<13}{r['memory']:>7}{r['cache_bytes'] / 2**20:>10.1f}"
            f"{r['decode_tokens_per_s']:>8.2f}{ratio:>8}{bound:>7}{share:>9}{ctl:>6}"
            f"{r['bytes_read_per_token'] / 2**20:>9.2f}"
            f"{r['hit_rate']:>9.1%}{mix:>15}{r['prefill_s_per_prompt']:>10.2f}{ppl:>9}"
        )
    gbps, probed = result.get("direct_read_gbps"), result.get("direct_read_gbps_probed")
    lines.append("")
    if result.get("llama.cpp"):
        ll = result["llama.cpp"]
        vs = ", ".join(
            f"{r['policy']}@{r['memory']} {r['vs_llamacpp']:.2f}x" for r in result["runs"]
        )
        lines.append(
            f"llama.cpp on the same split ({ll['threads']} thread(s), mmap): decode "
            f"{ll['decode_tokens_per_s']:.2f} tok/s; hobbit / llama.cpp: {vs}"
        )
    if result.get("repeat", 1) > 1:
        lines.append(
            f"tok/s: median of {result['repeat']} interleaved repeats; vs lru: median of the "
            "ratios to lru within each repeat"
        )
    lines.append(
        f"direct-read bandwidth {gbps:.2f} GB/s"
        + (
            f" (the fastest a run read at; the probe read {probed:.2f})"
            if probed and gbps > probed
            else ""
        )
        + "; bound = perfect overlap of reads and compute "
        "(resident's compute per token, or the run's own where less); ctl = time per token "
        "outside I/O waits / resident's (the control plane's cost)"
        if gbps
        else "direct-read bandwidth unknown"
    )
    over = [r for r in result["runs"] if (r.get("share_of_bound") or 0) > 1.05]
    if over:
        lines.append(
            "faster than the bound: "
            + ", ".join(f"{r['policy']}@{r['memory']}" for r in over)
            + " (the bound's compute per token was measured high: a noisy machine)"
        )
    return "\n".join(lines)


def plot_runs(result: dict, path: str | Path) -> None:
    """Decode tokens/s against the budget, one line per strategy (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        from .errors import HobbitError

        raise HobbitError("--plot needs matplotlib: pip install 'hobbit-tools[plot]'") from e
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_policy: dict[str, list] = {}
    for r in result["runs"]:
        if r["policy"] in BUDGET_FREE:
            ax.axhline(r["decode_tokens_per_s"], ls="--", lw=1, color="grey")
            ax.text(
                0.01,
                r["decode_tokens_per_s"],
                f" {r['policy']}",
                va="bottom",
                transform=ax.get_yaxis_transform(),
            )
            continue
        by_policy.setdefault(r["policy"], []).append(
            (r["cache_bytes"] / 2**20, r["decode_tokens_per_s"])
        )
    for policy, points in by_policy.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
    ax.set_xlabel("expert cache budget (MiB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"hobbit bench: {Path(result['model_dir']).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

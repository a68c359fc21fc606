"""Micro-benchmark of the expert compute paths: `python -m hobbit_tools.quantize.kernel_bench`.

For one expert FFN (gate and up [ffn, hidden], down [hidden, ffn], y = down(silu(gate(x)) *
up(x))) per tensor type: compute time at T tokens relative to BF16, the `from_raw`
conversion time, bytes on disk and resident, and the low-vs-high rule: for each pair (high,
low) of a high type (BF16, Q8_0) and a low type (Q4_K, Q4_0, Q2_K), when an expert has to
be read on a cache miss, does the read time the low type saves (at `--disk-gbps`) pay for
its extra conversion and compute time?

Not a test. Times are medians (`--stat min` for the minimum) of `--repeats` runs after a
warm-up, wall clock, with torch's default thread count unless `--threads` is given;
`--clock cpu` times this thread's CPU time with one thread instead, which other processes
on a shared machine disturb far less (with 2 threads, every parallel region waits for a
descheduled thread and wall-clock medians can be several times too high). The weights are random Gaussian rows
quantized once per type and tiled to the full matrix (timing does not depend on the
values; quantizing 176M weights per type would take minutes). Other processes on the
machine skew wall-clock medians: the load average is reported with the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime import kernels as K
from . import qtypes

DEFAULT_TYPES = ("BF16", "Q8_0", "Q6_K", "Q4_K", "Q4_0", "Q4_1", "Q2_K")
HIGH = ("BF16", "Q8_0")
LOW = ("Q4_K", "Q4_0", "Q2_K")
TILE_ROWS = 64


STAT = {"median": statistics.median, "min": min}
CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}
_stat = statistics.median
_clock = time.perf_counter


def _time_ms(fn, repeats: int, warmup: int = 1) -> float:
    """`--stat` (median by default) of `repeats` wall-clock runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = _clock()
        fn()
        times.append(_clock() - t0)
    return _stat(times) * 1e3


def _raw_matrix(qtype: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    tile = (rng.standard_normal((TILE_ROWS, cols)) * 0.02).astype(np.float32)
    raw_tile = qtypes.quantize(tile, qtype)
    return torch.from_numpy(np.tile(raw_tile, (-(-rows // TILE_ROWS), 1))[:rows].copy())


def bench_type(
    qtype: str,
    hidden: int,
    ffn: int,
    tokens: tuple[int, ...],
    repeats: int,
    dtype: torch.dtype,
    path: type[K.QLinear] | None = None,
) -> dict:
    shapes = [(ffn, hidden), (ffn, hidden), (hidden, ffn)]
    raws = [_raw_matrix(qtype, *s, seed=i) for i, s in enumerate(shapes)]
    build = path.from_raw if path is not None else K.QLinear.from_raw

    def convert():
        return [build(r, qtype, s, dtype) for r, s in zip(raws, shapes, strict=True)]

    conv_ms = _time_ms(convert, max(3, repeats // 2))
    gate, up, down = convert()
    res = {
        "type": qtype,
        "path": gate.path,
        "disk_bytes": sum(r.numel() for r in raws),
        "resident_bytes": gate.nbytes + up.nbytes + down.nbytes,
        "convert_ms": conv_ms,
        "ffn_ms": {},
    }
    g = torch.Generator().manual_seed(0)
    for t in tokens:
        x = torch.randn(t, hidden, generator=g).to(dtype)

        def ffn_call(x=x):
            return down(F.silu(gate(x)) * up(x))

        res["ffn_ms"][t] = _time_ms(ffn_call, repeats, warmup=2)
    return res


def low_vs_high(results: dict[str, dict], tokens, disk_gbps: float) -> list[dict]:
    rows = []
    for hi in HIGH:
        for lo in LOW:
            if hi not in results or lo not in results:
                continue
            h, low = results[hi], results[lo]
            read_saved = (h["disk_bytes"] - low["disk_bytes"]) / (disk_gbps * 1e9) * 1e3
            extra_conv = low["convert_ms"] - h["convert_ms"]
            for t in tokens:
                extra = low["ffn_ms"][t] - h["ffn_ms"][t]
                net = read_saved - extra_conv - extra
                rows.append(
                    {
                        "high": hi,
                        "low": lo,
                        "tokens": t,
                        "extra_compute_ms": extra,
                        "extra_convert_ms": extra_conv,
                        "read_saved_ms": read_saved,
                        "net_saved_ms": net,
                        "low_pays": net > 0,
                        # once resident (a hit), only compute counts
                        "low_faster_on_hit": extra < 0,
                    }
                )
    return rows


def run(args) -> dict:
    global _stat, _clock
    _stat = STAT[args.stat]
    _clock = CLOCK[args.clock]
    if args.clock == "cpu":
        args.threads = 1  # thread CPU time only measures the work of a single thread
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    tokens = tuple(int(t) for t in args.tokens.split(","))
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    results = {}
    for t in types:
        results[t] = bench_type(t, args.hidden, args.ffn, tokens, args.repeats, dtype)
        gc.collect()
        if not args.json:
            r = results[t]
            print(
                f"  {t:5s} {r['path']:18s} convert {r['convert_ms']:7.1f} ms  "
                + "  ".join(f"T={k}: {v:8.2f} ms" for k, v in r["ffn_ms"].items()),
                flush=True,
            )
    alternatives = {}
    for spec in filter(None, args.alternatives.split(",")):
        cls_name, t = spec.split(":")
        cls = getattr(K, cls_name)
        alternatives[spec] = bench_type(
            t, args.hidden, args.ffn, tokens, args.repeats, dtype, path=cls
        )
    base = results.get("BF16")
    for r in list(results.values()) + list(alternatives.values()):
        r["ffn_rel_bf16"] = (
            {t: r["ffn_ms"][t] / base["ffn_ms"][t] for t in tokens} if base else None
        )
    return {
        "hidden": args.hidden,
        "ffn": args.ffn,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "native_bf16_gemm": K.native_bf16_gemm(),
        "disk_gbps": args.disk_gbps,
        "repeats": args.repeats,
        "stat": args.stat,
        "clock": args.clock,
        "load_avg_before": load0,
        "load_avg_after": os.getloadavg()[0],
        "seconds": time.perf_counter() - t0,
        "types": results,
        "alternatives": alternatives,
        "low_vs_high": low_vs_high(results, tokens, args.disk_gbps),
    }


def print_report(rep: dict) -> None:
    tokens = list(next(iter(rep["types"].values()))["ffn_ms"]) if rep["types"] else []
    print(
        f"\nOne expert FFN, hidden {rep['hidden']}, ffn {rep['ffn']}, {rep['dtype']} "
        f"activations, {rep['threads']} threads, native bf16 GEMM: {rep['native_bf16_gemm']}; "
        f"{rep['stat']} of {rep['repeats']} ({rep['clock']} clock); load average {rep['load_avg_before']:.2f} -> "
        f"{rep['load_avg_after']:.2f}"
    )
    head = f"{'type':6s} {'path':22s} {'disk MB':>8s} {'res MB':>8s} {'conv ms':>8s}"
    for t in tokens:
        head += f" {'T=' + str(t) + ' ms':>11s} {'x bf16':>7s}"
    print(head)
    rows = [(k, r) for k, r in rep["types"].items()]
    rows += [(f"{k} *", r) for k, r in rep["alternatives"].items()]
    for name, r in rows:
        line = (
            f"{name[:6]:6s} {r['path'][:22]:22s} {r['disk_bytes'] / 1e6:8.1f} "
            f"{r['resident_bytes'] / 1e6:8.1f} {r['convert_ms']:8.1f}"
        )
        for t in tokens:
            rel = r["ffn_rel_bf16"][t] if r["ffn_rel_bf16"] else float("nan")
            line += f" {r['ffn_ms'][t]:11.2f} {rel:7.2f}"
        print(line + (f"   ({name[:-2]})" if name.endswith(" *") else ""))
    if rep["alternatives"]:
        print("* = alternative path, not the default for its type")
    print(
        f"\nLow vs high on a miss (read at {rep['disk_gbps']} GB/s + convert + compute); "
        "net = read saved - extra convert - extra compute"
    )
    print(
        f"{'high':5s} {'low':5s} {'T':>4s} {'read saved':>11s} {'+convert':>9s} "
        f"{'+compute':>9s} {'net ms':>8s}  low pays?  faster on a hit?"
    )
    for r in rep["low_vs_high"]:
        print(
            f"{r['high']:5s} {r['low']:5s} {r['tokens']:4d} {r['read_saved_ms']:11.2f} "
            f"{r['extra_convert_ms']:9.2f} {r['extra_compute_ms']:9.2f} "
            f"{r['net_saved_ms']:8.2f}  {'yes' if r['low_pays'] else 'no':9s}  "
            f"{'yes' if r['low_faster_on_hit'] else 'no'}"
        )
    print(f"\n({rep['seconds']:.0f} s)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m hobbit_tools.quantize.kernel_bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--hidden", type=int, default=4096, help="model width (Mixtral: 4096)")
    p.add_argument("--ffn", type=int, default=14336, help="expert width (Mixtral: 14336)")
    p.add_argument("--types", default=",".join(DEFAULT_TYPES))
    p.add_argument("--tokens", default="1,128", help="comma-separated T values")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--stat",
        default="median",
        choices=list(STAT),
        help="statistic over the repeats; min is the robust one on a shared machine",
    )
    p.add_argument("--threads", type=int, default=0, help="0 = torch default")
    p.add_argument(
        "--clock",
        default="wall",
        choices=list(CLOCK),
        help="cpu: this thread's CPU time with 1 thread, robust to other load on the machine",
    )
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    p.add_argument("--disk-gbps", type=float, default=1.6, help="direct-read bandwidth, GB/s")
    p.add_argument(
        "--alternatives",
        default="Int4Linear:Q8_0,DenseLinear:Q2_K",
        help="extra class:type paths to time (comma-separated; empty for none)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = p.parse_args(argv)
    if not args.json:
        print(f"kernel_bench: hidden {args.hidden}, ffn {args.ffn}, types {args.types}")
    rep = run(args)
    if args.json:
        print(json.dumps(rep, indent=1, default=str))
    else:
        print_report(rep)


if __name__ == "__main__":
    main()

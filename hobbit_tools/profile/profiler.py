"""`hobbit profile`: measure this device and this model, fit the runtime's knobs, write the
tuned config and a report next to the shards.

Steps (each reported):
1. device: direct/buffered read bandwidth of the disk holding the shards, RAM bandwidth,
   host-to-GPU where CUDA exists, expert kernel time per shard type at this model's shapes;
2. model, on calibration text (default: a bundled public-domain excerpt): routing per layer,
   unimportance-score histograms, each expert's low-vs-high output error, next-layer
   prediction recall per depth; a held-out part of the text for perplexity;
3. fit: T1/T2 with the lowest expected load cost whose held-out perplexity stays within the
   budget over all-high; prefetch depth from recall; the memory budget if none was given;
   cache policy, HOBBIT weights and high/low split by replaying a decode trace; then
   prefetch is kept only if decoding with it is measured faster than without;
4. write hobbit-config.json and profile-report.md.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from pathlib import Path

import torch

from .. import validate
from ..errors import HobbitError
from ..runtime.budget import parse_memory
from ..runtime.loader import (
    ModelFiles,
    build_model,
    compute_dtype,
    load_resident_experts,
    tokenizer,
)
from ..runtime.offload import RouterView
from ..runtime.precision import PrecisionRule
from ..runtime.store import ExpertStore
from ..runtime.strategy import Strategy, build_backend
from .calibrate import (
    CalibrationExperts,
    RoutingLog,
    prediction_recall,
    score_histogram,
    sensitivity,
)
from .config import config_path, shard_digests, write_config
from .fit import expected_cost, fit_cache, fit_prefetch_depth, fit_thresholds

DEFAULT_TEXT = Path(__file__).with_name("calibration.txt")
FIT_SHARE = 0.5  # of the perplexity budget the thresholds may spend on the calibration text
PREFETCH_MIN_GAIN = 0.97  # prefetch is kept if it decodes in at most 97% of the time without
REPORT_FILE = "profile-report.md"


def profile(
    model_dir: str | Path,
    *,
    calibration: str | Path | None = None,
    memory: int | str | None = None,
    ppl_budget: float = 0.01,
    max_tokens: int = 2048,
    window: int = 256,
    trace_tokens: int = 192,
    quick: bool = False,
    out: str | Path | None = None,
    say=lambda msg: None,
) -> dict:
    """Profile `model_dir`; writes the tuned config (to `out`, default next to the shards)
    and a report beside it; returns the config with everything measured."""
    from .device import fingerprint, profile_device

    t_start = time.perf_counter()
    text = validate.utf8_text(calibration or DEFAULT_TEXT, "calibration text")
    validate.bounded("ppl_budget", ppl_budget, 0.0, 10.0)
    validate.bounded("max_tokens", max_tokens, 64, integer=True)
    files = ModelFiles(model_dir)
    cfg = files.config
    dtype = compute_dtype(files, None)
    shapes = [(cfg.expert_ffn, cfg.hidden_size)] * 2 + [(cfg.hidden_size, cfg.expert_ffn)]
    shard_paths = {
        p: files.dir / f"experts-{p}-{files.manifest['types'][p]}.gguf" for p in files.precisions
    }

    say("1/4 measuring the device")
    device = profile_device(shard_paths, shapes, quick=quick)
    bandwidth = device.get("best_direct_gbps") or device.get("buffered_gbps")

    say("2/4 running the calibration text")
    ids = tokenizer(files).encode(text)[:max_tokens]
    if len(ids) < 64:
        raise HobbitError(
            f"the calibration text gives {len(ids)} tokens; give at least 64 (a few paragraphs)"
        )
    split = int(len(ids) * 0.6)
    calib, held_out = ids[:split], ids[split:]
    has_low = "low" in files.precisions
    high = load_resident_experts(files, "high", dtype).experts
    low = load_resident_experts(files, "low", dtype).experts if has_low else None
    cal = CalibrationExperts(high, low)
    model = build_model(files, cal, dtype, window + 1)
    cal.log = RoutingLog()
    for chunk in _windows(calib, window):
        model.reset()
        model.forward(torch.tensor(chunk))
    log, cal.log = cal.log, None
    routers = {i: model.w.layers[i].router for i, m in enumerate(cfg.moe_layers) if m}
    recall = prediction_recall(log, RouterView(routers, model.select), max_depth=3)
    base_ppl = _ppl(model, held_out, window)

    say("3/4 fitting thresholds, prefetch depth, budget and cache")
    kernels = device.get("kernels", {})
    store = ExpertStore(files, files.precisions, dtype)
    # a miss costs its read, its conversion after the read (none from a slot pack), and
    # its compute
    cost = {
        p: store.p[p].load_bytes / (bandwidth * 1e9)
        + (0.0 if store.p[p].pack else kernels.get(q.qtype, {}).get("convert_s", 0.0))
        + kernels.get(q.qtype, {}).get("T1_s", 0.0)
        for p, q in store.p.items()
    }
    store.close()
    fitted: dict = {"base_ppl": base_ppl, "prefetch_recall": recall, "load_cost_s": cost}
    t1 = t2 = 1.0
    if has_low:
        fitted["sensitivity"] = sensitivity(cal, log)
        low_pays = cost["low"] < cost["high"]
        fitted["low_pays"] = low_pays
        weights = {layer: log.cat("weights", layer) for layer in log.weights}
        level_cost = {
            "high": cost["high"],
            "low": cost["low"] if low_pays else cost["high"],
            "skip": 0.0,
        }

        def evaluate(a: float, b: float) -> float:
            cal.rule = PrecisionRule(a, b)
            try:
                return _ppl(model, held_out, window)
            finally:
                cal.rule = None

        # Half the budget is held back for what calibration cannot see: at run time a cached
        # low copy also serves later tokens that wanted high, and other text responds
        # differently (measured: +0.55% here became +1.9% on a held-out book).
        fit = fit_thresholds(
            evaluate, expected_cost(weights, level_cost), base_ppl, ppl_budget * FIT_SHARE
        )
        t1, t2 = fit["t1"], fit["t2"]
        if not low_pays:
            t1 = t2  # a low copy costs more than it saves here: keep only the skip band
        fitted["thresholds"] = fit
    fitted["score_histogram"] = score_histogram(log)
    depth = fit_prefetch_depth(recall)
    budget = _budget(files, memory, model)
    fitted["memory_source"] = (
        "given" if memory is not None else "half of available RAM, less dense and KV"
    )
    model = cal = high = low = None  # free the resident copies before the trace run

    dynamic = has_low and (t1 < 1.0 or t2 < 1.0)
    rule = PrecisionRule(t1, t2) if dynamic else None
    header, records = _decode_trace(
        files, dtype, budget, dynamic, depth, t1, t2, calib[:trace_tokens]
    )
    cache = fit_cache(header, records, budget, rule, step=0.5 if quick else 0.25)
    if cache["cliff"]:
        say(cache["cliff"])
    fitted["cache"] = cache
    best = cache["best"]

    if depth:
        say("3/4 timing decode with and without prefetch")
        chosen = Strategy(
            "timing",
            cache=best["cache_policy"],
            dynamic_precision=dynamic,
            t1=t1,
            t2=t2,
            low_share=best["low_share"] if dynamic else 0.25,
            cache_weights=tuple(best["weights"]) if best["weights"] else None,
        )
        timing_tokens = min(trace_tokens, 64 if quick else 128)
        timing = _prefetch_timing(files, dtype, budget, chosen, depth, calib[:timing_tokens])
        fitted["prefetch_timing"] = timing
        if timing["with_s"] > PREFETCH_MIN_GAIN * timing["without_s"]:
            depth = 0

    runtime = {
        "policy": "hobbit",
        "memory": budget,
        "dynamic_precision": dynamic,
        "t1": t1,
        "t2": t2,
        "skip": "drop",
        "prefetch_depth": depth,
        "cache_policy": best["cache_policy"],
        "cache_weights": list(best["weights"]) if best["weights"] else None,
        "low_share": best["low_share"] if dynamic else 0.25,
    }
    made_for = {"device": fingerprint(files.dir), "shards": shard_digests(files.dir)}
    path = Path(out) if out else config_path(files.dir)
    fitted["seconds"] = time.perf_counter() - t_start
    write_config(path, runtime, made_for, fitted)
    say("4/4 writing the config and report")
    report = render_report(files, device, runtime, fitted, len(calib), len(held_out), ppl_budget)
    (path.parent / REPORT_FILE).write_text(report)
    return {
        "config": str(path),
        "report": str(path.parent / REPORT_FILE),
        "runtime": runtime,
        "device": device,
        "fitted": fitted,
    }


def _windows(ids: list[int], window: int):
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) > 1:
            yield chunk


def _ppl(model, ids: list[int], window: int) -> float:
    nll, n = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        model.reset()
        logits = model.forward(torch.tensor(chunk[:-1]), all_logits=True)
        nll += float(
            torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum")
        )
        n += len(chunk) - 1
    return math.exp(nll / n)


def _budget(files: ModelFiles, memory, model) -> int:
    from ..runtime.store import ExpertStore
    from ..runtime.strategy import full_cache_bytes

    store = ExpertStore(files, ["high"], compute_dtype(files, None))
    total = full_cache_bytes(files, store.p["high"].slot_bytes)
    store.close()
    if memory is not None:
        return validate.memory_budget(parse_memory(memory, total), memory, total)
    available = _mem_available()
    budget = int(available * 0.5) - model.dense_bytes - model.cache.nbytes
    return max(min(budget, total), 0)


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # unknown: assume a small machine


def _prefetch_timing(files, dtype, budget, chosen: Strategy, depth: int, ids) -> dict:
    """Decode seconds of `ids` with prefetch at `depth` and without, interleaved twice
    (medians): prefetch pays only where compute is a large enough share of a token to hide
    reads behind, which recall alone does not tell (docs/benchmarks.md 7)."""
    runs: dict[int, list[float]] = {depth: [], 0: []}
    for _ in range(2):
        for d in (depth, 0):
            s = dataclasses.replace(chosen, prefetch_depth=d)
            runs[d].append(_decode(files, dtype, budget, s, ids)[0])
    return {
        "depth": depth,
        "tokens": len(ids),
        "with_s": statistics.median(runs[depth]),
        "without_s": statistics.median(runs[0]),
    }


def _decode_trace(files, dtype, budget, dynamic, depth, t1, t2, ids):
    """A decode-mode routing trace (one token at a time, as generation runs)."""
    s = Strategy(
        "calibration", cache="lru", dynamic_precision=dynamic, prefetch_depth=depth, t1=t1, t2=t2
    )
    return _decode(files, dtype, budget, s, ids, trace=True)[1:]


def _decode(files, dtype, budget, s: Strategy, ids, trace: bool = False):
    """Decode `ids` one token at a time under strategy `s`: (seconds, trace header, trace
    records), the trace parts None unless asked for."""
    model = build_model(files, None, dtype, len(ids) + 1)
    backend = build_backend(files, s, "high", budget, dtype, model)
    model.experts = backend
    if trace:
        backend.start_trace()
    model.reset()
    step = torch.empty(1, dtype=torch.long)
    t0 = time.perf_counter()
    for t in ids:
        step[0] = t
        model.forward(step)
    seconds = time.perf_counter() - t0
    header, records = (backend.trace_header(), backend.trace) if trace else (None, None)
    backend.close()
    return seconds, header, records


def render_report(files, device, runtime, fitted, n_calib, n_held, ppl_budget) -> str:
    lines = [
        f"# hobbit profile: {files.dir.name}",
        "",
        f"Model: {files.config.family}, {sum(files.config.moe_layers)} MoE layers x "
        f"{files.config.num_experts} experts, top-{files.config.top_k}; shards "
        + ", ".join(f"{p} {files.manifest['types'][p]}" for p in files.precisions),
        f"Calibration: {n_calib} tokens for routing, {n_held} held out for perplexity.",
        "",
        "## Device",
        f"- direct-read bandwidth (best): {device.get('best_direct_gbps') or 0:.2f} GB/s"
        + (
            f" (O_DIRECT refused: {device['reads'].get('direct_refused')})"
            if device.get("reads", {}).get("direct_refused")
            else ""
        ),
        f"- buffered (page-cached) read: {device.get('buffered_gbps') or 0:.2f} GB/s; RAM copy: {device.get('ram_gbps') or 0:.2f} GB/s",
        f"- host-to-GPU: {device['h2d_gbps']:.2f} GB/s"
        if device.get("h2d_gbps")
        else "- host-to-GPU: no CUDA device",
    ]
    for q, k in device.get("kernels", {}).items():
        lines.append(
            f"- expert FFN, {q}: "
            + ", ".join(f"{name} {v * 1e3:.2f} ms" for name, v in k.items() if name.endswith("_s"))
        )
    lines += ["", "## Chosen settings", ""]
    for key, value in runtime.items():
        lines.append(f"- `{key}`: {value}")
    lines += ["", "## Why", ""]
    cost = fitted["load_cost_s"]
    lines.append(
        "- load cost per expert (read at direct bandwidth, + conversion unless packed, + decode kernel): "
        + ", ".join(f"{p} {v * 1e3:.2f} ms" for p, v in cost.items())
    )
    if "thresholds" in fitted:
        th = fitted["thresholds"]
        lines.append(
            f"- thresholds: all-high held-out perplexity {fitted['base_ppl']:.3f}; budget +{ppl_budget:.0%}, "
            f"half of it spent here = {th['limit']:.3f}; chose T1={th['t1']}, T2={th['t2']} (perplexity {th['ppl']:.3f}), the cheapest "
            f"of {len(th['tried'])} evaluated candidates that met it"
        )
        if not fitted.get("low_pays", True):
            lines.append(
                "- the low-precision copy costs more to load and compute than the high one here: only skipping is used"
            )
    else:
        lines.append(
            f"- no low-precision shard: all experts at high precision (perplexity {fitted['base_ppl']:.3f})"
        )
    rec = ", ".join(f"depth {d}: {r:.0%}" for d, r in fitted["prefetch_recall"].items())
    timing = fitted.get("prefetch_timing")
    if timing:
        verdict = "kept" if runtime["prefetch_depth"] else "switched off: it does not pay here"
        lines.append(
            f"- prefetch recall ({rec}): depth {timing['depth']} is the deepest with recall >= "
            f"60%; {timing['tokens']} tokens decoded in {timing['with_s']:.2f} s with it, "
            f"{timing['without_s']:.2f} s without: {verdict}"
        )
    else:
        lines.append(
            f"- prefetch recall ({rec}): depth {runtime['prefetch_depth']} (deepest with recall >= 60%)"
        )
    lines.append(f"- memory budget {runtime['memory']:,} bytes ({fitted['memory_source']})")
    c = fitted["cache"]
    lines.append(
        f"- cache by trace replay over {c['candidates']} candidates: {c['best']['cache_policy']} "
        f"(weights {c['best']['weights']}, low share {c['best']['low_share']}) miss penalty "
        f"{c['best']['miss_penalty']:.1f} vs lru {c['lru']['miss_penalty']:.1f}"
    )
    if c.get("cliff"):
        lines.append(f"- {c['cliff']}")
    lines.append(f"- profiled in {fitted['seconds']:.0f} s")
    return "\n".join(lines) + "\n"

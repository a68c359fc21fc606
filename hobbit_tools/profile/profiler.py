"""`hobbit profile`: measure this device and this model, fit the runtime's knobs, write the
tuned config and a report next to the shards.

Steps (each reported):
1. device: direct/buffered read bandwidth of the disk holding the shards, RAM bandwidth,
   host-to-GPU where CUDA exists, expert kernel time per shard type at this model's shapes;
2. model, on calibration text (default: a bundled public-domain excerpt), one layer at a time
   (calibrate.py: never more than one expert per precision in memory): routing per layer,
   unimportance-score histograms, each expert's low-vs-high output error, next-layer
   prediction recall per depth, the error each (token, slot) would take at low precision or
   skipped; a held-out part of the text for perplexity;
3. fit: T1/T2 with the lowest expected load cost whose held-out perplexity stays within the
   budget over all-high (candidates ranked by their estimated error, a few confirmed by
   layer-by-layer runs); prefetch depth from recall; the memory budget if none was given
   (what this process may use, read before anything large is loaded: budget.py);
   cache policy, HOBBIT weights and high/low split by replaying a decode trace; then
   prefetch is kept only if decoding with it is measured faster than without;
4. write hobbit-config.json and profile-report.md.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from pathlib import Path

import torch

from .. import validate
from ..errors import HobbitError
from ..runtime.budget import parse_memory
from ..runtime.generate import peak_rss_bytes
from ..runtime.loader import ModelFiles, build_model, compute_dtype, tokenizer
from ..runtime.offload import RouterView
from ..runtime.precision import PrecisionRule
from ..runtime.store import ExpertStore
from ..runtime.strategy import Strategy, build_backend, default_memory
from .calibrate import LayerExperts, Observer, Windows, perplexity, score_histogram, walk
from .config import config_path, shard_digests, write_config
from .fit import expected_cost, fit_cache, fit_prefetch_depth, fit_thresholds

DEFAULT_SET = Path(__file__).with_name("calibration")  # one text per genre: SOURCES.md
PARTS_OF_ONE_TEXT = 4  # a single calibration file is cut into this many parts
FIT_PART = 0.6  # of each part's tokens, fitted on; the rest is held out
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
    validate.bounded("ppl_budget", ppl_budget, 0.0, 10.0)
    validate.bounded("max_tokens", max_tokens, 64, integer=True)
    files = ModelFiles(model_dir)
    cfg = files.config
    dtype = compute_dtype(files, None)
    shapes = [(cfg.expert_ffn, cfg.hidden_size)] * 2 + [(cfg.hidden_size, cfg.expert_ffn)]
    shard_paths = {
        p: files.dir / f"experts-{p}-{files.manifest['types'][p]}.gguf" for p in files.precisions
    }

    # before anything large is loaded: what this process may use
    plan = default_memory(files, dtype, None)
    budget = plan.budget if memory is None else parse_memory(memory, plan.experts)
    if budget <= 0:
        raise HobbitError(
            f"no memory is left for experts: {plan.describe()}; give --memory, free memory or "
            "raise the process's memory limit"
        )

    say("1/4 measuring the device")
    device = profile_device(shard_paths, shapes, quick=quick, max_bytes=budget + plan.floor)
    bandwidth = device.get("best_direct_gbps") or device.get("buffered_gbps")

    say("2/4 running the calibration text, one layer at a time")
    parts = calibration_parts(calibration, tokenizer(files), max_tokens)
    cut = [max(1, int(len(ids) * FIT_PART)) for _, ids in parts]
    calib_parts = [ids[:c] for (_, ids), c in zip(parts, cut, strict=True)]
    held_parts = [ids[c:] for (_, ids), c in zip(parts, cut, strict=True)]
    calib = [t for ids in calib_parts for t in ids]
    held_out = [t for ids in held_parts for t in ids]
    has_low = "low" in files.precisions
    model = build_model(files, None, dtype, window + 1)
    store = ExpertStore(files, files.precisions, dtype)
    windows = Windows.of_parts(calib_parts, held_parts, window)
    routers = {i: model.w.layers[i].router for i, m in enumerate(cfg.moe_layers) if m}
    observer = Observer(windows.routed_tokens, RouterView(routers, model.select))
    final = walk(model, windows, LayerExperts(store, None, observer), "routing, errors")
    base_ppl = perplexity(model, windows, final)
    recall = observer.recall()

    say("3/4 fitting thresholds, prefetch depth, budget and cache")
    kernels = device.get("kernels", {})
    # a miss costs its read, its conversion after the read (none from a slot pack), and
    # its compute
    cost = {
        p: store.p[p].load_bytes / (bandwidth * 1e9)
        + (0.0 if store.p[p].pack else kernels.get(q.qtype, {}).get("convert_s", 0.0))
        + kernels.get(q.qtype, {}).get("T1_s", 0.0)
        for p, q in store.p.items()
    }
    fitted: dict = {"base_ppl": base_ppl, "prefetch_recall": recall, "load_cost_s": cost}
    t1 = t2 = 1.0
    if has_low:
        fitted["sensitivity"] = observer.sensitivity
        low_pays = cost["low"] < cost["high"]
        fitted["low_pays"] = low_pays
        level_cost = {
            "high": cost["high"],
            "low": cost["low"] if low_pays else cost["high"],
            "skip": 0.0,
        }
        scored = windows.scored()

        def evaluate(a: float, b: float) -> float:
            rule = LayerExperts(store, PrecisionRule(a, b))
            return perplexity(model, scored, walk(model, scored, rule, f"T1={a} T2={b}"))

        # Half the budget is held back for what calibration cannot see: at run time a cached
        # low copy also serves later tokens that wanted high, and other text responds
        # differently (measured: +0.55% here became +1.9% on a held-out book).
        fit = fit_thresholds(
            evaluate,
            expected_cost(observer.weights, level_cost),
            lambda a, b: observer.proxy(PrecisionRule(a, b)),
            base_ppl,
            ppl_budget * FIT_SHARE,
        )
        t1, t2 = fit["t1"], fit["t2"]
        if not low_pays:
            t1 = t2  # a low copy costs more than it saves here: keep only the skip band
        fitted["thresholds"] = fit
    fitted["score_histogram"] = score_histogram(observer.weights)
    depth = fit_prefetch_depth(recall)
    fitted["memory_source"] = "given" if memory is not None else plan.describe()
    store.close()
    model = observer = final = None  # free the calibration state before the trace run

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
    fitted["memory"] = {
        "available": plan.available.bytes,
        "available_source": plan.available.source,
        "dense": plan.dense,
        "kv": plan.kv,
        "budget": budget,
        "floor": plan.floor,
        "peak_rss": peak_rss_bytes(),
    }
    write_config(path, runtime, made_for, fitted)
    say("4/4 writing the config and report")
    fitted["calibration"] = {
        "source": str(calibration or DEFAULT_SET),
        "parts": {name: len(ids) for name, ids in parts},
    }
    report = render_report(files, device, runtime, fitted, len(calib), len(held_out), ppl_budget)
    (path.parent / REPORT_FILE).write_text(report)
    return {
        "config": str(path),
        "report": str(path.parent / REPORT_FILE),
        "runtime": runtime,
        "device": device,
        "fitted": fitted,
    }


def calibration_parts(path: str | Path | None, tok, max_tokens: int) -> list[tuple[str, list[int]]]:
    """(name, token ids) per calibration part, at most max_tokens over all: the bundled set
    (one text per genre), a directory of .txt files (one part each), or one text file cut
    into PARTS_OF_ONE_TEXT parts."""
    path = Path(path) if path is not None else DEFAULT_SET
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise HobbitError(f"calibration dir {path} holds no .txt files; give one or more")
        texts = [(f.stem, validate.utf8_text(f, "calibration text")) for f in files]
    else:
        texts = [(path.stem, validate.utf8_text(path, "calibration text"))]
    per = max_tokens // len(texts)
    parts = [(name, tok.encode(t.replace("\r", ""))[:per]) for name, t in texts]
    if len(parts) == 1:
        name, ids = parts[0]
        ids = ids[:max_tokens]
        n = len(ids) // PARTS_OF_ONE_TEXT
        parts = [(f"{name}[{i + 1}/{PARTS_OF_ONE_TEXT}]", ids[i * n : (i + 1) * n])
                 for i in range(PARTS_OF_ONE_TEXT)]  # fmt: skip
    short = [(name, len(ids)) for name, ids in parts if len(ids) < 32]
    if short:
        raise HobbitError(
            f"calibration part {short[0][0]} gives {short[0][1]} tokens; give at least 32 a part "
            f"({32 * PARTS_OF_ONE_TEXT} for one text: a few paragraphs) or raise --max-tokens"
        )
    return parts


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
    # The backend's slot arenas (anonymous shared mmaps) live until its reference cycles are
    # collected: free them now, or the next run's arenas come on top (under a memory limit,
    # three decode runs in a row are then killed).
    model.experts = backend = None
    gc.collect()
    return seconds, header, records


def render_report(files, device, runtime, fitted, n_calib, n_held, ppl_budget) -> str:
    lines = [
        f"# hobbit profile: {files.dir.name}",
        "",
        f"Model: {files.config.family}, {sum(files.config.moe_layers)} MoE layers x "
        f"{files.config.num_experts} experts, top-{files.config.top_k}; shards "
        + ", ".join(f"{p} {files.manifest['types'][p]}" for p in files.precisions),
        f"Calibration: {n_calib} tokens for routing, {n_held} held out for perplexity, from "
        + ", ".join(f"{k} ({v})" for k, v in fitted["calibration"]["parts"].items())
        + f" in {fitted['calibration']['source']}.",
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
            f"half of it spent here = {th['limit']:.3f}; chose T1={th['t1']}, T2={th['t2']} (perplexity {th['ppl']:.3f}): "
            f"of {th['candidates']} candidates, {th['front']} are cheapest for their estimated error, "
            f"bisected with {len(th['tried'])} end-to-end runs"
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
    m, mib = fitted["memory"], 1 << 20
    lines.append(
        f"- peak memory of this profile: {m['peak_rss'] / mib:,.0f} MiB resident (the process's "
        f"peak RSS, interpreter and torch included; experts were held one at a time per "
        f"precision, never all); `hobbit run` with this config: dense {m['dense'] / mib:,.0f} "
        f"+ KV {m['kv'] / mib:,.0f} + expert budget {m['budget'] / mib:,.0f} + runtime floor "
        f"{m['floor'] / mib:,.0f} MiB = {(m['dense'] + m['kv'] + m['budget'] + m['floor']) / mib:,.0f}"
        f" MiB beyond the interpreter"
    )
    lines.append(f"- profiled in {fitted['seconds']:.0f} s")
    return "\n".join(lines) + "\n"

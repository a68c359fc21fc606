"""`hobbit profile`: measure this device and this model, fit the runtime's knobs, write the
tuned config and a report next to the shards.

Steps (each reported):
1. device: direct/buffered read bandwidth of the disk holding the shards, RAM bandwidth,
   host-to-GPU where CUDA exists, expert kernel time per shard type at this model's shapes,
   and what loading one expert of each precision costs through the runtime's own store;
2. model, on a calibration set (default: four short texts of different genres,
   calibration/SOURCES.md), each part cut into a fitting piece and a held-out piece, one
   layer at a time (calibrate.py: never more than one expert per precision in memory):
   routing per layer, unimportance-score histograms, each expert's low-vs-high output
   error, next-layer prediction recall per depth, the error each fitting (token, slot)
   would take at low precision or skipped;
3. fit: thresholds per layer and expert (fit.py: each expert's pair priced by its load cost
   and the error it adds, weighted by how often it is selected), the cheapest assignment
   whose perplexity on every fitting piece stays within a share of the budget over
   all-high (layer-by-layer runs, every expert a miss); prefetch depth from recall; the
   memory budget if none was given (what this process may use, read before anything large
   is loaded: budget.py); cache policy, HOBBIT weights and high/low split by replaying a
   decode trace; prefetch kept only if decoding with it is measured faster than without;
4. validation: the whole chosen config decoded one token at a time under the budget (the
   offloaded runtime, as `hobbit run` runs it) on every held-out piece; if the worst of
   them is not within the budget less a margin, the fit's share is cut in proportion and
   the fit redone; lru decodes the same windows, for the speed and bytes the budget bought;
5. write hobbit-config.json and profile-report.md.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from pathlib import Path

import torch

from .. import validate
from ..errors import BudgetBelowMinimum, HobbitError
from ..runtime import ggml
from ..runtime.budget import RUNTIME_FLOOR, available_memory, parse_memory, trim
from ..runtime.generate import peak_rss_bytes
from ..runtime.io import READS_PER_THREAD
from ..runtime.loader import ModelFiles, build_model, compute_dtype, tokenizer
from ..runtime.offload import OffloadOptions, RouterView
from ..runtime.pack import UNPACKED_TYPES
from ..runtime.precision import PrecisionRule
from ..runtime.store import ExpertStore, SlotArena
from ..runtime.strategy import Strategy, build_backend, default_memory, working_minimum
from .calibrate import LayerExperts, Observer, Windows, part_ppl, score_histogram, walk
from .config import config_path, shard_digests, write_config
from .fit import bisect_front, expert_front, expert_tables, fit_cache, fit_prefetch_depth, spread

DEFAULT_SET = Path(__file__).with_name("calibration")  # one text per genre: SOURCES.md
PARTS_OF_ONE_TEXT = 4  # a single calibration file is cut into this many parts
FIT_PART = 0.6  # of each part's tokens, fitted on; the rest is held out
# the context a tuned budget leaves KV room for (`hobbit run` sizes its KV to the prompt and
# -n; a longer run under the same limit takes its KV out of this budget: runtime/__init__.py)
PLANNED_CONTEXT = 1024
# The thresholds may spend this share of the budget on the fitting pieces (every expert a
# miss there); the held-out pieces, decoded as `hobbit run` decodes (a cached low copy
# also serves tokens that wanted high), must stay within the budget less MARGIN of it, the
# room kept for text nobody measured (the genres differ by about that much: docs/benchmarks.md).
FIT_SHARE = 0.5
WALK_MIN_TOKENS = 512
MARGIN = 0.25
FIT_ROUNDS = 3  # fits tried before the thresholds fall back to all-high
KERNEL_MIN_GAIN = 0.97  # torch's kernels are chosen where they decode in <= 97% of ggml's time
PREFETCH_MIN_GAIN = 0.97  # prefetch is kept if it decodes in at most 97% of the time without
REPORT_FILE = "profile-report.md"


def profile(
    model_dir: str | Path,
    *,
    calibration: str | Path | None = None,
    memory: int | str | None = None,
    ppl_budget: float = 0.01,
    max_tokens: int = 4096,
    window: int = 256,
    trace_tokens: int = 192,
    quick: bool = False,
    threads: int | None = None,
    out: str | Path | None = None,
    say=lambda msg: None,
) -> dict:
    """Profile `model_dir`; writes the tuned config (to `out`, default next to the shards)
    and a report beside it; returns the config with everything measured. `threads`: the
    kernels' compute threads while profiling, as `hobbit run --threads` (default: the CPUs
    this process may use that nothing else keeps busy)."""
    from ..runtime import ggml

    validate.bounded("ppl_budget", ppl_budget, 0.0, 10.0)
    validate.bounded("max_tokens", max_tokens, 64, integer=True)
    if threads:
        validate.bounded("threads", threads, 1, 256, integer=True)
    torch_before = torch.get_num_threads()  # the runtime's loads set it
    ggml_before = ggml.set_threads(threads) if threads else None
    try:
        return _profile(
            model_dir, calibration, memory, ppl_budget, max_tokens, window, trace_tokens,
            quick, out, say,
        )  # fmt: skip
    finally:
        torch.set_num_threads(torch_before)
        if threads:  # without: the caller's setting was never touched
            ggml.set_threads(ggml_before)


def _profile(
    model_dir, calibration, memory, ppl_budget, max_tokens, window, trace_tokens, quick, out, say
) -> dict:
    from .device import fingerprint, profile_device

    t_start = time.perf_counter()
    files = ModelFiles(model_dir)
    cfg = files.config
    dtype = compute_dtype(files, None)
    shapes = [(cfg.expert_ffn, cfg.hidden_size)] * 2 + [(cfg.hidden_size, cfg.expert_ffn)]
    shard_paths = {
        p: files.dir / f"experts-{p}-{files.manifest['types'][p]}.gguf" for p in files.precisions
    }
    # before anything large is loaded: what this process may use
    plan = default_memory(files, dtype, PLANNED_CONTEXT)
    budget = plan.budget if memory is None else parse_memory(memory, plan.experts)
    fits = walk_tokens(cfg, plan.budget)
    if fits < max_tokens:
        say(f"calibrating on {fits} tokens, not {max_tokens}: the layer-by-layer pass holds "
            f"~{walk_bytes_per_token(cfg) >> 10} KiB a token and {plan.budget >> 20} MiB "
            "is free for it")  # fmt: skip
    parts = calibration_parts(calibration, tokenizer(files), min(max_tokens, fits))
    if budget <= 0:
        raise HobbitError(
            f"no memory is left for experts: {plan.describe()}; give --memory, free memory or "
            "raise the process's memory limit"
        )

    say("1/5 measuring the device")
    device = profile_device(shard_paths, shapes, quick=quick, max_bytes=budget + plan.floor)
    trim()  # the probe's buffers

    say("2/5 running the calibration set, one layer at a time")
    names = [name for name, _ in parts]
    cut = [max(2, int(len(ids) * FIT_PART)) for _, ids in parts]
    fit_w = Windows.cut([ids[:c] for (_, ids), c in zip(parts, cut, strict=True)], window)
    held_w = Windows.cut([ids[c:] for (_, ids), c in zip(parts, cut, strict=True)], window)
    has_low = "low" in files.precisions
    model = build_model(files, None, dtype, max(window, trace_tokens) + 1)
    store = ExpertStore(files, files.precisions, dtype)
    budget, low_off = _working_budget(cfg, store, budget, memory is None)
    use_low = has_low and low_off is None
    routers = {i: model.w.layers[i].router for i, m in enumerate(cfg.moe_layers) if m}
    observer = Observer(fit_w.tokens, RouterView(routers, model.select))
    final = walk(model, fit_w + held_w, LayerExperts(store, None, observer), "routing, errors")
    n_fit = len(fit_w.inputs)
    base_fit = part_ppl(model, fit_w, final[:n_fit])
    base_held = part_ppl(model, held_w, final[n_fit:])
    final = None
    recall = observer.recall()

    say("3/5 fitting thresholds, prefetch depth, budget and cache")
    cost = _load_costs(store, device, cfg)
    fitted: dict = {
        "base_ppl": _pooled(base_held, held_w),
        "base_ppl_by_part": {names[i]: v for i, v in base_held.items()},
        "prefetch_recall": recall,
        "load_cost_s": cost,
        "score_histogram": score_histogram(observer.weights),
    }
    depth = fit_prefetch_depth(recall)
    fitted["memory_source"] = "given" if memory is not None else plan.describe()
    fitted["calibration_tokens"] = sum(len(ids) for _, ids in parts)
    if low_off:  # only with a low shard
        fitted["low_off"] = low_off
    front, rounds = [], []
    if use_low:
        fitted["sensitivity"] = observer.sensitivity
        low_pays = cost["low"] < cost["high"]
        fitted["low_pays"] = low_pays
        tables = expert_tables(
            observer.stats(), cost, (cfg.num_layers, cfg.num_experts), low=low_pays
        )
        front = expert_front(tables)
    observer = None

    def fit_meets(allowed: float):
        def meets(point) -> tuple[bool, dict]:
            backend = LayerExperts(store, PrecisionRule(point["t1"], point["t2"]))
            got = part_ppl(model, fit_w, walk(model, fit_w, backend, "thresholds"))
            worst = max(got[i] / base_fit[i] for i in got)
            info = {"worst_fit_ratio": worst, "cost": point["cost"], "proxy": point["proxy"]}
            return worst <= 1 + allowed, info

        return meets

    share, trace, cache, timing, val = FIT_SHARE, None, None, None, None
    chosen = None
    lru_runs: dict[int, dict] = {}  # lru's decodes do not change between validations
    for attempt in range(FIT_ROUNDS if front else 1):
        point = None
        if front:
            index, tried = bisect_front(front, fit_meets(ppl_budget * share), max_evals=8)
            point = front[index] if index is not None else None
            rounds.append({"share": share, "tried": tried, "index": index, "front": len(front)})
        rule = PrecisionRule(point["t1"], point["t2"]) if point is not None else None
        if trace is None:  # the routing a decode run sees; levels are re-derived per rule
            trace = _decode(model, files, dtype, budget, _trace_strategy(rule, depth),
                            _trace_ids(fit_w, trace_tokens), trace=True)[1:]  # fmt: skip
        cache = fit_cache(*trace, budget, rule, step=0.5 if quick else 0.25)
        chosen = _strategy(cache["best"], rule, depth)
        if depth and timing is None:
            say("3/5 timing decode with and without prefetch")
            ids = _trace_ids(fit_w, min(trace_tokens, 64 if quick else 128))
            timing = _prefetch_timing(model, files, dtype, budget, chosen, depth, ids)
            if timing["with_s"] > PREFETCH_MIN_GAIN * timing["without_s"]:
                depth = 0
            chosen = dataclasses.replace(chosen, prefetch_depth=depth)
        say(f"4/5 validating on the held-out pieces, decoding ({attempt + 1}/{FIT_ROUNDS})")
        val = _validate(model, files, dtype, budget, chosen, held_w, base_held, names, lru_runs)
        if rounds:
            rounds[-1]["worst_held_ratio"] = val["worst_ratio"]
        if point is None or val["worst_ratio"] <= 1 + ppl_budget * (1 - MARGIN):
            break
        # the held-out pieces rose more than the fit allowed for: cut the fit's allowance
        # in proportion to what they showed, at least by a quarter, and fit again
        fit_rise = next(t["worst_fit_ratio"] for t in tried if t["index"] == index) - 1
        held_rise = val["worst_ratio"] - 1
        scaled = fit_rise * ppl_budget * (1 - MARGIN) / held_rise / ppl_budget
        share = min(0.75 * share, scaled) if fit_rise > 0 else share / 2
        chosen = None
    if chosen is None:  # no fit held: all experts at high precision
        rule = None
        cache = fit_cache(*trace, budget, None, step=0.5 if quick else 0.25)
        chosen = _strategy(cache["best"], None, depth)
        val = _validate(model, files, dtype, budget, chosen, held_w, base_held, names, lru_runs)
    say("4/5 timing decode on each kernel path (ggml, ggml as read, torch)")
    if hint := ggml.build_hint():
        say(f"note: {hint}")
    kernels, kernel_timing = _kernel_choice(
        model, files, dtype, budget, chosen, store, _trace_ids(fit_w, 32 if quick else 64)
    )
    route, route_timing = _prefill_route(files, store, quick)
    store.close()
    model = None
    gc.collect()
    trim()  # the calibration state
    fitted["kernel_timing"] = kernel_timing
    fitted["prefill_route_timing"] = route_timing
    fitted["threshold_rounds"] = rounds
    fitted["validation"] = val
    fitted["cache"] = cache
    if cache["cliff"]:
        say(cache["cliff"])
    if timing is not None:
        fitted["prefetch_timing"] = timing
    dynamic = chosen.dynamic_precision
    t1, t2 = (chosen.t1, chosen.t2) if dynamic else (1.0, 1.0)
    if dynamic:
        fitted["threshold_spread"] = spread(t1, t2, [i for i, m in enumerate(cfg.moe_layers) if m])
    best = cache["best"]
    runtime = {
        "policy": "hobbit",
        "memory": budget,
        "dynamic_precision": dynamic,
        "t1": _jsonable(t1),
        "t2": _jsonable(t2),
        "skip": "drop",
        "prefetch_depth": chosen.prefetch_depth,
        "cache_policy": best["cache_policy"],
        "cache_weights": list(best["weights"]) if best["weights"] else None,
        "low_share": best["low_share"] if dynamic else 0.25,
        "kernels": kernels,
        "prefill_route": route,
    }
    made_for = {"device": fingerprint(files.dir), "shards": shard_digests(files.dir)}
    path = Path(out) if out else config_path(files.dir)
    fitted["calibration"] = {
        "source": "the bundled set (calibration/SOURCES.md)"
        if calibration is None
        else str(calibration),
        "parts": {name: len(ids) for name, ids in parts},
        "fit_tokens": fit_w.tokens,
        "held_tokens": held_w.tokens,
    }
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
    say("5/5 writing the config and report")
    report = render_report(files, device, runtime, fitted, ppl_budget)
    (path.parent / REPORT_FILE).write_text(report)
    return {
        "config": str(path),
        "report": str(path.parent / REPORT_FILE),
        "runtime": runtime,
        "device": device,
        "fitted": fitted,
    }


def _load_costs(store: ExpertStore, device: dict, cfg) -> dict[str, float]:
    """Seconds a miss costs per precision: its bytes at the measured direct bandwidth, the
    conversion after the read where its kernel needs one (torch's, without a slot pack),
    and one token through it, timed on a real expert through the runtime's store."""
    bandwidth = device.get("best_direct_gbps") or device.get("buffered_gbps")
    kernels = device.get("kernels", {})
    layer = next(i for i, m in enumerate(cfg.moe_layers) if m)
    x = torch.randn(1, cfg.hidden_size).to(store.dtype)
    out = {}
    for p, q in store.p.items():
        expert = store.read(layer, 0, p, SlotArena(q.slot_bytes, 1).view(0))
        with torch.inference_mode():
            expert(x)
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                expert(x)
                times.append(time.perf_counter() - t0)
        torch_convert = q.kernel != "ggml" and q.pack is None
        convert = kernels.get(q.qtype, {}).get("convert_s", 0.0) if torch_convert else 0.0
        out[p] = q.load_bytes / (bandwidth * 1e9) + convert + min(times)
    return out


def _pooled(ppl_by_part: dict[int, float], windows: Windows) -> float:
    """The perplexity of all parts together (token-weighted mean of their log perplexity)."""
    n = {i: sum(len(t) for t, p in zip(windows.targets, windows.parts, strict=True) if p == i)
         for i in ppl_by_part}  # fmt: skip
    return math.exp(sum(n[i] * math.log(v) for i, v in ppl_by_part.items()) / sum(n.values()))


def _jsonable(t):
    if isinstance(t, torch.Tensor):
        return (
            [[round(float(v), 4) for v in row] for row in t.tolist()]
            if t.dim() == 2
            else [round(float(v), 4) for v in t.tolist()]
        )
    return float(t)


def _strategy(best: dict, rule: PrecisionRule | None, depth: int) -> Strategy:
    """The runtime strategy of a fitted cache and rule (None: all experts high)."""
    return Strategy(
        "tuned",
        cache=best["cache_policy"],
        dynamic_precision=rule is not None,
        prefetch_depth=depth,
        t1=rule.t1 if rule is not None else 1.0,
        t2=rule.t2 if rule is not None else 1.0,
        low_share=best["low_share"] if rule is not None else 0.25,
        cache_weights=tuple(best["weights"]) if best["weights"] else None,
    )


def _working_budget(cfg, store: ExpertStore, budget: int, planned: bool):
    """The budget the profile tunes for, and why dynamic precision is off (None: it is not).

    A planned budget a little below one layer's top-k experts at high precision (the least
    any offloaded run works with) is raised to that where half the runtime floor covers the
    gap: the floor is a margin, and a run at that minimum still decodes (measured inside a
    380 MiB limit on m742-q8: 28 MiB planned, 22 MiB cached, 8.6 tok/s against llama.cpp's
    1.2-2.4). Dynamic precision needs top-k experts cached at each precision; where the
    budget holds less, every expert is computed at high precision."""
    need = working_minimum(cfg.top_k, {p: q.slot_bytes for p, q in store.p.items()})
    if planned and budget < need["high"] <= budget + RUNTIME_FLOOR // 2:
        budget = need["high"]
    if "low" not in need:
        return budget, None
    both = need["high"] + need["low"]
    if budget >= both:
        return budget, None
    return budget, (
        f"the budget ({budget / 2**20:.1f} MiB) holds less than one layer's top-{cfg.top_k} "
        f"experts at both precisions ({both / 2**20:.1f} MiB): dynamic precision is off, "
        "every expert is computed at high precision"
    )


def _trace_strategy(rule: PrecisionRule | None, depth: int) -> Strategy:
    return Strategy(
        "calibration",
        cache="lru",
        dynamic_precision=rule is not None,
        prefetch_depth=depth,
        t1=rule.t1 if rule is not None else 1.0,
        t2=rule.t2 if rule is not None else 1.0,
    )


def _trace_ids(windows: Windows, n: int) -> list[int]:
    """n tokens from the windows' parts in turn (one decode sequence over every genre)."""
    parts = sorted(set(windows.parts))
    first = {p: next(w for w, q in zip(windows.inputs, windows.parts, strict=True) if q == p)
             for p in parts}  # fmt: skip
    each = max(1, n // len(parts))
    return [t for p in parts for t in first[p][:each]][:n]


def _backend(files, s: Strategy, budget: int, dtype, model, reserve: int = 0, **kw):
    """The runtime's backend for a decode inside the profile, its cache at `budget` or at
    what the process may still use now where that is less: the profile holds calibration
    state a run would not, and a cache past a memory limit is killed, not slowed."""
    now = available_memory().bytes - RUNTIME_FLOOR - reserve
    try:
        return build_backend(files, s, "high", min(budget, max(now, 1)), dtype, model, **kw)
    except BudgetBelowMinimum as e:
        # what is free now falls just short of one layer's experts: the floor is a margin,
        # and the working minimum may take up to half of it
        if e.minimum <= min(budget, now + RUNTIME_FLOOR // 2):
            return build_backend(files, s, "high", e.minimum, dtype, model, **kw)
        raise BudgetBelowMinimum(
            f"the profile's decode runs have {max(now, 0):,} bytes left for an expert cache "
            f"(what this process may still use, less the runtime's floor), below this model's "
            f"working minimum of {e.minimum:,} (one layer's experts): give the profile more "
            "memory, or profile where the experts' cache fits and copy the config",
            e.minimum,
        ) from None


def _validate(model, files, dtype, budget, chosen: Strategy, held: Windows, base: dict,
              names: list[str], lru_runs: dict) -> dict:  # fmt: skip
    """Every held-out piece decoded one token at a time under `chosen` at the budget (a
    fresh cache per piece, as a new `hobbit run`), its perplexity against the all-high
    one; and lru on each piece's first window, interleaved, for speed and bytes read (the
    first windows of both: each from a cold cache, so alike). lru's runs are kept in
    `lru_runs` (by piece) for the next validation: they would come out the same. Without
    dynamic precision only the first windows are decoded, for speed: every expert is then
    computed at high precision, and its perplexity is the all-high one."""
    lru = Strategy("lru")
    out, speed = {}, {"tuned_s": 0.0, "lru_s": 0.0, "tuned_bytes": 0, "lru_bytes": 0, "tokens": 0}
    for part in sorted(set(held.parts)):
        sel = held.select([i for i, p in enumerate(held.parts) if p == part])
        all_high = not chosen.dynamic_precision
        # alternate which goes first, so a neighbour's load falls on both alike
        if part % 2 and part not in lru_runs:
            lru_runs[part] = _decode_windows(model, files, dtype, budget, lru, sel.select([0]))
        runs = _decode_windows(
            model, files, dtype, budget, chosen, sel.select([0]) if all_high else sel
        )
        if part not in lru_runs:
            lru_runs[part] = _decode_windows(model, files, dtype, budget, lru, sel.select([0]))
        first = lru_runs[part]
        nll = sum(r["nll"] for r in runs["windows"])
        n = sum(r["tokens"] for r in runs["windows"])
        ppl = base[part] if all_high else math.exp(nll / n)
        n = sel.tokens if all_high else n
        out[names[part]] = {
            "base_ppl": base[part],
            "ppl": ppl,
            "ratio": ppl / base[part],
            "tokens": n,
            "share": runs["share"],
        }
        speed["tuned_s"] += runs["windows"][0]["seconds"]
        speed["tuned_bytes"] += runs["windows"][0]["bytes"]
        speed["lru_s"] += first["windows"][0]["seconds"]
        speed["lru_bytes"] += first["windows"][0]["bytes"]
        speed["tokens"] += runs["windows"][0]["tokens"]
    worst = max(out, key=lambda k: out[k]["ratio"])
    t = speed["tokens"]
    return {
        "parts": out,
        "worst_part": worst,
        "worst_ratio": out[worst]["ratio"],
        "speed": {
            "tokens": t,
            "tuned_tok_s": t / speed["tuned_s"],
            "lru_tok_s": t / speed["lru_s"],
            "tuned_bytes_per_token": speed["tuned_bytes"] / t,
            "lru_bytes_per_token": speed["lru_bytes"] / t,
        },
    }


def _decode_windows(model, files, dtype, budget, s: Strategy, windows: Windows) -> dict:
    """Each window decoded from an empty KV cache, one token at a time, through one backend
    under strategy `s`: per window its NLL, seconds and bytes read; the served shares."""
    backend = _backend(files, s, budget, dtype, model)
    model.experts = backend
    step = torch.empty(1, dtype=torch.long)
    rows = []
    for ids, target in zip(windows.inputs, windows.targets, strict=True):
        model.reset()
        b0 = backend.stats()["bytes_read"]
        t0 = time.perf_counter()
        nll = 0.0
        # scored token by token: a window's [T, vocab] logits kept for one cross entropy
        # would be 32 MiB for 256 tokens of a 32k vocabulary (twice, stacked)
        for t, want in zip(ids, target, strict=True):
            step[0] = t
            logit = model.forward(step).float().view(1, -1)
            nll += float(torch.nn.functional.cross_entropy(logit, torch.tensor([want])))
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "nll": float(nll),
                "tokens": len(target),
                "seconds": seconds,
                "bytes": backend.stats()["bytes_read"] - b0,
            }
        )
    share = backend.stats().get("share", {})
    _close(model, backend)
    return {"windows": rows, "share": share}


def _kernel_choice(model, files, dtype, budget, chosen: Strategy, store, ids):
    """Which compute path each quantized expert type takes, by decoding `ids` under the
    chosen strategy and budget each way, interleaved twice (medians): ggml on the GGUF bytes
    (rewritten in ggml's interleaved layout after each read where it has one for the type
    here), "ggml-plain" (the same bytes as read: a miss costs no rewrite, each use a little
    more; timed only where some type would be rewritten), or torch's kernels after a
    conversion (paid per miss when offloaded, and a larger slot where torch holds the type
    wider). Per-expert microbenchmarks cannot decide it: one expert sits in the CPU's cache,
    decode streams every expert from RAM, and how often a loaded copy is used before it is
    evicted is the cache's. An alternative is taken where it decodes in at most
    KERNEL_MIN_GAIN of ggml's time. Returns ({qtype: path}, the timings)."""
    from ..runtime import ggml

    quantized = sorted({q.qtype for q in store.p.values() if q.qtype in ggml.TYPES}
                       - set(UNPACKED_TYPES))  # fmt: skip
    if not quantized or not ggml.available():
        return {}, None
    # torch's loads convert on the I/O threads: each holds a staged read and its float32
    # dequantization, per read in flight, besides the cache
    cfg = files.config
    params = 3 * cfg.hidden_size * cfg.expert_ffn
    in_flight = READS_PER_THREAD * OffloadOptions.io_threads
    reserve = {"ggml": 0, "ggml-plain": 0, "torch": in_flight * params * (4 + 2)}
    runs: dict[str, list[float]] = {"ggml": []}
    if any(q.repack for q in store.p.values() if q.qtype in quantized):  # ggml rewrites some
        runs["ggml-plain"] = []
    notes = {}
    if available_memory().bytes - RUNTIME_FLOOR - reserve["torch"] < budget // 2:
        notes["torch"] = "does not fit: its conversions would take the memory the cache needs"
    else:
        runs["torch"] = []
    if len(runs) == 1:
        return dict.fromkeys(quantized, "ggml"), notes
    for _ in range(2):
        for path in runs:
            kernels = dict.fromkeys(quantized, path)
            runs[path].append(
                _decode(
                    model, files, dtype, budget, chosen, ids, kernels=kernels, reserve=reserve[path]
                )[0]  # fmt: skip
            )
    timing = {p: statistics.median(v) for p, v in runs.items()}
    faster = [p for p in timing if p != "ggml" and timing[p] <= KERNEL_MIN_GAIN * timing["ggml"]]
    path = min(faster, key=timing.get) if faster else "ggml"
    return dict.fromkeys(quantized, path), timing | notes | {"tokens": len(ids)}


def _prefill_route(files, store, quick: bool) -> tuple[dict, dict]:
    """From how many tokens an expert of this model's shape prefills faster through torch's
    bf16 GEMM than through ggml (`runtime/prefill.py`), per expert type it can expand, timed
    on this machine: ({qtype: tokens, 0 = never}, {qtype: the timings})."""
    from ..runtime import prefill

    cfg = files.config
    types = sorted({q.qtype for q in store.p.values()} & set(prefill.TYPES))
    if not types or not ggml.available() or cfg.hidden_size % 32 or cfg.expert_ffn % 32:
        return {}, {}
    tokens = (4, 16, 32, 64) if quick else (2, 4, 8, 16, 24, 32, 48, 64)
    timing = {q: prefill.measure((cfg.expert_ffn, cfg.hidden_size), q, tokens) for q in types}
    return {q: t["from"] for q, t in timing.items()}, timing


def _prefetch_timing(model, files, dtype, budget, chosen: Strategy, depth: int, ids) -> dict:
    """Decode seconds of `ids` with prefetch at `depth` and without, interleaved twice
    (medians): prefetch pays only where compute is a large enough share of a token to hide
    reads behind, which recall alone does not tell (docs/benchmarks.md 7)."""
    runs: dict[int, list[float]] = {depth: [], 0: []}
    for _ in range(2):
        for d in (depth, 0):
            s = dataclasses.replace(chosen, prefetch_depth=d)
            runs[d].append(_decode(model, files, dtype, budget, s, ids)[0])
    return {
        "depth": depth,
        "tokens": len(ids),
        "with_s": statistics.median(runs[depth]),
        "without_s": statistics.median(runs[0]),
    }


def _decode(
    model, files, dtype, budget, s: Strategy, ids, trace: bool = False, kernels=None, reserve=0
):
    """Decode `ids` one token at a time under strategy `s`: (seconds, trace header, trace
    records), the trace parts None unless asked for."""
    backend = _backend(files, s, budget, dtype, model, kernels=kernels, reserve=reserve)
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
    _close(model, backend)
    return seconds, header, records


def _close(model, backend) -> None:
    backend.close()
    # The backend's slot arenas (anonymous shared mmaps) live until its reference cycles are
    # collected: free them now, or the next run's arenas come on top (under a memory limit,
    # three decode runs in a row are then killed).
    model.experts = None
    del backend
    gc.collect()


def walk_bytes_per_token(cfg) -> int:
    """What the layer-by-layer pass holds per calibration token at its peak (float32): the
    residuals, their stacked copy, the combiner's per-slot outputs and its sum (~8 x hidden),
    and the FFN intermediates of the experts a token is routed to (~4 x ffn x top-k / E of
    them at once)."""
    return 4 * (8 * cfg.hidden_size + 4 * cfg.expert_ffn * cfg.top_k // cfg.num_experts)


def walk_tokens(cfg, free: int) -> int:
    """Calibration tokens whose pass fits in `free` bytes (what the expert cache may use:
    during the pass only one expert per precision is held), with a margin; never below
    WALK_MIN_TOKENS, under which the fit is noise."""
    return max(WALK_MIN_TOKENS, int(0.6 * free) // walk_bytes_per_token(cfg))


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


def render_report(files, device, runtime, fitted, ppl_budget) -> str:
    cal = fitted["calibration"]
    lines = [
        f"# hobbit profile: {files.dir.name}",
        "",
        f"Model: {files.config.family}, {sum(files.config.moe_layers)} MoE layers x "
        f"{files.config.num_experts} experts, top-{files.config.top_k}; shards "
        + ", ".join(f"{p} {files.manifest['types'][p]}" for p in files.precisions),
        f"Calibration: {cal['source']}, parts "
        + ", ".join(f"{k} ({v} tokens)" for k, v in cal["parts"].items())
        + f"; {cal['fit_tokens']} tokens fitted on, {cal['held_tokens']} held out.",
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
            f"- expert FFN (torch), {q}: "
            + ", ".join(f"{name} {v * 1e3:.2f} ms" for name, v in k.items() if name.endswith("_s"))
        )
        if k.get("ggml"):
            lines.append(
                f"- expert FFN (ggml, on the GGUF bytes), {q}: "
                + ", ".join(f"{name} {v * 1e3:.2f} ms" for name, v in k["ggml"].items())
                + " (one expert, warm in the CPU's cache)"
            )
    hint = ggml.build_hint()
    if hint:
        lines.append(f"- {hint}")
    kt = fitted.get("kernel_timing")
    if kt and "tokens" not in kt:
        lines.append(f"- kernels {runtime.get('kernels')}: torch's {kt['torch']}")
    elif kt:
        timed = ", ".join(
            f"{p} {v:.2f} s" if isinstance(v, float) else f"{p}: {v}"
            for p, v in kt.items()
            if p != "tokens"
        )
        lines.append(
            f"- decode of {kt['tokens']} tokens under the chosen strategy: {timed} "
            f"-> kernels {runtime.get('kernels')}"
        )
    for q, t in (fitted.get("prefill_route_timing") or {}).items():
        lines.append(
            f"- prefill of one {q} expert, ggml / torch bf16 ms at "
            + ", ".join(
                f"{n} tokens {g:.2f} / {b:.2f}"
                for n, g, b in zip(t["tokens"], t["ggml_ms"], t["bf16_ms"], strict=True)
            )
            + (f" -> bf16 from {t['from']} tokens" if t["from"] else " -> ggml")
        )
    val = fitted["validation"]
    sp = val["speed"]
    mib = 1 << 20
    lines += [
        "",
        "## What the budget bought",
        "",
        f"Decoding the held-out pieces' first windows ({sp['tokens']} tokens, a fresh cache "
        f"each) under the {runtime['memory'] / mib:,.1f} MiB expert budget:",
        "",
        "| | decode tok/s | vs lru | MiB read / token |",
        "|---|---|---|---|",
        f"| lru (all high) | {sp['lru_tok_s']:.1f} | 1.00x | {sp['lru_bytes_per_token'] / mib:.3f} |",
        f"| tuned | {sp['tuned_tok_s']:.1f} | {sp['tuned_tok_s'] / sp['lru_tok_s']:.2f}x | "
        f"{sp['tuned_bytes_per_token'] / mib:.3f} |",
        "",
        f"Perplexity of each held-out piece, decoded one token at a time with the tuned config, "
        f"against all experts at high precision (the budget is +{ppl_budget:.1%}; the fit had "
        f"to leave {MARGIN:.0%} of it for text nobody measured):"
        if runtime["dynamic_precision"]
        else "Perplexity of each held-out piece: every expert is computed at high precision, "
        "so it is the all-high one (not decoded again):",
        "",
        "| piece | all-high | tuned | rise | high/low/skip |",
        "|---|---|---|---|---|",
    ]
    for name, r in val["parts"].items():
        sh = r["share"]
        mix = "/".join(f"{sh.get(k, 0):.0%}" for k in ("high", "low", "skip"))
        worst = " (worst)" if name == val["worst_part"] else ""
        lines.append(
            f"| {name}{worst} | {r['base_ppl']:.3f} | {r['ppl']:.3f} | {r['ratio'] - 1:+.2%} | {mix} |"
        )
    lines += ["", "## Chosen settings", ""]
    for key, value in runtime.items():
        if key in ("t1", "t2") and isinstance(value, list):
            value = "per layer and expert (below)"
        lines.append(f"- `{key}`: {value}")
    lines += ["", "## Why", ""]
    cost = fitted["load_cost_s"]
    lines.append(
        "- load cost of a miss (read at direct bandwidth, + conversion where the kernel needs "
        "one, + one token through a real expert): "
        + ", ".join(f"{p} {v * 1e3:.3f} ms" for p, v in cost.items())
    )
    if fitted.get("low_off"):
        lines.append(f"- {fitted['low_off']}")
    if not fitted.get("low_pays", True):
        lines.append(
            "- the low-precision copy costs more to load and compute than the high one here: "
            "only skipping is used"
        )
    for k, r in enumerate(fitted["threshold_rounds"], 1):
        tried = ", ".join(
            f"#{t['index']} {t['worst_fit_ratio'] - 1:+.2%}{'' if t['ok'] else ' x'}"
            for t in r["tried"]
        )
        held = r.get("worst_held_ratio")
        lines.append(
            f"- thresholds, fit {k}: allowed +{ppl_budget * r['share']:.2%} on the worst fitting "
            f"piece; of {r['front']} per-expert assignments (cheapest to all-high) tried {tried}; "
            + (f"chose #{r['index']}" if r["index"] is not None else "none met it: all high")
            + (f", worst held-out piece {held - 1:+.2%}" if held is not None else "")
        )
    if "threshold_spread" in fitted:
        lines.append(
            "- thresholds per MoE layer over its experts (min / median / max; high below T1, "
            "skipped above T2, T1 0: even a token's top-1 selection of the expert goes low):"
        )
        for layer, v in fitted["threshold_spread"].items():
            lines.append(
                f"  - layer {layer}: T1 {v['t1'][0]:.2f} / {v['t1'][1]:.2f} / {v['t1'][2]:.2f}, "
                f"T2 {v['t2'][0]:.2f} / {v['t2'][1]:.2f} / {v['t2'][2]:.2f}"
            )
    elif fitted.get("threshold_rounds"):
        lines.append("- every expert at high precision: no fit held on the held-out pieces")
    else:
        lines.append("- no low-precision shard: all experts at high precision")
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
    m = fitted["memory"]
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

"""`hobbit`: a thin shell over the library. Each command parses, calls one function, prints
text for people or one JSON object (`--json`) for pipelines. Errors a user can fix print one
line and exit 1, never a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import HobbitError

TYPE_HELP = "F32, F16, BF16"


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HobbitError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hobbit")
def main() -> None:
    """hobbit: run Mixture-of-Experts models larger than your fast memory.

    \b
    Pipeline:
      hobbit prepare HF_CHECKPOINT -o MODEL_DIR   # GGUF shards: dense + expert shards
      hobbit run MODEL_DIR --prompt "..."          # generate
    """


def runtime_options(f):
    """The options every command that runs the model shares (run, eval, ...)."""
    options = [
        click.option("--precision", default="high", show_default=True, type=click.Choice(["high", "low"]),
                     help="Which expert shard serves when dynamic precision is off."),
        click.option("--memory", help="Expert cache budget: bytes, a size (1.5GiB, 800MB) or a share of what "
                     "all experts take in memory at high precision (30%). Default: what this process may use "
                     "(MemAvailable or its cgroup limit, the smaller) less dense, KV and a floor."),
        click.option("--policy", type=click.Choice(["resident", "ondemand", "lru", "lfu", "lru+prefetch", "hobbit"]),
                     help="Offloading strategy. Default: the tuned config's; else resident when all experts "
                     "fit in the budget, lru when they do not. "
                     "hobbit = dynamic precision + adaptive prefetch + multidimensional cache."),
        click.option("--dynamic-precision/--no-dynamic-precision", default=None,
                     help="Load unimportant cache misses in low precision, or skip them (default: per policy)."),
        click.option("--prefetch-depth", type=int, help="Layers to prefetch ahead; 0 = off (default: per policy)."),
        click.option("--no-prefetch", is_flag=True, help="Same as --prefetch-depth 0."),
        click.option("--cache-policy", type=click.Choice(["lru", "lfu", "hobbit", "lcu", "decay", "forecast", "layer-lfu", "layer-lru"]),
                     help="Eviction policy (default: per policy; forecast instead of lru below one token's working set)."),
        click.option("--max-context", type=int, help="KV cache length (default: model's, at most 4096)."),
        click.option("--config", "config", type=click.Path(path_type=str),
                     help="Tuned config to use (default: hobbit-config.json next to the shards, "
                     "when no --policy is given)."),
        click.option("--no-config", is_flag=True, help="Ignore any tuned config."),
        click.option("--kernels", type=click.Choice(["ggml", "ggml-plain", "torch"]),
                     help="Compute path of quantized experts: ggml on the GGUF bytes in place "
                     "(rewritten in ggml's interleaved layout where it has one: faster per use), "
                     "ggml-plain (as read: cheaper per cache miss), or torch's kernels after a "
                     "conversion (default: the tuned config's, else ggml)."),
        click.option("--threads", type=click.IntRange(1, 256),
                     help="Compute threads of the kernels (default: the CPUs this process may use "
                     "that no other process keeps busy; torch keeps one unless it computes experts)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="Compute dtype (default: the dense shard's; float32 on CPUs without a fast bf16 GEMM)."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def _load(
    model_dir,
    *,
    quiet=False,
    no_prefetch=False,
    prefetch_depth=None,
    no_config=False,
    config=None,
    **options,
):
    """Load MODEL_DIR, or the bundled demo model (prepared on first use) when it is None."""
    from .runtime import load

    if model_dir is None:
        from . import demo

        say = (lambda m: None) if quiet else (lambda m: click.echo(f"[{m}]", err=True))
        model_dir = str(demo.prepared_demo(progress=_tty() and not quiet, say=say))
        say(f"demo model: {model_dir}")
    rt = load(
        model_dir,
        prefetch_depth=0 if no_prefetch else prefetch_depth,
        config=False if no_config else config,
        **options,
    )
    if rt.info.get("cliff") and not quiet:
        click.echo(f"[{rt.info['cliff']}]", err=True)
    if rt.info.get("memory_source") and rt.info["policy"] != "resident" and not quiet:
        click.echo(f"[no --memory: {rt.info['memory_source']}; offloading]", err=True)
    if rt.info.get("config") and not quiet:
        click.echo(f"[using tuned config {rt.info['config']} (--no-config to ignore)]", err=True)
    stale = [p for p, ok in rt.info.get("packed", {}).items() if not ok]
    if stale and not quiet:
        click.echo(
            f"[experts-{'/'.join(stale)}: no current slot pack, so every cache miss converts "
            f"after the read (slower); write one with `hobbit pack {model_dir}`]",
            err=True,
        )
    return rt


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.option("-o", "--out", type=click.Path(path_type=str), help="Model dir to write.")
@click.option(
    "--dense",
    help=f"Type of non-expert matrices ({TYPE_HELP}, or a quantized type such as Q8_0, as "
    "llama.cpp's converter writes a Q8_0 model; norms and routers stay F32). "
    "Default: the checkpoint's dtype.",
)
@click.option(
    "--high",
    help="Type of the high-precision expert shard. Default: Q8_0 where the shapes allow, else the checkpoint's dtype.",
)
@click.option(
    "--low",
    help="Type of the low-precision expert shard, or 'none'. Default: Q4_K where the shapes allow.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUT if it is an empty dir or a model dir hobbit wrote (nothing else).",
)
@click.option(
    "--recipe", help="Preset (a name in recipes/ or a TOML path) giving the types; flags win."
)
@click.option(
    "--check",
    is_flag=True,
    help="Instead of converting, re-verify the model dir SRC: its manifest's fields, the "
    "sha256 of every shard, the crc32 of every slot pack image; exit 0 if intact, 1 with "
    "what differs.",
)
@click.option(
    "--pack/--no-pack",
    default=None,
    help="Also write slot packs: the quantized experts pre-converted for torch's kernels "
    "(packs/), so a cache miss there is one read and no conversion. Costs disk: about 2 "
    "bytes a weight for Q8_0/Q6_K, 0.63 for 4-bit types. Default: only for types that "
    "torch's kernels serve here; ggml's compute on the shards' own bytes and need none.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the manifest (or check result) as JSON."
)
def prepare(src, out, dense, high, low, force, recipe, check, pack, as_json) -> None:
    """Convert a Hugging Face MoE checkpoint SRC into a model dir of GGUF shards.

    SRC is a directory with config.json, model*.safetensors (single or sharded with its
    index) and tokenizer.json. OUT gets a dense shard (everything but the routed experts,
    metadata and tokenizer), one expert shard per precision and manifest.json. Work happens
    in a temporary dir renamed to OUT at the end, so OUT is never half-written.
    """
    if check:
        from .inspect import check as run_check

        problems = run_check(src)
        if as_json:
            click.echo(json.dumps({"model_dir": src, "ok": not problems, "problems": problems}))
        else:
            click.echo(f"{src}: " + ("intact" if not problems else "DIFFERS from its manifest"))
            for p in problems:
                click.echo(f"  {p}")
            if problems:
                click.echo(
                    f"  fix: packs/ with `hobbit pack {src}`; shards or manifest with "
                    f"`hobbit prepare SRC -o {src} --force`"
                )
        sys.exit(1 if problems else 0)
    if not out:
        raise click.UsageError("give the output dir with -o/--out")
    from .quantize.convert import prepare as run_prepare
    from .recipes import load_recipe

    preset = load_recipe(recipe, "prepare")
    dense, high, low = (
        dense or preset.get("dense"),
        high or preset.get("high"),
        low or preset.get("low"),
    )
    manifest = run_prepare(
        src,
        out,
        dense=dense,
        high=high,
        low=low,
        force=force,
        progress=_tty() and not as_json,
        pack=pack,
    )
    if as_json:
        click.echo(json.dumps({"out": out, **manifest}, indent=2))
        return
    click.echo(f"wrote {out}")
    for s in manifest["shards"]:
        click.echo(f"  {s['file']:<28} {s['type']:<5} {_gib(s['bytes'])}")


@main.command()
@click.argument("model_dir", required=False, type=click.Path(path_type=str))
@click.option("-p", "--prompt", help="Text to continue (required with MODEL_DIR).")
@click.option("-n", "--max-tokens", default=128, show_default=True, help="New tokens at most.")
@click.option(
    "-t",
    "--temperature",
    type=float,
    help="0 = greedy (the default; the demo model samples at 0.8).",
)
@click.option("--top-k", type=int, help="Sample from the k best (0 = off; the demo model uses 40).")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, help="Seed for sampling.")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@runtime_options
@click.option(
    "--trace",
    "trace_file",
    type=click.Path(path_type=str),
    help="Write a routing trace (JSON lines).",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"text", "token_ids", "stats"}.')
def run(
    model_dir,
    prompt,
    max_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    stop,
    trace_file,
    as_json,
    **runtime,
):
    """Generate text from a prepared MODEL_DIR, streaming it, then a stats line.

    Without MODEL_DIR, runs the bundled demo model (prepared and profiled on first use into
    ~/.cache/hobbit) with its experts offloaded under a budget of half their bytes.
    """
    if model_dir is None:
        from . import demo

        prompt = prompt or demo.PROMPT
        temperature = demo.SAMPLING["temperature"] if temperature is None else temperature
        top_k = demo.SAMPLING["top_k"] if top_k is None else top_k
        seed = demo.SAMPLING["seed"] if seed is None else seed
    elif prompt is None:
        raise click.UsageError("give a prompt with -p/--prompt")

    # a prompt has at most one token per byte (byte-level BPE, or byte fallback), plus the
    # template's few: the KV cache and the default budget are sized to this run
    tokens = len(prompt.encode("utf-8", "surrogatepass")) + max_tokens + 8
    rt = _load(model_dir, quiet=as_json, tokens=tokens, **runtime)
    if trace_file:
        rt.start_trace()
    params = dict(
        max_new_tokens=max_tokens,
        temperature=temperature or 0.0,
        top_k=top_k or 0,
        top_p=top_p,
        seed=seed,
        stop=stop,
    )
    if as_json:
        g = rt.generate(prompt, **params)
        stats = {**g.stats, "load": rt.info}
        click.echo(json.dumps({"text": g.text, "token_ids": g.token_ids, "stats": stats}))
        if trace_file:
            rt.write_trace(trace_file)
        return
    chunks = rt.stream(prompt, **params)
    click.echo(prompt, nl=False)
    while True:
        try:
            click.echo(next(chunks).text, nl=False)
        except StopIteration as done:
            g = done.value
            break
    if trace_file:
        rt.write_trace(trace_file)
    s, info = g.stats, rt.info
    share = s.get("share")
    mix = (
        f", high/low/skip {share['high']:.0%}/{share['low']:.0%}/{share['skip']:.0%}"
        if share
        else ""
    )
    click.echo(
        f"\n\n[{s['prompt_tokens']} prompt tokens, prefill {s['prefill_tokens_per_s']:.1f} tok/s | "
        f"{s['new_tokens']} new tokens, decode {s['decode_tokens_per_s']:.2f} tok/s | "
        f"{info['precision']} experts ({info['expert_type']}), {info['dtype']}]\n"
        f"[experts: {info['policy']}, cache {_gib(info['cache_bytes'])} of "
        f"{_gib(info['full_cache_bytes'])}, hit rate {s['hit_rate']:.0%}{mix}, "
        f"read {_gib(s['bytes_read'])}, waited {s['io_wait_s']:.2f} s on I/O]\n"
        f"[memory: {_memory_parts(info['memory'], s['kv_bytes'])}, peak RSS {_gib(s['peak_rss_bytes'])}]",
        err=True,
    )


def _memory_parts(parts: dict, kv_now: int) -> str:
    parts = {**parts, "kv": kv_now}
    names = {"runtime": "runtime", "dense": "dense", "kv": "KV", "expert_cache": "expert cache",
             "staging": "staging"}  # fmt: skip
    shown = " + ".join(f"{names[k]} {_gib(v)}" for k, v in parts.items() if v or k != "staging")
    return f"{shown} = {_gib(sum(parts.values()))}"


@main.command()
@click.argument("model_dir", required=False, type=click.Path(path_type=str))
@click.option("--memory", default="25%,50%", show_default=True, help="Budgets, comma-separated.")
@click.option(
    "--policies",
    default="resident,ondemand,lru,lfu,lru+prefetch,hobbit",
    show_default=True,
    help="Comma-separated strategies.",
)
@click.option("-n", "--max-tokens", default=32, show_default=True, help="New tokens per prompt.")
@click.option("--precision", default="high", show_default=True, type=click.Choice(["high", "low"]))
@click.option(
    "--ppl-text",
    type=click.Path(path_type=str),
    help="Also measure perplexity of each run on this text.",
)
@click.option("--ppl-tokens", default=512, show_default=True, help="Tokens of --ppl-text to score.")
@click.option(
    "--repeat",
    default=1,
    show_default=True,
    help="Run the whole list this many times, interleaved; report the median tokens/s and "
    "the median of the paired ratios to lru (for shared, noisy machines).",
)
@click.option(
    "--baseline",
    type=click.Choice(["llama.cpp"]),
    help="Also run llama.cpp (llama-cpp-python, if installed) on the same split, prompts "
    "and tokens, and give every run's ratio to it.",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    help="Compute threads for hobbit's kernels and the baseline's (default: the CPUs this "
    "process may use that no other process keeps busy).",
)
@click.option(
    "--plot",
    type=click.Path(path_type=str),
    help="Write a PNG of tokens/s against budget per policy.",
)
@click.option(
    "--json", "as_json", is_flag=True, help='Print {"runs": [...], "bound_tokens_per_s": ...}.'
)
def bench(
    model_dir,
    memory,
    policies,
    max_tokens,
    precision,
    ppl_text,
    ppl_tokens,
    repeat,
    baseline,
    threads,
    plot,
    as_json,
) -> None:
    """Run policies side by side on the same prompts, one after another in one process:
    decode tokens/s, bytes read per token, hit rate, high/low/skip shares, each run's ratio
    to lru, and the physical bound of this machine (perfect overlap of reads and compute).
    MODEL_DIR defaults to the demo model."""
    from .bench import bench as run_bench
    from .bench import format_table, plot_runs

    if model_dir is None:
        from . import demo

        model_dir = str(demo.prepared_demo(progress=_tty()))
    if baseline == "llama.cpp":
        from .llamacpp import INSTALL, installed

        if not installed():
            raise click.ClickException(INSTALL)
    if threads:
        from .runtime import ggml

        ggml.set_threads(threads)
    result = run_bench(
        model_dir,
        [m.strip() for m in memory.split(",")],
        [p.strip() for p in policies.split(",")],
        max_new_tokens=max_tokens,
        precision=precision,
        ppl_text=ppl_text,
        ppl_tokens=ppl_tokens,
        repeat=repeat,
        baseline=baseline,
        progress=None if as_json else lambda what: click.echo(f"  running {what}", err=True),
    )
    if plot:
        plot_runs(result, plot)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


@main.command()
@click.argument("trace_file", type=click.Path(path_type=str))
@click.option("--memory", default="30%", show_default=True, help="Budget(s), comma-separated.")
@click.option(
    "--cache-policy",
    help="Comma-separated, from belady (the offline optimum), fitted (needs --split) and the "
    "runtime's policies. Default: belady,lru,lfu,hobbit,lcu, and fitted with --split.",
)
@click.option(
    "--split",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    help="Score only the trace after this share of its tokens (the cache runs over all); "
    "fitted is fitted on the part before.",
)
@click.option("--dynamic-precision", is_flag=True, help="Re-derive high/low/skip with --t1/--t2.")
@click.option(
    "--t1", default=0.6, show_default=True, help="Unimportance threshold for low precision."
)
@click.option("--t2", default=0.9, show_default=True, help="Unimportance threshold for skipping.")
@click.option(
    "--low-share", default=0.25, show_default=True, help="Budget share of low copies (dynamic)."
)
@click.option("--expert-bytes", type=int, help="CSV traces: bytes of one expert, every layer.")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=str),
    help="CSV traces: take expert sizes from this prepared model dir.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def replay(
    trace_file,
    memory,
    cache_policy,
    split,
    dynamic_precision,
    t1,
    t2,
    low_share,
    expert_bytes,
    model_dir,
    as_json,
) -> None:
    """Replay a routing trace (from `hobbit run --trace`, or a CSV routing trace) through
    cache policies and budgets without running the model: hits, bytes read, miss penalty,
    prefetch recall."""
    from .profile.fit import fitted_replay, held_out_summary
    from .runtime.precision import PrecisionRule
    from .runtime.replay import read_trace, requests
    from .runtime.replay import replay as run_replay

    header, records = read_trace(trace_file, expert_bytes=expert_bytes, model_dir=model_dir)
    rule = PrecisionRule(t1, t2) if dynamic_precision else None
    default = "belady,lru,lfu,hobbit,lcu" + (",fitted" if split else "")
    policies = [p.strip() for p in (cache_policy or default).split(",")]
    if "fitted" in policies and split is None:
        raise HobbitError("fitted is fitted on the trace before --split: give --split 0.5")
    reqs = requests(header, records, rule)
    opts = {"low_share": low_share, "split": split}
    results = []
    for m in [m.strip() for m in memory.split(",")]:
        for p in policies:
            if p == "fitted":
                r = fitted_replay(header, reqs, m, rule, split)
            else:
                r = run_replay(header, reqs, memory=m, cache_policy=p, rule=rule, **opts)
            results.append({"memory": m, **r})
    for s in held_out_summary(results):
        fitted = (r for r in results if r["cache_policy"] == "fitted")
        next(r for r in fitted if r["memory"] == s["memory"]).update(s)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    if header.get("sizes_from"):
        click.echo(f"[expert sizes from {header['sizes_from']}]", err=True)
    for m in dict.fromkeys(r["memory"] for r in results):
        warning = next(r["cliff"] for r in results if r["memory"] == m)
        if warning:
            click.echo(f"[{m}: {warning}]", err=True)
    scored = f" (scored after {split:.0%} of the tokens)" if split else ""
    click.echo(
        f"{'memory':>8} {'policy':<10} {'hit rate':>8} {'MiB read':>9} {'miss penalty':>12} "
        f"{'high/low/skip':>14}{scored}"
    )
    for r in results:
        sh = r["share"]
        fit = r.get("fit")
        click.echo(
            f"{r['memory']:>8} {r['cache_policy']:<10} {r['hit_rate']:>8.1%} {r['bytes_read'] / 2**20:>9.1f} "
            f"{r['miss_penalty']:>12.1f} {sh['high']:>5.0%}/{sh['low']:.0%}/{sh['skip']:.0%}"
            + (f"  = {fit['cache_policy']} {fit['weights'] or ''}".rstrip() if fit else "")
            + (
                f"; >= max(lru, lfu): {'yes' if r['fitted_at_least_lru_lfu'] else 'NO'}, "
                f"closes {r['gap_closed']:.0%} of the lru-belady gap"
                if r.get("gap_closed") is not None
                else ""
            )
        )
    if results and results[0]["prefetch_recall"]:
        click.echo(
            "prefetch recall by depth: "
            + ", ".join(f"{d}: {v:.0%}" for d, v in results[0]["prefetch_recall"].items())
        )


@main.command()
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(model_dir, as_json) -> None:
    """Show what a prepared MODEL_DIR holds: shards, types, bytes per expert."""
    from .inspect import describe

    d = describe(model_dir)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(
        f"{model_dir}: {d['model_type']}, {d['moe_layers']} MoE layers x {d['num_experts']} experts"
    )
    for s in d["shards"]:
        click.echo(f"  {s['file']:<28} {s['role']:<13} {s['type']:<5} {_gib(s['bytes']):>10}")
    for p, b in d["expert_bytes"].items():
        click.echo(f"  one expert, {p}: {_gib(b)}; all {p}: {_gib(d['expert_shard_bytes'][p])}")
    for p, k in d["packs"].items():
        click.echo(
            f"  packs/experts-{p}.slots: {_gib(k['bytes'])}, {k['slot_bytes']:,} bytes an expert"
        )


@main.command()
@click.argument("model_dir", type=click.Path(path_type=str))
def pack(model_dir) -> None:
    """Write or refresh MODEL_DIR's slot packs: each quantized expert shard pre-converted to
    the bytes an expert takes in the runtime's cache, so a miss is one read and no
    conversion (`hobbit prepare` does this unless --no-pack). Needed again after a torch
    upgrade changes a kernel layout; up-to-date packs are left alone."""
    from .runtime.pack import build

    for precision, what in build(model_dir, progress=_tty()).items():
        click.echo(f"experts-{precision}: {what}")


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.option(
    "-o", "--out", required=True, type=click.Path(path_type=str), help="Checkpoint dir to write."
)
@click.option(
    "--expert-ffn", required=True, type=int, help="New width of every routed expert's FFN."
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUT if it is an empty dir or a checkpoint synth/widen wrote (nothing else).",
)
def widen(src, out, expert_ffn, force) -> None:
    """Copy HF checkpoint SRC with its experts zero-padded to --expert-ffn: the same function
    and routing, experts as large as a big model's. For benchmarks on real routing."""
    from .synth import widen_checkpoint

    try:
        widen_checkpoint(src, out, expert_ffn, force=force, progress=_tty())
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {out}")


@main.command()
@click.argument("out", type=click.Path(path_type=str))
@click.option(
    "--preset",
    default="mixtral-mini",
    show_default=True,
    type=click.Choice(
        ["mixtral-mini", "mixtral-1g", "mixtral-2g", "qwen3-routing", "qwen3-experts", "olmoe"]
    ),  # fmt: skip
    help="Shape: mixtral-*: Mixtral proportions scaled down; qwen3-routing: Qwen3-30B-A3B's "
    "48 layers x 128 experts top-8 with tiny dims (lookups dominate); qwen3-experts: its "
    "expert dims (128 x 2048x768, top-8), 2 layers; olmoe: OLMoE's (64 x 2048x1024, top-8).",
)
@click.option("--layers", type=int, help="Override the preset's layer count.")
@click.option(
    "--dtype", default="bf16", show_default=True, type=click.Choice(["bf16", "f16", "f32"])
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUT if it is an empty dir or a checkpoint synth/widen wrote (nothing else).",
)
def synth(out, preset, layers, dtype, seed, force) -> None:
    """Write a random-weight Mixtral-architecture HF checkpoint to OUT, for benchmarks.

    Its text is noise; its shapes, bytes and I/O are real. Prepare it like any checkpoint.
    """
    import dataclasses

    import torch

    from .synth import PRESETS, make_random_checkpoint

    shape = PRESETS[preset]
    if layers:
        shape = dataclasses.replace(shape, layers=layers)
    dt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    make_random_checkpoint(out, shape, dtype=dt, seed=seed, force=force, progress=_tty())
    click.echo(f"wrote {out} ({shape})")


@main.command("profile")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option(
    "--calibration",
    type=click.Path(path_type=str),
    help="Calibration text: a file (cut into 4 parts) or a dir of .txt files, one part each "
    "(default: the bundled set of four genres).",
)
@click.option(
    "--memory",
    help="Expert cache budget to tune for (default: what this process may use, the smaller of "
    "MemAvailable and its cgroup limit, less dense, KV and a floor).",
)
@click.option(
    "--ppl-budget", type=float, help="Allowed perplexity increase over all-high (default 0.01)."
)
@click.option(
    "--max-tokens", type=int, help="Calibration tokens at most, over all parts (default 4096)."
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    help="Compute threads while profiling, as for `hobbit run` (default: the CPUs this "
    "process may use that no other process keeps busy).",
)
@click.option(
    "--recipe",
    help="Preset (a name in recipes/ or a TOML path) giving profile settings; flags win.",
)
@click.option("--quick", is_flag=True, help="Fewer probes and candidates (CI smoke tests).")
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=str),
    help="Config path (default: MODEL_DIR/hobbit-config.json).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print everything measured and chosen as JSON."
)
def profile_cmd(
    model_dir, calibration, memory, ppl_budget, max_tokens, threads, recipe, quick, out, as_json
) -> None:
    """Measure this device and MODEL_DIR on calibration text, fit the runtime's knobs
    (thresholds, prefetch depth, cache policy and weights, budget) and write a tuned config
    that `hobbit run` then uses by default, plus profile-report.md explaining it."""
    from .profile.profiler import profile
    from .recipes import load_recipe

    preset = load_recipe(recipe, "profile")
    result = profile(
        model_dir,
        calibration=calibration or preset.get("calibration"),
        memory=memory or preset.get("memory"),
        ppl_budget=ppl_budget if ppl_budget is not None else preset.get("ppl_budget", 0.01),
        max_tokens=max_tokens or preset.get("max_tokens", 4096),
        threads=threads or preset.get("threads"),
        quick=quick,
        out=out,
        say=(lambda m: None) if as_json else (lambda m: click.echo(m, err=True)),
    )
    if as_json:
        click.echo(json.dumps(result, indent=2, default=_jsonable))
        return
    click.echo(Path(result["report"]).read_text())
    click.echo(f"wrote {result['config']} and {result['report']}")


def _jsonable(o):
    if isinstance(o, tuple):
        return list(o)
    return str(o)


@main.group("eval")
def eval_group() -> None:
    """Measure quality under any runtime setting."""


@eval_group.command("ppl")
@click.argument("model_dir", required=False, type=click.Path(path_type=str))
@click.option(
    "--text",
    "text_file",
    required=True,
    type=click.Path(path_type=str),
    help="UTF-8 text to score.",
)
@click.option(
    "--max-tokens", default=2048, show_default=True, help="Score at most this many tokens."
)
@click.option(
    "--window", default=256, show_default=True, help="Tokens per window (each from an empty cache)."
)
@click.option(
    "--mode",
    type=click.Choice(["decode", "prefill"]),
    default="decode",
    show_default=True,
    help="decode: one token at a time, as generation runs; prefill: one forward per window.",
)
@runtime_options
@click.option(
    "--json", "as_json", is_flag=True, help='Print {"ppl", "tokens", "settings", "stats"}.'
)
def eval_ppl(model_dir, text_file, max_tokens, window, mode, as_json, **runtime) -> None:
    """Perplexity of MODEL_DIR (default: the demo model) on a text file."""
    from .evaluate import perplexity, read_text

    text = read_text(text_file)
    rt = _load(model_dir, quiet=as_json, **runtime)
    r = perplexity(rt, text, max_tokens=max_tokens, window=window, mode=mode)
    settings = {**rt.info, "text": text_file, "window": window, "mode": mode}
    if as_json:
        click.echo(
            json.dumps(
                {"ppl": r["ppl"], "tokens": r["tokens"], "settings": settings, "stats": r["stats"]}
            )
        )
        return
    st = r["stats"]
    share = st.get("share")
    mix = (
        f", high/low/skip {share['high']:.0%}/{share['low']:.0%}/{share['skip']:.0%}"
        if share
        else ""
    )
    click.echo(
        f"perplexity {r['ppl']:.3f} over {r['tokens']} tokens ({rt.info['policy']}, "
        f"hit rate {st['hit_rate']:.0%}{mix}, {st['tokens_per_s']:.1f} tok/s)"
    )


def _tty() -> bool:
    return sys.stderr.isatty()


def _gib(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)

"""One validation of every number that reaches hobbit from outside: a checkpoint's
config.json, a manifest, a recipe, a tuned config, a flag or an API argument.

Bounds follow from the model where they can (prefetch depth <= layers, top-k <= experts,
a budget no larger than what all experts take); elsewhere they are wide sanity limits that
stop a typo from allocating the machine away. Each failure is one line naming the field, the
value and the allowed range.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from .errors import HobbitError

MAX_LAYERS = 1024  # the deepest released MoE has 94; a bigger number is a typo
MAX_EXPERTS = 1 << 16  # the widest has 384
MAX_DIM = 1 << 20
MAX_VOCAB = 1 << 24
SEED_MAX = 2**63 - 1
SKIP_MODES = ("drop", "renormalize")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX8 = re.compile(r"^[0-9a-f]{8}$")


def _cache_policies() -> tuple[str, ...]:
    from .runtime.policies import CACHE_POLICIES  # (runtime imports this module)

    return tuple(p for p in CACHE_POLICIES if p != "ondemand")


def bounded(field: str, value, lo, hi=None, *, where: str = "", integer: bool = False):
    """`value` if it is a finite number in [lo, hi] (hi None: no upper bound), else an error."""
    ok_type = (int,) if integer else (int, float)
    rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
    if isinstance(value, bool) or not isinstance(value, ok_type):
        kind = "an integer" if integer else "a number"
        raise HobbitError(f"{where}{field} = {value!r} is not {kind} (allowed: {rng})")
    if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
        raise HobbitError(f"{where}{field} = {value!r} is out of range (allowed: {rng})")
    return value


def model_numbers(where: str, *, layers, hidden, heads, experts, top_k, expert_ffn, vocab):
    """config.json's shape numbers, before anything is sized by them."""
    bounded("num_hidden_layers", layers, 1, MAX_LAYERS, where=where, integer=True)
    bounded("hidden_size", hidden, 1, MAX_DIM, where=where, integer=True)
    bounded("num_attention_heads", heads, 1, hidden, where=where, integer=True)
    bounded("number of routed experts", experts, 1, MAX_EXPERTS, where=where, integer=True)
    bounded("num_experts_per_tok", top_k, 1, experts, where=where, integer=True)
    bounded("expert intermediate size", expert_ffn, 1, MAX_DIM, where=where, integer=True)
    bounded("vocab_size", vocab, 1, MAX_VOCAB, where=where, integer=True)


def model_config(cfg):
    """The derived ModelConfig's remaining numbers; returns it."""
    w = "config.json: "
    bounded("num_key_value_heads", cfg.num_kv_heads, 1, cfg.num_heads, where=w, integer=True)
    if cfg.num_heads % cfg.num_kv_heads:
        raise HobbitError(
            f"{w}num_attention_heads = {cfg.num_heads} is not a multiple of "
            f"num_key_value_heads = {cfg.num_kv_heads}"
        )
    bounded("head_dim", cfg.head_dim, 1, MAX_DIM, where=w, integer=True)
    bounded("rope_theta", cfg.rope.theta, 1e-6, where=w)
    bounded("rms_norm_eps", cfg.norm_eps, 1e-30, 1.0, where=w)
    bounded("max_position_embeddings", cfg.max_context, 1, where=w, integer=True)
    if cfg.clip_qkv is not None:
        bounded("clip_qkv", cfg.clip_qkv, 1e-6, where=w)
    return cfg


def checkpoint_layout(cfg, expert_keys, dense_names: list[str]) -> None:
    """config.json's layer and expert counts against the tensors the checkpoint holds."""
    layer_of = re.compile(r"^model\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for n in dense_names if (m := layer_of.match(n))}
    layers |= {layer for layer, _, _ in expert_keys}
    if layers and max(layers) + 1 != cfg.num_layers:
        raise HobbitError(
            f"config.json: num_hidden_layers = {cfg.num_layers}, but the checkpoint holds "
            f"layers 0..{max(layers)}: fix config.json or the checkpoint"
        )
    experts = {e for _, e, _ in expert_keys}
    if experts and max(experts) + 1 != cfg.num_experts:
        raise HobbitError(
            f"config.json: {cfg.num_experts} routed experts, but the checkpoint holds experts "
            f"0..{max(experts)}: fix config.json or the checkpoint"
        )


def strategy(s, cfg, where: str = "") -> None:
    """An offloading strategy's numbers against the model."""
    bounded("prefetch depth", s.prefetch_depth, 0, cfg.num_layers, where=where, integer=True)
    bounded("low_share", s.low_share, 0.0, 0.95, where=where)
    policies = _cache_policies()
    if s.cache not in ("resident", "ondemand", *policies):
        raise HobbitError(
            f"{where}cache policy {s.cache!r} is unknown (choose from {', '.join(policies)})"
        )
    if s.skip not in SKIP_MODES:
        raise HobbitError(f"{where}skip = {s.skip!r} is unknown (choose from drop, renormalize)")
    for name in ("t1", "t2"):
        t = getattr(s, name)
        values = t.flatten().tolist() if hasattr(t, "flatten") else [t]
        for v in values:
            bounded(name, v, 0.0, 1.0, where=where)
    for v in s.cache_weights or ():
        bounded("cache_weights", v, 0.0, 1e6, where=where)


def memory_budget(budget: int, spec, full_bytes: int) -> int:
    """A parsed --memory: positive, within this machine's RAM, at most what all experts take
    (more would only allocate memory nothing uses)."""
    if budget <= 0:
        raise HobbitError(f"--memory {spec!r} is not a positive budget (e.g. 30% or 2GiB)")
    ram = physical_memory()
    if ram and budget > ram:
        raise HobbitError(
            f"--memory {spec!r} = {budget:,} bytes is more than this machine's RAM "
            f"({ram:,} bytes); give at most that, e.g. --memory 50%"
        )
    return min(budget, full_bytes)


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def sampling(p) -> None:
    """SamplingParams from flags or the API."""
    bounded("max_new_tokens", p.max_new_tokens, 0, integer=True)
    bounded("temperature", p.temperature, 0.0, 100.0)
    bounded("top_k", p.top_k, 0, integer=True)
    if isinstance(p.top_p, bool) or not isinstance(p.top_p, int | float):
        raise HobbitError(f"top_p = {p.top_p!r} is not a number (allowed: (0, 1])")
    if not (0.0 < p.top_p <= 1.0):  # also refuses NaN
        raise HobbitError(f"top_p = {p.top_p!r} is out of range (allowed: (0, 1])")
    if p.seed is not None:
        bounded("seed", p.seed, 0, SEED_MAX, integer=True)


def max_context(value: int | None, model_max: int, why: str) -> None:
    """An asked-for KV length against the model's own limit (`why` says where it is from)."""
    if value is None:
        return
    bounded("max_context", value, 1, integer=True)
    if value > model_max:
        raise HobbitError(
            f"max_context = {value} is above this model's context of {model_max} ({why}); "
            f"allowed: 1..{model_max}"
        )


def tuned_runtime(r, path: Path) -> None:
    """The "runtime" section of a tuned config (numbers checked against the model at load)."""
    from .runtime.strategy import STRATEGIES

    w = f"tuned config {path}: "
    if not isinstance(r, dict):
        raise HobbitError(f"{w}has no runtime section; re-run `hobbit profile`")
    try:
        policy, cache = r["policy"], r["cache_policy"]
        dynamic, memory = r["dynamic_precision"], r["memory"]
        r["t1"], r["t2"], r["prefetch_depth"], r["low_share"]
    except KeyError as e:
        raise HobbitError(f"{w}runtime lacks {e.args[0]!r}; re-run `hobbit profile`") from None
    if policy not in STRATEGIES:
        raise HobbitError(f"{w}policy {policy!r} is unknown (choose from {', '.join(STRATEGIES)})")
    policies = _cache_policies()
    if cache not in policies:
        raise HobbitError(
            f"{w}cache_policy {cache!r} is unknown (choose from {', '.join(policies)})"
        )
    if not isinstance(dynamic, bool):
        raise HobbitError(f"{w}dynamic_precision = {dynamic!r} is not true or false")
    bounded("memory", memory, 1, physical_memory() or None, where=w, integer=True)


def manifest_fields(m: dict, path: Path) -> None:
    """A manifest's own fields: shard files inside the model dir, well-formed digests and
    counts. A damaged or hand-edited manifest fails here, before anything is opened."""
    fix = "re-run `hobbit prepare`"
    try:
        shards, types = m["shards"], m["types"]
        layers, moe, experts = m["num_layers"], m["moe_layers"], m["num_experts"]
        m["expert_bytes"], m["expert_shard_bytes"]
    except KeyError as e:
        raise HobbitError(f"{path} lacks {e.args[0]!r}; {fix}") from None
    w = f"{path}: "
    bounded("num_layers", layers, 1, MAX_LAYERS, where=w, integer=True)
    bounded("num_experts", experts, 1, MAX_EXPERTS, where=w, integer=True)
    if not isinstance(moe, list) or any(
        isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers for i in moe
    ):
        raise HobbitError(f"{w}moe_layers must list layer indices in 0..{layers - 1}; {fix}")
    if not isinstance(shards, list) or not isinstance(types, dict):
        raise HobbitError(f"{w}shards must be a list and types an object; {fix}")
    roles = set()
    for s in shards:
        if not isinstance(s, dict) or not {"file", "role", "bytes", "sha256"} <= set(s):
            raise HobbitError(f"{w}a shard entry lacks file, role, bytes or sha256; {fix}")
        f = s["file"]
        if not isinstance(f, str) or Path(f).name != f or f in ("", ".", ".."):
            raise HobbitError(
                f"{w}shard path {f!r} leaves the model dir (only plain file names are allowed); "
                f"{fix}"
            )
        if not isinstance(s["sha256"], str) or not _HEX64.match(s["sha256"]):
            raise HobbitError(f"{w}{f}: sha256 is not 64 hex digits; {fix}")
        bounded(f"{f} bytes", s["bytes"], 0, where=w, integer=True)
        roles.add(s["role"])
    if "dense" not in roles or "experts-high" not in roles:
        raise HobbitError(f"{w}needs a dense and an experts-high shard; {fix}")
    for p, by_layer in (m.get("expert_crc32") or {}).items():
        for layer, crcs in by_layer.items():
            if not isinstance(crcs, list) or len(crcs) != experts:
                raise HobbitError(f"{w}expert_crc32.{p}.{layer} does not list {experts}; {fix}")
            if not all(isinstance(c, str) and _HEX8.match(c) for c in crcs):
                raise HobbitError(f"{w}expert_crc32.{p}.{layer} holds a non-crc32 value; {fix}")
    for name, c in (m.get("dense_crc32") or {}).items():
        if not isinstance(c, str) or not _HEX8.match(c):
            raise HobbitError(f"{w}dense_crc32 of {name} is not a crc32; {fix}")


def utf8_text(path: str | Path, what: str) -> str:
    """A text file's contents; an error for a missing, non-UTF-8 or binary file."""
    p = Path(path)
    if not p.is_file():
        raise HobbitError(f"{what} {p} does not exist (or is not a file)")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HobbitError(
            f"{what} {p} is not UTF-8 text (byte {e.start} is not); convert it, e.g. with iconv"
        ) from None
    if "\x00" in text:
        raise HobbitError(f"{what} {p} holds NUL bytes: it is a binary file, give a text file")
    return text.replace("\r", "")


def utf8_string(value: str, what: str) -> str:
    """A command-line string: decodable bytes only (the shell passes raw bytes through)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise HobbitError(f"{what} holds bytes that are not UTF-8; pass UTF-8 text") from None
    return value

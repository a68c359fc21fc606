"""What a model dir holds (`hobbit inspect`) and whether it is intact (`hobbit prepare --check`)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import HobbitError
from .shards import read_manifest, sha256_file


def describe(model_dir: str | Path) -> dict:
    """Per shard its type and bytes; per-expert bytes by precision; dense bytes; experts."""
    m = read_manifest(Path(model_dir))
    dense = next(s for s in m["shards"] if s["role"] == "dense")
    return {
        "model_dir": str(model_dir),
        "model_type": m["source"]["model_type"],
        "shards": [{k: s[k] for k in ("file", "role", "type", "bytes")} for s in m["shards"]],
        "expert_bytes": m["expert_bytes"],
        "expert_shard_bytes": m["expert_shard_bytes"],
        "dense_bytes": dense["bytes"],
        "num_experts": m["num_experts"],
        "moe_layers": len(m["moe_layers"]),
        "total_experts": m["num_experts"] * len(m["moe_layers"]),
        "packs": _packs(Path(model_dir)),
    }


def _packs(model_dir: Path) -> dict:
    """The slot packs present (current or not: the runtime checks their keys)."""
    out = {}
    for meta in sorted((model_dir / "packs").glob("experts-*.json")):
        try:
            info = json.loads(meta.read_text())
            size = meta.with_suffix(".slots").stat().st_size
        except (OSError, ValueError):
            continue
        out[info.get("precision", meta.stem)] = {"bytes": size, "slot_bytes": info["slot_bytes"]}
    return out


def check(model_dir: str | Path) -> list[str]:
    """Re-verify a model dir: the manifest's fields, every shard against it (size, sha256),
    every slot pack's images against their crc32. Returns what differs."""
    from .runtime.pack import damaged

    model_dir = Path(model_dir)
    try:
        m = read_manifest(model_dir)
    except HobbitError as e:
        return [str(e)]
    problems = [p for s in m["shards"] if (p := shard_problem(model_dir, s))]
    if not m.get("dense_crc32"):
        problems.append("manifest.json: no dense_crc32 (an older hobbit wrote it)")
    for s in m["shards"]:
        if s["role"].startswith("experts-"):
            problems += damaged(model_dir, s["role"].removeprefix("experts-"))
    return problems


def shard_problem(model_dir: Path, s: dict) -> str | None:
    """What differs between shard entry `s` of the manifest and its file, or None."""
    path = Path(model_dir) / s["file"]
    if not path.is_file():
        return f"{s['file']}: missing"
    size = path.stat().st_size
    if size != s["bytes"]:
        return f"{s['file']}: {size} bytes, manifest says {s['bytes']}"
    digest = sha256_file(path)
    if digest != s["sha256"]:
        return f"{s['file']}: sha256 {digest[:16]}..., manifest says {s['sha256'][:16]}..."
    return None

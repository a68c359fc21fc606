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
    """Re-verify every shard against the manifest (size, sha256). Returns what differs."""
    model_dir = Path(model_dir)
    try:
        m = read_manifest(model_dir)
    except HobbitError as e:
        return [str(e)]
    problems = []
    for s in m["shards"]:
        path = model_dir / s["file"]
        if not path.is_file():
            problems.append(f"{s['file']}: missing")
            continue
        size = path.stat().st_size
        if size != s["bytes"]:
            problems.append(f"{s['file']}: {size} bytes, manifest says {s['bytes']}")
            continue
        digest = sha256_file(path)
        if digest != s["sha256"]:
            problems.append(
                f"{s['file']}: sha256 {digest[:16]}..., manifest says {s['sha256'][:16]}..."
            )
    return problems

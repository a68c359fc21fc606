"""The tuned config `hobbit profile` writes next to the shards and `hobbit run` reads.

A JSON file, versioned and meant to be read by people: the runtime settings under
"runtime", what they were fitted for under "made_for" (this device's fingerprint and the
shards' sha256), and why under "fitted". A config made for other shards, by another format
version, or on another machine is detected: the first two are errors, the last a warning.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .. import validate
from ..errors import HobbitError
from ..runtime.strategy import Strategy
from ..shards import read_manifest, write_json_atomic

CONFIG_FILE = "hobbit-config.json"
KIND = "hobbit-tuned-config"
VERSION = 1


def config_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / CONFIG_FILE


def write_config(path: Path, runtime: dict, made_for: dict, fitted: dict) -> None:
    write_json_atomic(
        Path(path),
        {
            "kind": KIND,
            "version": VERSION,
            "runtime": runtime,
            "made_for": made_for,
            "fitted": fitted,
        },
    )


def shard_digests(model_dir: str | Path) -> dict[str, str]:
    return {s["file"]: s["sha256"] for s in read_manifest(Path(model_dir))["shards"]}


def read_config(path: str | Path, model_dir: str | Path, fingerprint: dict | None = None) -> dict:
    """The config at `path`, checked against the model dir (and the device, if given)."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or UTF-8
        raise HobbitError(
            f"tuned config {path} is not readable ({e}); re-run `hobbit profile`"
        ) from e
    if not isinstance(cfg, dict):
        cfg = {"kind": type(cfg).__name__}
    if cfg.get("kind") != KIND or cfg.get("version") != VERSION:
        raise HobbitError(
            f"{path} is not a version-{VERSION} hobbit tuned config (found {cfg.get('kind')} "
            f"version {cfg.get('version')}); re-run `hobbit profile`"
        )
    validate.tuned_runtime(cfg.get("runtime"), path)
    made_for = cfg.get("made_for", {})
    if made_for.get("shards") != shard_digests(model_dir):
        raise HobbitError(
            f"tuned config {path} was made for other shards than those in {model_dir} "
            "(sha256 differs); re-run `hobbit profile`"
        )
    if fingerprint is not None:
        theirs = made_for.get("device", {})
        differ = sorted(
            k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k)
        )
        if differ:
            warnings.warn(
                f"tuned config {path.name} was profiled on another device ({', '.join(differ)} "
                "differ); its budget and thresholds may not suit this one: re-run `hobbit profile`",
                stacklevel=2,
            )
            cfg["stale_device"] = differ
    return cfg


def strategy_from(cfg: dict) -> Strategy:
    r = cfg["runtime"]
    t1, t2 = r["t1"], r["t2"]
    if isinstance(t1, list):
        t1 = torch.tensor(t1)
    if isinstance(t2, list):
        t2 = torch.tensor(t2)
    return Strategy(
        name="tuned",
        cache=r["cache_policy"],
        dynamic_precision=r["dynamic_precision"],
        prefetch_depth=r["prefetch_depth"],
        low_share=r["low_share"],
        t1=t1,
        t2=t2,
        skip=r.get("skip", "drop"),
        cache_weights=tuple(r["cache_weights"]) if r.get("cache_weights") else None,
    )

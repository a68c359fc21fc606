"""The bundled demo model: a small Mixtral-architecture MoE trained on public-domain books
(scripts/train_demo.py). `hobbit run` with no model prepares it once into a cache dir and
runs it offloaded, so a newcomer sees the whole pipeline in one command."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import HobbitError
from ..shards import MANIFEST

CHECKPOINT = Path(__file__).parent / "checkpoint"
PROMPT = "It was a dark and stormy night, and"
SAMPLING = {"temperature": 0.8, "top_k": 40, "seed": 0}  # a small model reads better sampled
MEMORY = "50%"  # of the expert bytes: offloading is really exercised


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hobbit"


def prepared_demo(progress: bool = False, say=lambda msg: None) -> Path:
    """The demo model's prepared and profiled dir, made on first use and reused after."""
    from ..inspect import check
    from ..quantize.checkpoint import Checkpoint
    from ..quantize.convert import prepare
    from ..recipes import load_recipe
    from ..runtime.pack import build as build_packs
    from ..runtime.pack import wanted

    if not (CHECKPOINT / "config.json").is_file():
        raise HobbitError(f"the bundled demo checkpoint is missing from {CHECKPOINT}")
    types = load_recipe("demo", "prepare")
    digest = Checkpoint(CHECKPOINT).digest()[:12]
    out = cache_root() / f"demo-{digest}-{types['high']}-{types['low']}"
    prepared = (out / MANIFEST).is_file()
    problems = check(out) if prepared else []
    shard_problems = [p for p in problems if not p.startswith("packs/")]
    if shard_problems:
        say(f"the demo cache {out} fails its check ({shard_problems[0]}); rebuilding it")
    if shard_problems or not prepared:
        shutil.rmtree(out, ignore_errors=True)  # the cache is ours: nothing the user made
        say(f"preparing the demo model into {out} (first use only)")
        prepare(CHECKPOINT, out, progress=progress, **types)
    else:
        if problems:
            say(f"the demo cache's slot pack fails its check ({problems[0]}); rebuilding it")
        if wanted(out):  # (re)write stale or corrupt packs; shards checked
            build_packs(out, wanted(out), verify=False)
    config = out / "hobbit-config.json"
    if config.is_file() and not _config_ok(config, out):
        say(f"the demo's tuned config {config} is unusable; profiling again")
        config.unlink()
    if not config.is_file():
        from ..profile.profiler import profile

        say("profiling this machine and the demo model (first use only, about a minute)")
        profile(out, memory=MEMORY, quick=True, say=say, **_profile_settings())
    return out


def _config_ok(path: Path, model_dir: Path) -> bool:
    from ..profile.config import read_config

    try:
        read_config(path, model_dir)
    except HobbitError:
        return False
    return True


def _profile_settings() -> dict:
    from ..recipes import load_recipe

    settings = load_recipe("demo", "profile")
    return {k: settings[k] for k in ("ppl_budget", "max_tokens", "threads") if k in settings}

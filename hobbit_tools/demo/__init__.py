"""The bundled demo model: a small Mixtral-architecture MoE trained on public-domain books
(scripts/train_demo.py). `hobbit run` with no model prepares it once into a cache dir and
runs it offloaded, so a newcomer sees the whole pipeline in one command."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import HobbitError

CHECKPOINT = Path(__file__).parent / "checkpoint"
PROMPT = "It was a dark and stormy night, and"
SAMPLING = {"temperature": 0.8, "top_k": 40, "seed": 0}  # a small model reads better sampled
MEMORY = "50%"  # of the expert bytes: offloading is really exercised


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hobbit"


def prepared_demo(progress: bool = False, say=lambda msg: None) -> Path:
    """The demo model's prepared and profiled dir, made on first use and reused after."""
    from ..quantize.checkpoint import Checkpoint
    from ..quantize.convert import prepare
    from ..recipes import load_recipe

    if not (CHECKPOINT / "config.json").is_file():
        raise HobbitError(f"the bundled demo checkpoint is missing from {CHECKPOINT}")
    types = load_recipe("demo", "prepare")
    digest = Checkpoint(CHECKPOINT).digest()[:12]
    out = cache_root() / f"demo-{digest}-{types['high']}-{types['low']}"
    if not (out / "manifest.json").is_file():
        say(f"preparing the demo model into {out} (first use only)")
        prepare(CHECKPOINT, out, force=True, progress=progress, **types)
    else:
        from ..runtime.pack import build as build_packs
        from ..runtime.pack import wanted

        if wanted(out):  # a dir from an older hobbit or torch: (re)write stale packs
            build_packs(out, wanted(out))
    if not (out / "hobbit-config.json").is_file():
        from ..profile.profiler import profile

        say("profiling this machine and the demo model (first use only, about a minute)")
        profile(out, memory=MEMORY, quick=True, say=say, **_profile_settings())
    return out


def _profile_settings() -> dict:
    from ..recipes import load_recipe

    settings = load_recipe("demo", "profile")
    return {k: settings[k] for k in ("ppl_budget", "max_tokens") if k in settings}

"""The bundled demo model: a small Mixtral-architecture MoE trained on public-domain books
(scripts/train_demo.py). `hobbit run` with no model prepares it once into a cache dir and
runs it offloaded, so a newcomer sees the whole pipeline in one command."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import HobbitError

CHECKPOINT = Path(__file__).parent / "checkpoint"
PROMPT = "It was a dark and stormy night, and"
MEMORY = "50%"  # of the expert bytes: offloading is really exercised


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hobbit"


def prepared_demo(progress: bool = False) -> Path:
    """The demo model's prepared dir, made on first use and reused after."""
    from ..quantize.checkpoint import Checkpoint
    from ..quantize.convert import prepare
    from ..recipes import load_recipe

    if not (CHECKPOINT / "config.json").is_file():
        raise HobbitError(f"the bundled demo checkpoint is missing from {CHECKPOINT}")
    types = load_recipe("demo", "prepare")
    digest = Checkpoint(CHECKPOINT).digest()[:12]
    out = cache_root() / f"demo-{digest}-{types['high']}-{types['low']}"
    if not (out / "manifest.json").is_file():
        prepare(CHECKPOINT, out, force=True, progress=progress, **types)
    return out

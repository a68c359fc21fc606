"""`hobbit eval ppl`: perplexity under any runtime setting.

The text is cut into windows of `window` tokens, each scored from an empty KV cache. In
"decode" mode tokens go through the model one at a time, exactly as generation runs them, so
the cache, prefetch and per-token precision decisions are the ones a user would get. In
"prefill" mode each window is one forward (fast; the right choice for resident runs, where
both modes give the same numbers up to rounding).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from . import validate
from .errors import HobbitError
from .runtime import Runtime


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (an error names a missing, binary or non-UTF-8 one)."""
    return validate.utf8_text(path, "text file")


def perplexity(
    rt: Runtime,
    text: str,
    *,
    max_tokens: int = 2048,
    window: int = 256,
    mode: str = "decode",
    progress=None,
) -> dict:
    validate.bounded("window", window, 1, integer=True)
    validate.bounded("max_tokens", max_tokens, 2, integer=True)
    ids = rt.tokenizer.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise HobbitError("the text is too short to score (fewer than 2 tokens)")
    window = min(window, rt.model.cache.max_len)
    experts = rt.model.experts
    before = experts.stats()
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        logits = _window_logits(rt, chunk[:-1], mode)
        target = torch.tensor(chunk[1:])
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        count += len(target)
        if progress:
            progress(count)
    elapsed = time.perf_counter() - t0
    after = experts.stats()
    stats = {
        k: after[k] - before.get(k, 0)
        for k in ("hits", "misses", "bytes_read", "io_wait_s")
        if k in after
    }
    if "served" in after:
        served = {k: after["served"][k] - before["served"].get(k, 0) for k in after["served"]}
        total = sum(served.values()) or 1
        stats["share"] = {k: v / total for k, v in served.items()}
    stats["hit_rate"] = stats["hits"] / max(stats["hits"] + stats.get("misses", 0), 1)
    stats["tokens_per_s"] = count / elapsed if elapsed else 0.0
    return {"ppl": math.exp(nll / count), "tokens": count, "stats": stats}


def _window_logits(rt: Runtime, ids: list[int], mode: str) -> torch.Tensor:
    model = rt.model
    model.reset()
    if mode == "prefill":
        return model.forward(torch.tensor(ids), all_logits=True)
    if mode != "decode":
        raise HobbitError(f"eval mode {mode!r} is not decode or prefill")
    step = torch.empty(1, dtype=torch.long)
    rows = []
    for t in ids:
        step[0] = t
        rows.append(model.forward(step))
    return torch.stack(rows)

"""Routing traces other engines write as CSV (BigMoeOnEdge's route_trace v1), turned into
hobbit's trace form so `replay` treats them alike.

Format: `#` header lines `# model=... n_layer=L n_expert=E n_expert_used=K` and, optionally,
one `# layer=L expert_bytes=B ...` per layer; then a row header and rows
`turn,phase,step,layer,slot,expert,weight,residency,expert_bytes` (phase 0 prompt, 1
generation; `expert_bytes` the bytes that engine read, 0 on its hit). A prompt is one
batched call per layer (one record of all its tokens), a generated token one call per layer.

Expert sizes, first that applies: `expert_bytes` given (every layer alike), a prepared
model dir's per-precision sizes, the header's per-layer sizes, else the mean of the nonzero
bytes-read column. Low-precision sizes, where the source has none, are `low_ratio` of high.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ..errors import HobbitError

COLUMNS = ("turn", "phase", "step", "layer", "slot", "expert", "weight")
LOW_RATIO = 0.5  # a 4-bit low copy of an 8-bit high one (Q4_K / Q8_0 is 0.53)


def read_csv_trace(
    path: str | Path,
    text: str,
    expert_bytes: int | None = None,
    model_dir: str | Path | None = None,
    low_ratio: float = LOW_RATIO,
) -> tuple[dict, list[dict]]:
    meta, layer_sizes = {}, {}
    body = []
    for line in text.splitlines():
        if line.startswith("#"):
            fields = dict(f.split("=", 1) for f in line[1:].split() if "=" in f)
            if "layer" in fields and "expert_bytes" in fields:
                layer_sizes[int(fields["layer"])] = int(fields["expert_bytes"])
            else:
                meta.update(fields)
        elif line.strip():
            body.append(line)
    rows = list(csv.DictReader(io.StringIO("\n".join(body))))
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise HobbitError(
            f"{path} is neither a hobbit trace nor a CSV routing trace (no rows"
            + (f"; missing columns {', '.join(missing)})" if missing else ")")
            + ": record one with `hobbit run --trace`"
        )
    try:
        records = _records(rows)
    except ValueError as e:
        raise HobbitError(f"{path}: a row that is not numbers ({e}); is it a routing trace?") from e
    num_layers = int(meta.get("n_layer", 1 + max(r["layer"] for r in records)))
    header = {
        "kind": "hobbit-trace",
        "version": 1,
        "source": "csv",
        "model": meta.get("model", str(path)),
        "num_layers": num_layers,
        "moe_layers": num_layers,
        "num_experts": int(meta.get("n_expert", 1 + max(int(r["expert"]) for r in rows))),
        "top_k": int(meta.get("n_expert_used", max(len(r["ids"][0]) for r in records))),
    }
    sizes, source = _sizes(rows, num_layers, layer_sizes, expert_bytes, model_dir, low_ratio)
    mean = {p: int(round(float(np.mean(v)))) for p, v in sizes.items()}
    header.update(expert_bytes=mean, slot_bytes=mean, layer_bytes=sizes, sizes_from=source)
    return header, records


def _records(rows: list[dict]) -> list[dict]:
    """One record per (call, layer): a prompt's layer with all its tokens, a generated
    token's layer alone. Tokens are numbered as the runtime does: a prompt is one token."""
    calls: dict[tuple, dict] = {}
    order = []
    for r in rows:
        turn, phase, step, layer = (int(r[c]) for c in ("turn", "phase", "step", "layer"))
        call = (turn, phase, layer) if phase == 0 else (turn, phase, step, layer)
        rec = calls.get(call)
        if rec is None:
            rec = calls[call] = {"call": call, "steps": {}}
            order.append(call)
        rec["steps"].setdefault(step, []).append(
            (int(r["slot"]), int(r["expert"]), float(r["weight"]))
        )
    records, token, last = [], 0, None
    for call in order:
        turn, phase, layer = call[0], call[1], call[-1]
        unit = (turn, phase) if phase == 0 else call[:3]
        if unit != last:
            token, last = token + 1, unit
        steps = calls[call]["steps"]
        ids, weights = [], []
        for step in sorted(steps):
            picks = sorted(steps[step])
            ids.append([e for _, e, _ in picks])
            weights.append([w for _, _, w in picks])
        records.append(
            {"token": token, "layer": layer, "tokens": len(ids), "ids": ids, "weights": weights}
        )
    return records


def _sizes(rows, num_layers, layer_sizes, expert_bytes, model_dir, low_ratio):
    """Per precision, per layer expert bytes, and where they came from."""
    low_note = f" (low copies: {low_ratio:g} of high)"
    if expert_bytes is not None:
        high = [int(expert_bytes)] * num_layers
        return _with_low(high, low_ratio), f"--expert-bytes {int(expert_bytes)}{low_note}"
    if model_dir is not None:
        from ..inspect import describe

        per = describe(model_dir)["expert_bytes"]
        sizes = {p: [int(b)] * num_layers for p, b in per.items() if p in ("high", "low")}
        if "low" in sizes:
            return sizes, f"model dir {model_dir}"
        return _with_low(sizes["high"], low_ratio), f"model dir {model_dir}{low_note}"
    if len(layer_sizes) == num_layers:
        high = [layer_sizes[i] for i in range(num_layers)]
        return _with_low(high, low_ratio), f"the trace's per-layer expert_bytes{low_note}"
    read = [int(r["expert_bytes"]) for r in rows if r.get("expert_bytes") not in (None, "", "0")]
    if not read:
        raise HobbitError(
            "this CSV trace gives no expert sizes: pass --expert-bytes N (bytes of one "
            "expert) or --model MODEL_DIR"
        )
    mean = int(round(sum(read) / len(read)))
    return _with_low([mean] * num_layers, low_ratio), f"the mean of its bytes-read column{low_note}"


def _with_low(high: list[int], low_ratio: float) -> dict[str, list[int]]:
    return {"high": high, "low": [int(b * low_ratio) for b in high]}

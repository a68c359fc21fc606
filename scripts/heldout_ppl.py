"""Perplexity of a tuned config against all experts resident on held-out books, decode mode.

    python scripts/heldout_ppl.py MODEL_DIR [--config CFG] [--tokens 1024] [--offset 0] BOOK...

Each book's first --tokens tokens from --offset (scored in windows of 256, each from an empty
KV cache, one token at a time) under `resident` (all experts at high precision, in RAM) and
under the tuned config at its budget, interleaved; prints one row per book and the worst.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import hobbit_tools
from hobbit_tools.evaluate import perplexity, read_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("books", nargs="+")
    ap.add_argument("--config", help="tuned config (default: MODEL_DIR/hobbit-config.json)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--offset", type=int, default=0, help="tokens skipped at each book's start")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = []
    for book in a.books:
        resident = hobbit_tools.load(
            a.model_dir, policy="resident", config=False, threads=a.threads
        )
        ids = resident.tokenizer.encode(read_text(book))[a.offset : a.offset + a.tokens + 1]
        text = resident.tokenizer.decode(ids)
        base = perplexity(resident, text, max_tokens=a.tokens + 1, mode="decode")
        tuned_rt = hobbit_tools.load(a.model_dir, config=a.config or True, threads=a.threads)
        tuned = perplexity(tuned_rt, text, max_tokens=a.tokens + 1, mode="decode")
        share = tuned["stats"].get("share", {})
        rows.append({
            "book": Path(book).stem, "tokens": tuned["tokens"], "resident": base["ppl"],
            "tuned": tuned["ppl"], "rise": tuned["ppl"] / base["ppl"] - 1,
            "share": {k: round(v, 3) for k, v in share.items()},
        })  # fmt: skip
        r = rows[-1]
        print(
            f"{r['book']:34s} {r['tokens']:5d} tok  resident {r['resident']:9.3f}  tuned "
            f"{r['tuned']:9.3f}  {r['rise']:+.2%}  high/low/skip "
            + "/".join(f"{share.get(k, 0):.0%}" for k in ("high", "low", "skip")),
            flush=True,
        )
    worst = max(rows, key=lambda r: r["rise"])
    print(
        f"worst: {worst['book']} {worst['rise']:+.2%}; mean {sum(r['rise'] for r in rows) / len(rows):+.2%}"
    )
    if a.json:
        print(json.dumps(rows))
    assert all(math.isfinite(r["tuned"]) for r in rows)


if __name__ == "__main__":
    main()

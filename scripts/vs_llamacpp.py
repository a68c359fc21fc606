"""hobbit and llama.cpp side by side on the same prepared model dir, in one process.

llama.cpp (llama-cpp-python, a measurement tool, never a dependency of hobbit) loads the
dense + high split that `hobbit prepare` writes (MODEL_DIR/llamacpp/high-00001-of-00002.gguf);
hobbit runs the same shards. Decode tokens/s of greedy generation from the same prompt,
interleaved rounds, medians, and the ratio:

    python scripts/vs_llamacpp.py MODEL_DIR [-n 64] [--rounds 3] [--threads 2] [--memory 25%]

Build llama-cpp-python from its sdist (about 20 minutes on 2 cores):
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python llama-cpp-python
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

PROMPT = "It was a dark and stormy night, and the wind"


def llama_decode(model, n: int) -> float:
    toks = model.tokenize(PROMPT.encode())
    model.reset()
    model.eval(toks)
    t0 = time.perf_counter()
    for _ in range(n):
        tok = model.sample(temp=0.0)
        model.eval([tok])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", help="hobbit's expert budget (default: resident)")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama_cpp does not import: build llama-cpp-python (see this script's doc)")
    import torch

    import hobbit_tools
    from hobbit_tools.runtime import ggml

    torch.set_num_threads(args.threads)
    ggml.set_threads(args.threads)
    split = Path(args.model_dir) / "llamacpp" / "high-00001-of-00002.gguf"
    lm = llama_cpp.Llama(str(split), n_ctx=512, n_threads=args.threads, verbose=False)
    rt = hobbit_tools.load(args.model_dir, memory=args.memory, config=False)
    ours, theirs = [], []
    for r in range(args.rounds):
        g = rt.generate(PROMPT, max_new_tokens=args.n, stop_at_eos=False)
        ours.append(g.stats["decode_tokens_per_s"])
        theirs.append(llama_decode(lm, args.n))
        print(f"round {r + 1}: hobbit {ours[-1]:.2f} tok/s, llama.cpp {theirs[-1]:.2f} tok/s")
    h, l_ = statistics.median(ours), statistics.median(theirs)
    info = rt.info
    what = f"hobbit {info['policy']} ({info['expert_type']}, cache {info['cache_bytes'] >> 20} MiB)"
    print(f"median decode: {what} {h:.2f} tok/s, llama.cpp {l_:.2f} tok/s: {h / l_:.2f}x")


if __name__ == "__main__":
    main()

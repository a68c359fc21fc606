"""llama.cpp as the baseline, on the very split `hobbit prepare` writes.

A measurement tool, never a dependency: it needs llama-cpp-python, which hobbit does not
install. llama.cpp runs in a child process of its own (`python -m hobbit_tools.llamacpp`),
so that its ggml and hobbit's never share one address space, and so that a caller can put
it under the same memory limit as a hobbit run (scripts/vs_llamacpp.py). It maps the
dense + high split (`MODEL_DIR/llamacpp/high-00001-of-00002.gguf`) as llama.cpp always
does (mmap), evaluates each prompt, then decodes greedily; decode time excludes the prompt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .errors import HobbitError

INSTALL = (
    "llama-cpp-python is not installed (a measurement tool, not a dependency of hobbit): "
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" '
    "pip install --no-binary llama-cpp-python llama-cpp-python  (about 10-20 minutes; add "
    "-DGGML_AVX512=ON on a CPU that has it; the AMX build crashed in decode here)"
)


def split_of(model_dir: str | Path, precision: str = "high") -> Path:
    """The first file of the llama.cpp split of a prepared model dir."""
    path = Path(model_dir) / "llamacpp" / f"{precision}-00001-of-00002.gguf"
    if not path.is_file():
        raise HobbitError(
            f"{model_dir} has no llama.cpp split ({path.name}); re-run `hobbit prepare`"
        )
    return path


def installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def measure(
    model_dir: str | Path,
    prompts: tuple[str, ...] | list[str],
    max_new_tokens: int,
    threads: int,
    precision: str = "high",
    context: int = 512,
    prefix: list[str] | None = None,
) -> dict:
    """Run llama.cpp in a child process (under `prefix`, e.g. a memory-limit wrapper) and
    return its numbers: decode and prefill tokens/s over all prompts, peak RSS, major
    page faults."""
    if not installed():
        raise HobbitError(INSTALL)
    cmd = [sys.executable, "-m", "hobbit_tools.llamacpp", str(split_of(model_dir, precision)),
           "-n", str(max_new_tokens), "--threads", str(threads), "--context", str(context)]  # fmt: skip
    for p in prompts:
        cmd += ["-p", p]
    done = subprocess.run((prefix or []) + cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise HobbitError(f"llama.cpp exited with status {done.returncode}: {' | '.join(tail)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(split: str, prompts: list[str], n: int, threads: int, context: int) -> dict:
    import resource

    import llama_cpp

    # n_threads_batch too: llama-cpp-python's default for it is every core, which would
    # give its prefill more threads than the engine it is compared with
    lm = llama_cpp.Llama(
        split, n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    decode_s = prefill_s = 0.0
    decoded = prefilled = 0
    for prompt in prompts:
        toks = lm.tokenize(prompt.encode())
        lm.reset()
        t0 = time.perf_counter()
        lm.eval(toks)
        prefill_s += time.perf_counter() - t0
        prefilled += len(toks)
        t0 = time.perf_counter()
        for _ in range(n):
            lm.eval([lm.sample(temp=0.0)])
        decode_s += time.perf_counter() - t0
        decoded += n
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "decode_tokens_per_s": decoded / decode_s,
        "prefill_tokens_per_s": prefilled / prefill_s,
        "new_tokens": decoded,
        "peak_rss_bytes": ru.ru_maxrss * 1024,
        "major_faults": ru.ru_majflt,
        "threads": threads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description="llama.cpp decode speed on a GGUF (a child of hobbit's bench)"
    )
    ap.add_argument("split")
    ap.add_argument("-p", "--prompt", action="append", required=True)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    a = ap.parse_args()
    print(json.dumps(_child(a.split, a.prompt, a.n, a.threads, a.context)))


if __name__ == "__main__":
    main()

"""The llama.cpp side of a comparison, in a process of its own: `llamacpp.measure` runs this
file by path (`python -P`), so that neither hobbit's package nor torch (~200 MB of RSS, under
the same memory limit) nor hobbit's OpenMP settings are loaded beside llama.cpp. Standard
library and llama_cpp only."""

import argparse
import json
import resource
import time


def measure(split: str, prompts: list[str], n: int, threads: int, context: int) -> dict:
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
    print(json.dumps(measure(a.split, a.prompt, a.n, a.threads, a.context)))


if __name__ == "__main__":
    main()

"""llama.cpp as the baseline, on the very split `hobbit prepare` writes.

A measurement tool, never a dependency: it needs llama-cpp-python, which hobbit does not
install. llama.cpp runs in a child process of its own (`llamacpp_child.py`, run by path:
neither hobbit nor torch is loaded there), so that its ggml and hobbit's never share one
address space, and so that a caller can put it under the same memory limit as a hobbit run
(scripts/vs_llamacpp.py). It maps the
dense + high split (`MODEL_DIR/llamacpp/high-00001-of-00002.gguf`) as llama.cpp always
does (mmap), evaluates each prompt, then decodes greedily; decode time excludes the prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .errors import HobbitError

CHILD = Path(__file__).with_name("llamacpp_child.py")
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
    cmd = [sys.executable, "-P", str(CHILD), str(split_of(model_dir, precision)),
           "-n", str(max_new_tokens), "--threads", str(threads), "--context", str(context)]  # fmt: skip
    for p in prompts:
        cmd += ["-p", p]
    done = subprocess.run((prefix or []) + cmd, capture_output=True, text=True, env=child_env())
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise HobbitError(f"llama.cpp exited with status {done.returncode}: {' | '.join(tail)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_env() -> dict[str, str]:
    """The environment llama.cpp runs in: this one, without the OpenMP wait policy hobbit
    sets for its own process (llama.cpp's OpenMP build synchronises at every graph node and
    is tuned for spinning workers), unless the user set it."""
    import hobbit_tools

    env = dict(os.environ)
    if hobbit_tools.OMP_SET_BY_HOBBIT:
        env.pop("OMP_WAIT_POLICY", None)
    return env

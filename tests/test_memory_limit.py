"""The real thing: `hobbit profile` and `hobbit run` on a model whose experts take at least
twice the memory the process may use, under a cgroup v1 memory limit (skipped where the
test may not make one). Both must finish and really offload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import hobbit_tools
from hobbit_tools.synth import SynthShape, make_random_checkpoint

pytestmark = pytest.mark.slow

MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")
MiB = 1 << 20
# What the process may use under LIMIT is LIMIT less what the interpreter and torch hold at
# start (~150-190 MiB here); the experts at high precision take 448 MiB in memory (Q8_0 held
# as its GGUF bytes, 1.06 bytes a weight).
LIMIT = 350 * MiB
# mixtral-mini's experts (20 layers instead of 8) with a small vocabulary: the dense part
# is a few MB, so the limit is spent on experts, not on the embedding.
SHAPE = SynthShape(hidden=512, ffn=1792, layers=20, experts=8, top_k=2, vocab=1024)
HOBBIT = [sys.executable, "-c", "from hobbit_tools.cli import main; main()"]


def _cgroup_or_skip(limit: int) -> Path:
    if os.geteuid() != 0:
        pytest.skip("making a memory cgroup needs root")
    if not (MEMORY_CGROUPS / "memory.limit_in_bytes").is_file():
        pytest.skip(f"no cgroup v1 memory controller at {MEMORY_CGROUPS}")
    d = MEMORY_CGROUPS / f"hobbit-test-{uuid.uuid4().hex[:8]}"
    try:
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(limit))
    except OSError as e:
        if d.is_dir():
            d.rmdir()
        pytest.skip(f"cannot make a memory cgroup under {MEMORY_CGROUPS}: {e}")
    return d


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    d = _cgroup_or_skip(LIMIT)
    yield d
    d.rmdir()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory, limited):
    d = tmp_path_factory.mktemp("limited")
    make_random_checkpoint(d / "hf", SHAPE)
    hobbit_tools.prepare(d / "hf", d / "model", high="Q8_0", low="Q4_K")
    return d / "model"


def _run_in(cgroup: Path, args: list[str], tmp: Path) -> dict:
    """Run `hobbit ARGS --json` inside `cgroup`; its JSON output, with the cgroup's peak."""
    (cgroup / "memory.max_usage_in_bytes").write_text("0")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp), "PYTHONPATH": _pythonpath()}
    enter = f'echo $$ > {cgroup / "cgroup.procs"} && exec "$@"'
    out = subprocess.run(
        ["sh", "-c", enter, "sh", *HOBBIT, *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, f"hobbit {args[0]}: rc {out.returncode}\n{out.stderr[-3000:]}"
    result = json.loads(out.stdout[out.stdout.index("{") :])
    result["cgroup_peak"] = int((cgroup / "memory.max_usage_in_bytes").read_text())
    return result


def _pythonpath() -> str:
    here = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])


RUN = ["-p", "It was a dark and stormy night", "-n", "8", "--max-context", "256"]


def test_run_offloads_under_a_memory_limit(limited, big_model, tmp_path):
    untuned = _run_in(limited, ["run", str(big_model), *RUN, "--no-config"], tmp_path)
    stats, info = untuned["stats"], untuned["stats"]["load"]
    assert info["policy"] == "lru" and "cgroup v1" in info["memory_source"]
    assert info["full_cache_bytes"] >= 2 * info["memory_available"]
    assert stats["bytes_read"] > 0 and 0 < info["cache_bytes"] < info["full_cache_bytes"]


def test_profile_and_tuned_run_offload_under_a_memory_limit(limited, big_model, tmp_path):
    prof = _run_in(limited, ["profile", str(big_model), "--max-tokens", "256", "--quick"], tmp_path)
    full = hobbit_tools.load(big_model, policy="lru", memory="10%", config=False).info[
        "full_cache_bytes"
    ]
    assert "cgroup v1" in prof["fitted"]["memory"]["available_source"]
    assert 0 < prof["runtime"]["memory"] < full

    tuned = _run_in(limited, ["run", str(big_model), *RUN], tmp_path)
    stats, info = tuned["stats"], tuned["stats"]["load"]
    assert info["policy"] == "tuned" and info["config"]
    assert stats["bytes_read"] > 0 and 0 < info["cache_bytes"] < info["full_cache_bytes"]

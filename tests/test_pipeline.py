"""The CI artifact pipeline runs end to end on a tiny model and leaves its artifacts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import REPO, make_checkpoint, quantizable

SHAPE = quantizable(num_local_experts=4, num_hidden_layers=2)


def pipeline(*args, cwd=REPO):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(REPO / "scripts" / "pipeline.sh"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd)  # fmt: skip


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path, tokenizer_dir):
    make_checkpoint("mixtral", tmp_path / "hf", tokenizer_dir, **SHAPE)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        '[prepare]\nhigh = "Q8_0"\nlow = "Q4_K"\n\n[profile]\nmax_tokens = 400\nmemory = "60%"\n'
    )
    r = pipeline("--recipe", recipe, "--quick", tmp_path / "hf", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    model = tmp_path / "out" / "model"
    for artifact in (
        "manifest.json",
        "hobbit-config.json",
        "profile-report.md",
        "experts-low-Q4_K.gguf",
    ):
        assert (model / artifact).is_file(), artifact
    assert json.loads((tmp_path / "out" / "check.json").read_text())["ok"]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["stats"]["load"]["policy"] == "tuned"


def test_pipeline_fails_on_a_bad_stage(tmp_path):
    r = pipeline(tmp_path / "missing", tmp_path / "out")
    assert r.returncode == 1 and "stage 'prepare' failed" in r.stderr

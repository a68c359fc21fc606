"""Bad input: a clear error naming the problem and the fix, nothing half-written."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny_models import make_checkpoint

import hobbit_tools
from hobbit_tools.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("olmoe")
    make_checkpoint("olmoe", d / "hf", tokenizer_dir)
    hobbit_tools.prepare(d / "hf", d / "model")
    return d


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def copy_ckpt(src, dst, edit=None):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if edit:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_path(tmp_path):
    r = run("prepare", tmp_path / "nope", "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert "does not exist" in r.output and "Traceback" not in r.output


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "src").mkdir()
    r = run("prepare", tmp_path / "src", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "no config.json" in r.output
    assert not (tmp_path / "out").exists()


def test_dense_model_names_supported_families(ckpt, tmp_path):
    src = copy_ckpt(ckpt / "hf", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    r = run("prepare", src, "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert "'llama' is not a supported MoE family" in r.output
    for family in ("mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe"):
        assert family in r.output


def test_missing_expert_tensor_is_named(ckpt, tmp_path):
    src = copy_ckpt(
        ckpt / "hf",
        tmp_path / "src",
        lambda t: t.pop("model.layers.1.mlp.experts.4.up_proj.weight"),
    )
    r = run("prepare", src, "-o", tmp_path / "out")
    assert r.exit_code == 1 and "layer 1 expert 4 up" in r.output
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*")), "a partial output was left behind"


def test_missing_dense_tensor_is_named(ckpt, tmp_path):
    src = copy_ckpt(
        ckpt / "hf", tmp_path / "src", lambda t: t.pop("model.layers.2.self_attn.k_norm.weight")
    )
    r = run("prepare", src, "-o", tmp_path / "out")
    assert r.exit_code == 1 and "blk.2.attn_k_norm.weight" in r.output


def test_misshaped_tensor_is_named(ckpt, tmp_path):
    def widen(t):
        t["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(30, 72)

    src = copy_ckpt(ckpt / "hf", tmp_path / "src", widen)
    r = run("prepare", src, "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert (
        "model.layers.0.self_attn.v_proj.weight has shape [30, 72], expected [24, 72]" in r.output
    )


def test_existing_output_needs_force(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run("prepare", ckpt / "hf", "-o", out)
    assert r.exit_code == 1 and "--force" in r.output
    assert (out / "keep.txt").read_text() == "mine"
    r = run("prepare", ckpt / "hf", "-o", out, "--force")
    assert r.exit_code == 1 and "remove it yourself" in r.output
    assert (out / "keep.txt").read_text() == "mine", "--force deleted a file the user made"
    (out / "keep.txt").unlink()
    for _ in range(2):  # an empty dir, then the model dir just written
        r = run("prepare", ckpt / "hf", "-o", out, "--force")
        assert r.exit_code == 0, r.output
        assert (out / "manifest.json").exists()


def test_unsupported_type(ckpt, tmp_path):
    r = run("prepare", ckpt / "hf", "-o", tmp_path / "out", "--dense", "Q9_9")
    assert r.exit_code == 1 and "--dense Q9_9 is not a supported type" in r.output


def test_run_on_a_non_model_dir(tmp_path):
    r = run("run", tmp_path, "--prompt", "hi")
    assert r.exit_code == 1 and "not a prepared model dir" in r.output


def test_prompt_longer_than_context(ckpt):
    r = run("run", ckpt / "model", "--prompt", "word " * 200, "--max-context", "64")
    assert r.exit_code == 1
    assert "the context holds 64" in r.output and "Traceback" not in r.output


def test_run_json(ckpt):
    r = run("run", ckpt / "model", "--prompt", "Hello", "-n", "5", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert set(out) == {"text", "token_ids", "stats"}
    assert 1 <= len(out["token_ids"]) <= 5
    assert out["stats"]["prompt_tokens"] == len(hobbit_tools.load(ckpt / "model").encode("Hello"))


def test_run_streams_text_then_stats(ckpt):
    r = run(
        "run", ckpt / "model", "--prompt", "Hello", "-n", "4", "--temperature", "0.8", "--seed", "3"
    )
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Hello")
    assert "decode" in r.output and "tok/s" in r.output

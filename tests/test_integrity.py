"""Paired shards, determinism, --check, inspect, and corrupt input that fails loudly."""

import json
import shutil

import pytest
from click.testing import CliRunner
from tiny_models import prepared_pair, quantizable

import hobbit_tools
from hobbit_tools.cli import main
from hobbit_tools.errors import HobbitError

# K-quants need rows that are multiples of 256 elements.
SHAPE = quantizable(num_local_experts=4, num_hidden_layers=2)


@pytest.fixture(scope="module")
def paired(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("paired")
    prepared_pair(d, tokenizer_dir, pack=True, **SHAPE)
    return d


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_paired_shards_and_inspect(paired):
    r = run("inspect", paired / "model", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert [(s["role"], s["type"]) for s in d["shards"]] == [
        ("dense", "F32"), ("experts-high", "Q8_0"), ("experts-low", "Q4_K")
    ]  # fmt: skip
    per_matrix = 256 * 256
    assert d["expert_bytes"] == {
        "high": 3 * per_matrix * 34 // 32,
        "low": 3 * per_matrix * 144 // 256,
    }
    assert d["num_experts"] == 4 and d["dense_bytes"] > 0
    assert (paired / "model" / "experts-low-Q4_K.gguf").exists()


def test_each_precision_generates(paired):
    for precision in ("high", "low"):
        rt = hobbit_tools.load(paired / "model", precision=precision)
        assert len(rt.generate("Hello", max_new_tokens=6, stop_at_eos=False).token_ids) == 6


def test_reruns_are_byte_identical(paired, tmp_path):
    again = hobbit_tools.prepare(paired / "hf", tmp_path / "again", high="Q8_0", low="Q4_K")
    first = json.loads((paired / "model" / "manifest.json").read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]


def test_check_passes_then_names_what_differs(paired, tmp_path):
    assert run("prepare", paired / "model", "--check").exit_code == 0
    bad = tmp_path / "bad"
    shutil.copytree(paired / "model", bad, symlinks=True)
    shard = bad / "experts-low-Q4_K.gguf"
    data = bytearray(shard.read_bytes())
    data[-5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run("prepare", bad, "--check", "--json")
    assert r.exit_code == 1
    out = json.loads(r.output)
    assert not out["ok"] and out["problems"][0].startswith("experts-low-Q4_K.gguf: sha256")


def copy_with(paired, tmp_path, mutate):
    bad = tmp_path / "bad"
    shutil.copytree(paired / "model", bad, symlinks=True)
    mutate(bad)
    return bad


def flip_expert_byte(bad):
    """Flip a byte inside layer 1, expert 2's up matrix of the high shard."""
    from hobbit_tools.shards import ShardReader

    shard = bad / "experts-high-Q8_0.gguf"
    info = ShardReader(shard).tensors["blk.1.ffn_up_exps.weight"]
    offset = info.offset + 2 * (info.nbytes // 4) + 100
    with open(shard, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x55]))


def generate_a_while(model, memory, kernels=None):
    rt = hobbit_tools.load(model, memory=memory, kernels=kernels)
    for _ in range(4):
        rt.generate("The king is dead. Long live the king!", max_new_tokens=16, stop_at_eos=False)


def without_packs(mutate):
    def both(bad):
        shutil.rmtree(bad / "packs")
        mutate(bad)

    return both


@pytest.mark.parametrize("kernels", ["ggml", "torch"])
@pytest.mark.parametrize("memory", [None, "60%"])
def test_flipped_byte_names_shard_layer_and_expert(paired, tmp_path, memory, kernels):
    bad = copy_with(paired, tmp_path, without_packs(flip_expert_byte))
    with pytest.raises(
        HobbitError, match=r"experts-high-Q8_0.gguf: layer 1 expert 2 fails its checksum"
    ):
        generate_a_while(bad, memory, kernels)


def test_flipped_byte_in_a_pack_names_it_and_the_fix(paired, tmp_path):
    def flip(bad):
        info = json.loads((bad / "packs" / "experts-high.json").read_text())
        i = info["experts"].index([1, 2])
        with open(bad / "packs" / "experts-high.slots", "r+b") as f:
            f.seek(i * info["slot_bytes"] + 100)
            b = f.read(1)
            f.seek(i * info["slot_bytes"] + 100)
            f.write(bytes([b[0] ^ 0x55]))

    bad = copy_with(paired, tmp_path, flip)
    with pytest.raises(
        HobbitError, match=r"experts-high.slots: layer 1 expert 2 fails its checksum.*hobbit pack"
    ):
        generate_a_while(bad, "60%", kernels="torch")


def test_truncated_shard(paired, tmp_path):
    def truncate(bad):
        shard = bad / "experts-high-Q8_0.gguf"
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 8192)

    bad = copy_with(paired, tmp_path, truncate)
    with pytest.raises(HobbitError, match=r"experts-high-Q8_0.gguf.*(truncated|corrupt)"):
        hobbit_tools.load(bad)


def test_deleted_shard(paired, tmp_path):
    bad = copy_with(paired, tmp_path, lambda b: (b / "experts-low-Q4_K.gguf").unlink())
    with pytest.raises(HobbitError, match="experts-low-Q4_K.gguf is missing"):
        hobbit_tools.load(bad, precision="low")


def test_manifest_of_another_format_version(paired, tmp_path):
    def bump(bad):
        m = json.loads((bad / "manifest.json").read_text())
        (bad / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))

    bad = copy_with(paired, tmp_path, bump)
    with pytest.raises(HobbitError, match="format version 99"):
        hobbit_tools.load(bad)
    assert run("prepare", bad, "--check").exit_code == 1


def test_quality_degrades_q8_0_then_q4_k_then_q2_k(paired, tmp_path):
    """Logits against an F32 reference: Q8_0 close (top-1 agreement, small KL), then Q4_K,
    then Q2_K, each further away; each generates."""
    import torch

    hobbit_tools.prepare(paired / "hf", tmp_path / "f32", high="F32", low="none")
    hobbit_tools.prepare(paired / "hf", tmp_path / "q2", high="Q2_K", low="none")
    ref_rt = hobbit_tools.load(tmp_path / "f32")
    ids = ref_rt.encode(
        "The quality of mercy is not strained; it droppeth as the gentle rain from heaven"
    )
    ref = torch.log_softmax(ref_rt.logits(ids), -1)
    kl, top1 = {}, {}
    for name, model, precision in [("Q8_0", paired / "model", "high"), ("Q4_K", paired / "model", "low"),
                                   ("Q2_K", tmp_path / "q2", "high")]:  # fmt: skip
        rt = hobbit_tools.load(model, precision=precision)
        got = torch.log_softmax(rt.logits(ids), -1)
        kl[name] = float((ref.exp() * (ref - got)).sum(-1).mean())
        top1[name] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        assert len(rt.generate(ids, max_new_tokens=4, stop_at_eos=False).token_ids) == 4
    assert kl["Q8_0"] < kl["Q4_K"] < kl["Q2_K"], kl
    assert kl["Q8_0"] < 1e-3 and top1["Q8_0"] >= 0.95, (kl, top1)

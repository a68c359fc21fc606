"""What `hobbit prepare` writes: GGUF conventions, tokenizer keys, manifest, layouts in."""

import json

import gguf
import numpy as np
import pytest
import torch
from tiny_models import make_checkpoint

import hobbit_tools
from hobbit_tools.quantize.layout import permute_qk


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("mixtral")
    ref = make_checkpoint(
        "mixtral", d / "hf", tokenizer_dir, dtype=torch.bfloat16, max_shard_size="100KB"
    )
    manifest = hobbit_tools.prepare(d / "hf", d / "model")
    return d, ref, manifest


def test_sharded_bf16_checkpoint_defaults_to_bf16(mixtral):
    d, _, manifest = mixtral
    assert (d / "hf" / "model.safetensors.index.json").exists()
    assert manifest["types"] == {"dense": "BF16", "high": "BF16"}
    files = {s["role"]: s["file"] for s in manifest["shards"]}
    assert files == {"dense": "dense-BF16.gguf", "experts-high": "experts-high-BF16.gguf"}
    for s in manifest["shards"]:
        assert (d / "model" / s["file"]).stat().st_size == s["bytes"]
        assert len(s["sha256"]) == 64


def test_dense_shard_follows_llamacpp_conventions(mixtral):
    d, ref, _ = mixtral
    r = gguf.GGUFReader(d / "model" / "dense-BF16.gguf")
    meta = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}
    assert meta["general.architecture"] == "llama"
    assert meta["general.alignment"] == 4096
    assert meta["llama.expert_count"] == 6 and meta["llama.expert_used_count"] == 3
    assert meta["llama.block_count"] == 3 and meta["llama.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert len(meta["tokenizer.ggml.tokens"]) == 384
    assert meta["tokenizer.ggml.bos_token_id"] == 0
    assert json.loads(meta["tokenizer.huggingface.json"])["model"]["type"] == "BPE"
    assert meta["split.count"] == 2 and meta["split.no"] == 0
    tensors = {t.name: t for t in r.tensors}
    assert "blk.0.ffn_gate_exps.weight" not in tensors
    for t in r.tensors:
        assert t.data_offset % 4096 == 0, t.name
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.BF16
    # Q is stored permuted as llama.cpp expects for its llama architecture.
    want = ref.model.layers[1].self_attn.q_proj.weight.detach().to(torch.bfloat16).float().numpy()
    got = torch.from_numpy(np.array(q.data).view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.array_equal(got.reshape(want.shape), permute_qk(want, 6))


def test_expert_shard_stacks_experts_outermost(mixtral):
    d, ref, manifest = mixtral
    r = gguf.GGUFReader(d / "model" / "experts-high-BF16.gguf")
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == {
        f"blk.{i}.ffn_{p}_exps.weight" for i in range(3) for p in ("gate", "up", "down")
    }
    down = tensors["blk.2.ffn_down_exps.weight"]
    assert list(reversed(down.shape.tolist())) == [6, 72, 40]
    raw = np.array(down.data).view(np.int16).reshape(6, 72, 40)
    e4 = ref.model.layers[2].mlp.experts
    want = e4.down_proj[4] if hasattr(e4, "down_proj") else e4[4].w2.weight
    got = torch.from_numpy(raw[4].copy()).view(torch.bfloat16).float()
    assert torch.equal(got, want.detach().to(torch.bfloat16).float())
    assert manifest["expert_bytes"]["high"] == 3 * 72 * 40 * 2
    assert len(manifest["expert_crc32"]["high"]["2"]) == 6


def test_llamacpp_split_names_point_at_the_shards(mixtral):
    d, _, _ = mixtral
    first = d / "model" / "llamacpp" / "high-00001-of-00002.gguf"
    second = d / "model" / "llamacpp" / "high-00002-of-00002.gguf"
    assert first.resolve() == (d / "model" / "dense-BF16.gguf").resolve()
    assert second.resolve() == (d / "model" / "experts-high-BF16.gguf").resolve()
    r = gguf.GGUFReader(second)
    assert r.get_field("split.no").contents() == 1


def test_bf16_model_runs_close_to_transformers(mixtral):
    d, ref, _ = mixtral
    assert hobbit_tools.load(d / "model", dtype="float32").info["dtype"] == "float32"
    rt = hobbit_tools.load(d / "model")
    assert rt.info["dtype"] == "bfloat16"
    ids = rt.encode("Now is the winter of our discontent")
    got = rt.logits(ids)
    with torch.no_grad():
        want = ref.to(torch.bfloat16)(torch.tensor([ids])).logits[0].float()
    ref.float()
    # bf16 rounding differs in summation order; the distributions must agree.
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    assert (got - want).abs().max() < 0.25


def test_prepare_is_deterministic(mixtral, tmp_path):
    d, _, manifest = mixtral
    again = hobbit_tools.prepare(d / "hf", tmp_path / "again")
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]

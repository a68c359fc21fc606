"""gpt-oss beyond the float parity of test_parity.py: the window really applied, MXFP4
experts read from a checkpoint as released (quantized here with gguf's MXFP4 quantizer and
read back by transformers itself as the reference), carried into GGUF MXFP4 byte for byte,
offloading bit-identical to resident, llama.cpp's gpt-oss layout, the CLI."""

import importlib.util
import json
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import save_file
from test_parity import hf_greedy
from tiny_models import FAMILIES, make_checkpoint
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import hobbit_tools
from hobbit_tools.cli import main
from hobbit_tools.errors import HobbitError
from hobbit_tools.families import ModelConfig
from hobbit_tools.quantize import mxfp4, qtypes
from hobbit_tools.quantize.convert import default_types
from hobbit_tools.runtime.gptoss import clamped_swiglu

PROMPT = "Now is the winter of our discontent made glorious summer"
# Both MXFP4 block dims: hidden and expert ffn multiples of 32, hidden no power of two.
MX_SHAPE = dict(hidden_size=96, intermediate_size=96)
FAMILY_ROPE = FAMILIES["gpt_oss"][2]["rope_parameters"]


@pytest.fixture(scope="module")
def floats(tmp_path_factory, tokenizer_dir):
    """transformers' own save: float experts (gate_up_proj [E, D, 2F], down_proj)."""
    d = tmp_path_factory.mktemp("gpt_oss")
    ref = make_checkpoint("gpt_oss", d / "hf", tokenizer_dir)
    hobbit_tools.prepare(d / "hf", d / "model", dense="F32", high="F32")
    return d, ref


def save_mxfp4(src, dest, tokenizer_dir) -> None:
    """A float gpt-oss checkpoint rewritten as released: experts as MXFP4 `*_blocks` /
    `*_scales` [E, out, in/32, ...] (gguf's quantizer, OpenAI's nibble order), the rest BF16,
    and the quantization_config transformers reads them by."""
    from safetensors.torch import load_file

    out = {}
    for k, v in load_file(src / "model.safetensors").items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4.quantize_openai(v.transpose(1, 2).contiguous().numpy())
            out[k + "_blocks"], out[k + "_scales"] = map(torch.from_numpy, (blocks, scales))
        else:
            out[k] = v.to(torch.bfloat16)
    dest.mkdir()
    save_file(out, dest / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
    }  # fmt: skip
    (dest / "config.json").write_text(json.dumps(cfg))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dest / f.name)


@pytest.fixture(scope="module")
def mx(tmp_path_factory, tokenizer_dir):
    """An MXFP4 checkpoint and transformers' model read from it (experts dequantized by
    transformers, float32)."""
    d = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    make_checkpoint("gpt_oss", d / "float", tokenizer_dir, **MX_SHAPE)
    save_mxfp4(d / "float", d / "hf", tokenizer_dir)
    ref = transformers.GptOssForCausalLM.from_pretrained(
        d / "hf", quantization_config=transformers.Mxfp4Config(dequantize=True)
    )
    return d, ref.float().eval()


def test_mxfp4_round_trip_against_gguf():
    """gguf's bytes -> OpenAI's layout -> gguf's bytes is the identity, and OpenAI's layout
    dequantizes (transformers' convert_moe_packed_tensors) to what gguf's dequantizer gives."""
    x = np.random.default_rng(0).standard_normal((3, 5, 96)).astype(np.float32) * 3
    x[0, 0, :32] = 0  # an all-zero block (scale byte 0)
    raw = qtypes.quantize(x, "MXFP4")
    blocks, scales = mxfp4.gguf_to_openai(raw, 96)
    assert blocks.shape == (3, 5, 3, 16) and scales.shape == (3, 5, 3)
    assert np.array_equal(mxfp4.openai_to_gguf(blocks, scales), raw)
    want = qtypes.dequantize(raw, "MXFP4", x.shape)
    theirs = convert_moe_packed_tensors(
        torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
    ).transpose(1, 2)  # transformers returns [E, in, out]
    assert np.array_equal(theirs.numpy(), want)
    assert np.array_equal(mxfp4.dequantize_openai(blocks, scales), want)
    assert np.abs(want - x).max() <= np.abs(x).max() / 4  # it did quantize, coarsely


def test_mxfp4_experts_are_carried_over_byte_for_byte(mx, tmp_path):
    d, ref = mx
    man = hobbit_tools.prepare(d / "hf", tmp_path / "m", pack=False)
    assert man["types"] == {"dense": "BF16", "high": "MXFP4"}  # 96: no 256-row low type
    shard = gguf.GGUFReader(tmp_path / "m" / "experts-high-MXFP4.gguf")
    tensors = {t.name: t for t in shard.tensors}
    from safetensors import safe_open

    with safe_open(d / "hf" / "model.safetensors", "pt") as f:
        for layer in range(3):
            stem = f"model.layers.{layer}.mlp.experts."
            gate_up = (f.get_tensor(stem + "gate_up_proj_blocks").numpy(),
                       f.get_tensor(stem + "gate_up_proj_scales").numpy())  # fmt: skip
            # transformers' experts as it computes them: x @ W, gate and up interleaved
            w = ref.model.layers[layer].mlp.experts.gate_up_proj.detach()
            for role, rows in (("gate", slice(0, None, 2)), ("up", slice(1, None, 2))):
                t = tensors[f"blk.{layer}.ffn_{role}_exps.weight"]
                assert t.tensor_type == gguf.GGMLQuantizationType.MXFP4
                want = mxfp4.openai_to_gguf(gate_up[0][:, rows], gate_up[1][:, rows])
                assert np.array_equal(np.asarray(t.data).reshape(want.shape), want)
                got = qtypes.dequantize(np.asarray(t.data), "MXFP4", (6, 96, 96))
                assert np.array_equal(got, w[..., rows].transpose(1, 2).float().numpy())
            down = tensors[f"blk.{layer}.ffn_down_exps.weight"]
            got = qtypes.dequantize(np.asarray(down.data), "MXFP4", (6, 96, 96))
            want = ref.model.layers[layer].mlp.experts.down_proj.detach().transpose(1, 2)
            assert np.array_equal(got, want.float().numpy())


def test_mxfp4_default_low_copy_needs_256_wide_rows():
    base = transformers.GptOssConfig(num_hidden_layers=2, num_local_experts=4).to_dict()
    real = ModelConfig.from_hf(base)  # gpt-oss's own 2880: 90 blocks of 32, no K-quant
    assert default_types("BF16", real, mxfp4_experts=True)["low"] is None
    wide = ModelConfig.from_hf({**base, "hidden_size": 768, "intermediate_size": 512})
    assert default_types("BF16", wide, mxfp4_experts=True) == {
        "dense": "BF16",
        "high": "MXFP4",
        "low": "Q2_K",
    }


def test_mxfp4_checkpoint_matches_transformers_at_f32(mx, tmp_path):
    """Read from MXFP4, written F32: the function transformers computes from the same file."""
    d, ref = mx
    hobbit_tools.prepare(d / "hf", tmp_path / "m", dense="F32", high="F32", pack=False)
    rt = hobbit_tools.load(tmp_path / "m")
    ids = rt.encode(PROMPT)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].float()
    assert (rt.logits(ids) - want).abs().max().item() < 1e-3
    g = rt.generate(ids, max_new_tokens=32, stop_at_eos=False)
    assert g.token_ids == hf_greedy(ref, ids, 32)


def test_window_is_really_applied(floats, tmp_path):
    """The prompt outruns the window; the same model with a window longer than the prompt
    (so no window at all) is far from transformers', the windowed one matches it."""
    d, ref = floats
    cfg = json.loads((d / "hf" / "config.json").read_text())
    rt = hobbit_tools.load(d / "model")
    ids = rt.encode(PROMPT)
    assert len(ids) > 2 * cfg["sliding_window"]
    assert "sliding_attention" in cfg["layer_types"] and "full_attention" in cfg["layer_types"]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].float()
    assert (rt.logits(ids) - want).abs().max().item() < 1e-3
    src = tmp_path / "hf"
    shutil.copytree(d / "hf", src)
    (src / "config.json").write_text(json.dumps({**cfg, "sliding_window": 4096}))
    hobbit_tools.prepare(src, tmp_path / "m", dense="F32", high="F32", pack=False)
    unwindowed = hobbit_tools.load(tmp_path / "m").logits(ids)
    assert (unwindowed - want).abs().max().item() > 1e-2
    assert torch.allclose(unwindowed[: cfg["sliding_window"]], want[: cfg["sliding_window"]],
                          atol=1e-3)  # fmt: skip


def test_clamped_swiglu_equals_transformers():
    cfg = transformers.GptOssConfig(hidden_size=8, intermediate_size=16, swiglu_limit=1.0)
    experts = transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts(cfg)
    gate_up = 3 * torch.randn(50, 32)
    want = experts._apply_gate(gate_up)
    got = clamped_swiglu(gate_up[:, ::2], gate_up[:, 1::2], cfg.swiglu_alpha, cfg.swiglu_limit)
    assert torch.equal(got, want)


def reference_run(model_dir, **kw):
    rt = hobbit_tools.load(model_dir, **kw)
    ids = rt.encode(PROMPT)
    tokens = rt.generate(ids, max_new_tokens=16, stop_at_eos=False).token_ids
    return ids, rt.logits(ids), tokens, hobbit_tools.load(model_dir, policy="ondemand", **kw)


# lru at the top-k minimum misses all the time; prefetch predicts through each layer's own
# biased router
@pytest.mark.parametrize("policy", ["lru", "lru+prefetch"])
def test_offloaded_generation_equals_resident(floats, policy):
    d, _ = floats
    ids, logits, tokens, probe = reference_run(d / "model")
    rt = hobbit_tools.load(d / "model", memory=probe.info["cache_bytes"], policy=policy)
    g = rt.generate(ids, max_new_tokens=16, stop_at_eos=False)
    assert g.token_ids == tokens
    assert g.stats["misses"] > 0
    assert torch.equal(rt.logits(ids), logits)


@pytest.fixture(scope="module")
def paired(mx, tmp_path_factory):
    """MXFP4 high (the checkpoint's bytes) paired with a Q4_0 low copy (the mechanism; 96-wide
    rows allow no lower type)."""
    d, _ = mx
    out = tmp_path_factory.mktemp("paired") / "m"
    hobbit_tools.prepare(d / "hf", out, high="MXFP4", low="Q4_0", pack=False)
    return out


@pytest.mark.parametrize("kernels", ["ggml", "torch"])
def test_mxfp4_experts_offload_bit_identical_and_near_transformers(mx, paired, kernels):
    """MXFP4 experts computed by ggml on their bytes (or dequantized for torch's kernels):
    offloaded equals resident exactly; both near transformers (float32 dense here; the
    experts' activations are Q8_0 in ggml's kernels, bf16 in torch's, as for every
    quantized type: measured 0.9% and 0.35% mean error)."""
    _, ref = mx
    kw = dict(kernels=kernels, dtype="float32")
    ids, logits, tokens, probe = reference_run(paired, **kw)
    assert probe.model.experts.store.p["high"].kernel == kernels
    rt = hobbit_tools.load(paired, memory=probe.info["cache_bytes"], policy="lru", **kw)
    assert rt.generate(ids, max_new_tokens=16, stop_at_eos=False).token_ids == tokens
    assert torch.equal(rt.logits(ids), logits)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].float()
    assert (logits - want).abs().mean() < 0.02 * want.abs().mean()


def test_dense_shard_has_llamacpp_gpt_oss_layout(floats, paired):
    d, _ = floats
    cfg = json.loads((d / "hf" / "config.json").read_text())
    r = gguf.GGUFReader(next((d / "model").glob("dense-*.gguf")))

    def key(name):
        return r.fields[name].contents()

    assert key("general.architecture") == "gpt-oss"
    assert key("gpt-oss.attention.sliding_window") == cfg["sliding_window"]
    assert key("gpt-oss.expert_feed_forward_length") == cfg["intermediate_size"]
    assert key("gpt-oss.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert key("gpt-oss.attention.key_length") == cfg["head_dim"]
    assert key("gpt-oss.rope.scaling.type") == "yarn"
    assert key("gpt-oss.rope.scaling.factor") == pytest.approx(4.0)
    shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in r.tensors}
    heads, e, f = cfg["num_attention_heads"], cfg["num_local_experts"], cfg["intermediate_size"]
    assert shapes["blk.0.attn_sinks.weight"] == (heads,)
    assert shapes["blk.0.post_attention_norm.weight"] == (cfg["hidden_size"],)
    assert shapes["blk.0.ffn_gate_inp.bias"] == (e,)
    assert shapes["blk.2.ffn_gate_exps.bias"] == shapes["blk.2.ffn_up_exps.bias"] == (e, f)
    assert shapes["blk.2.ffn_down_exps.bias"] == (e, cfg["hidden_size"])
    assert "blk.0.ffn_norm.weight" not in shapes
    high = gguf.GGUFReader(paired / "experts-high-MXFP4.gguf")
    assert {t.tensor_type for t in high.tensors} == {gguf.GGMLQuantizationType.MXFP4}
    dense = gguf.GGUFReader(next(paired.glob("dense-*.gguf")))
    assert dense.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_MXFP4_MOE


def test_recipe_keeps_the_released_bytes(mx, tmp_path):
    d, _ = mx
    r = CliRunner().invoke(
        main, ["prepare", str(d / "hf"), "-o", str(tmp_path / "m"), "--recipe", "gpt_oss"]
    )
    assert r.exit_code == 0, r.output
    types = json.loads((tmp_path / "m" / "manifest.json").read_text())["types"]
    assert types == {"dense": "BF16", "high": "MXFP4"}


def test_cli_run_and_bench(paired):
    r = CliRunner().invoke(main, ["run", str(paired), "-p", PROMPT, "-n", "8", "--memory",
                                  "50%", "--policy", "hobbit", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out["token_ids"]) >= 8 and out["stats"]["misses"] > 0
    r = CliRunner().invoke(main, ["bench", str(paired), "--memory", "50%", "--policies",
                                  "resident,lru,hobbit", "-n", "6", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    runs = {x["policy"]: x for x in json.loads(r.output)["runs"]}
    assert set(runs) == {"resident", "lru", "hobbit"}
    assert runs["lru"]["bytes_read_per_token"] > 0


def test_ggml_expert_graph_equals_torch_and_float64(paired):
    """One gpt-oss expert on its MXFP4 bytes in one ggml graph (bias adds, swiglu_oai) against
    the same matmuls with the torch SwiGLU, and against float64 on gguf's dequantized weights
    (ggml's activations are Q8_0: ~1% of the output's range)."""
    from hobbit_tools.runtime.loader import ModelFiles
    from hobbit_tools.runtime.store import ExpertStore, SlotArena

    files = ModelFiles(paired)
    store = ExpertStore(files, ["high"], torch.float32)
    arena = SlotArena(store.p["high"].slot_bytes, 1)
    layer, e = 1, 4
    expert = store.read(layer, e, "high", arena.view(0))
    assert store.p["high"].kernel == "ggml"
    shard = {t.name: t for t in gguf.GGUFReader(paired / "experts-high-MXFP4.gguf").tensors}
    w = [
        torch.from_numpy(
            qtypes.dequantize(
                np.asarray(shard[f"blk.{layer}.ffn_{r}_exps.weight"].data), "MXFP4", (6, 96, 96)
            )[e]  # fmt: skip
        ).double()
        for r in ("gate", "up", "down")
    ]
    bg, bu, bd = (b.double() for b in expert.biases)
    oss = files.config.oss
    for x in (torch.randn(1, 96), torch.randn(5, 96)):
        fused, split = expert(x), expert.torch_forward(x)
        assert torch.allclose(fused, split, atol=1e-5, rtol=1e-5)
        xd = x.double()
        h = clamped_swiglu(xd @ w[0].T + bg, xd @ w[1].T + bu, oss.alpha, oss.limit)
        want = h @ w[2].T + bd
        assert (fused.double() - want).abs().max() < 0.02 * want.abs().max()
    store.close()


def test_llamacpp_loads_dense_and_high_and_agrees(tmp_path, tokenizer_dir):
    """llama.cpp's gpt-oss reads the split (names, keys, sinks, windows, biases) and computes
    what hobbit computes. Its gpt-oss hard-codes swiglu alpha 1.702 and limit 7.0 (the
    released values) and always truncates YaRN's ramp bounds: with truncate false, as
    gpt-oss ships and transformers honours, llama.cpp's logits differ (measured 0.49 here)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    rope = dict(FAMILY_ROPE, truncate=True)
    make_checkpoint("gpt_oss", tmp_path / "hf", tokenizer_dir, swiglu_alpha=1.702,
                    swiglu_limit=7.0, rope_parameters=rope)  # fmt: skip
    hobbit_tools.prepare(tmp_path / "hf", tmp_path / "m", dense="F32", high="F32", pack=False)
    rt = hobbit_tools.load(tmp_path / "m")
    ids = rt.encode(PROMPT + " by this sun of York")
    # its own process: libllama must not meet the ggml that hobbit's kernels loaded
    split = tmp_path / "m" / "llamacpp" / "high-00001-of-00002.gguf"
    script = (
        "import sys, numpy, llama_cpp\n"
        f"lm = llama_cpp.Llama({str(split)!r}, n_ctx=128, n_threads=1, verbose=False, "
        "logits_all=True)\n"
        f"lm.eval({ids})\n"
        f"numpy.save({str(tmp_path / 'scores.npy')!r}, numpy.array(lm.scores[: {len(ids)}]))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    theirs = torch.from_numpy(np.load(tmp_path / "scores.npy"))
    assert (rt.logits(ids) - theirs).abs().max().item() < 5e-3


def test_mxfp4_blocks_without_scales_are_refused(mx, tmp_path):
    from safetensors.torch import load_file

    d, _ = mx
    src = tmp_path / "hf"
    shutil.copytree(d / "hf", src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HobbitError, match=r"layers\.1\.mlp\.experts\.down_proj_blocks .*_scales"):
        hobbit_tools.prepare(src, tmp_path / "m", pack=False)
    assert not (tmp_path / "m").exists()

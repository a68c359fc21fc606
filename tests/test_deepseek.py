"""DeepSeek-V2/V3 beyond logit parity (test_parity.py): MLA's compressed cache, offloading
bit-identical to resident, llama.cpp's deepseek2 layout, MTP layers left out."""

import importlib
import json
import shutil

import gguf
import pytest
import torch
import transformers
from safetensors.torch import save_file
from tiny_models import COMMON, FAMILIES, make_checkpoint

import hobbit_tools
from hobbit_tools.errors import HobbitError
from hobbit_tools.families import ModelConfig
from hobbit_tools.runtime.mla import full_kv_nbytes
from hobbit_tools.runtime.routing import grouped_topk

PROMPT = "Now is the winter of our discontent made glorious summer"


@pytest.fixture(scope="module", params=["deepseek_v2", "deepseek_v3"])
def model(request, tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp(request.param)
    make_checkpoint(request.param, d / "hf", tokenizer_dir)
    hobbit_tools.prepare(d / "hf", d / "model", dense="F32")
    return d


def test_latent_cache_is_smaller_than_full_kv_by_the_config_ratio(model):
    cfg = json.loads((model / "hf" / "config.json").read_text())
    rt = hobbit_tools.load(model / "model", max_context=100)
    heads, rope = cfg["num_attention_heads"], cfg["qk_rope_head_dim"]
    full_per_token = heads * (cfg["qk_nope_head_dim"] + rope + cfg["v_head_dim"])
    latent_per_token = cfg["kv_lora_rank"] + rope
    layers = cfg["num_hidden_layers"]
    assert rt.info["kv_bytes"] == layers * 100 * latent_per_token * 4
    full = full_kv_nbytes(rt.model.cfg, 100, torch.float32)
    assert full / rt.info["kv_bytes"] == full_per_token / latent_per_token


@pytest.fixture(scope="module")
def reference(model):
    rt = hobbit_tools.load(model / "model")
    ids = rt.encode(PROMPT)
    tokens = rt.generate(ids, max_new_tokens=16, stop_at_eos=False).token_ids
    return ids, rt.logits(ids), tokens, hobbit_tools.load(model / "model", policy="ondemand")


# lru at the top-k minimum misses all the time; prefetch predicts through each layer's own
# router (V3: with that layer's correction bias)
@pytest.mark.parametrize("policy", ["lru", "lru+prefetch"])
def test_offloaded_generation_equals_resident(model, reference, policy):
    ids, logits, tokens, probe = reference
    rt = hobbit_tools.load(model / "model", memory=probe.info["cache_bytes"], policy=policy)
    g = rt.generate(ids, max_new_tokens=16, stop_at_eos=False)
    assert g.token_ids == tokens
    assert g.stats["misses"] > 0
    assert torch.equal(rt.logits(ids), logits)


def test_dense_shard_has_llamacpp_deepseek2_layout(model):
    cfg = json.loads((model / "hf" / "config.json").read_text())
    dense = next((model / "model").glob("dense-*.gguf"))
    r = gguf.GGUFReader(dense)

    def key(name):
        return r.fields[name].contents()

    assert key("general.architecture") == "deepseek2"
    assert key("deepseek2.attention.head_count_kv") == 1
    assert key("deepseek2.attention.key_length") == cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    assert key("deepseek2.attention.value_length") == cfg["kv_lora_rank"]
    assert key("deepseek2.leading_dense_block_count") == cfg["first_k_dense_replace"]
    assert key("deepseek2.rope.dimension_count") == cfg["qk_rope_head_dim"]
    assert key("deepseek2.expert_weights_scale") == pytest.approx(cfg["routed_scaling_factor"])
    sigmoid = cfg["model_type"] == "deepseek_v3"
    want = gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX
    assert key("deepseek2.expert_gating_func") == want
    shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in r.tensors}
    heads, rank = cfg["num_attention_heads"], cfg["kv_lora_rank"]
    assert shapes["blk.1.attn_k_b.weight"] == (heads, rank, cfg["qk_nope_head_dim"])
    assert shapes["blk.1.attn_v_b.weight"] == (heads, cfg["v_head_dim"], rank)
    assert "blk.1.attn_kv_b.weight" not in shapes
    assert "blk.0.ffn_gate.weight" in shapes and "blk.0.ffn_gate_inp.weight" not in shapes
    assert ("blk.1.exp_probs_b.bias" in shapes) == sigmoid


def test_mtp_layers_are_left_out(model, tmp_path):
    """Released V3 checkpoints carry a multi-token-prediction layer past num_hidden_layers;
    hobbit (as llama.cpp) does not run it. Other families refuse unknown layers."""
    src = tmp_path / "hf"
    shutil.copytree(model / "hf", src)
    cfg = json.loads((src / "config.json").read_text())
    n, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    extra = {
        f"model.layers.{n}.enorm.weight": torch.ones(d),
        f"model.layers.{n}.mlp.experts.0.gate_proj.weight": torch.zeros(4, d),
    }
    save_file(extra, src / "mtp.safetensors")
    if cfg["model_type"] == "deepseek_v3":
        hobbit_tools.prepare(src, tmp_path / "out", dense="F32", pack=False)
        dense = next((tmp_path / "out").glob("dense-*.gguf"))
        assert not any(t.name.startswith(f"blk.{n}.") for t in gguf.GGUFReader(dense).tensors)
    else:
        with pytest.raises(HobbitError, match="does not know|holds layers"):
            hobbit_tools.prepare(src, tmp_path / "out", dense="F32", pack=False)


@pytest.mark.parametrize(
    "family, config_cls, router_cls, kw",
    [
        ("deepseek_v2", "DeepseekV2Config", "DeepseekV2TopkRouter", dict(topk_method="greedy")),
        ("deepseek_v2", "DeepseekV2Config", "DeepseekV2TopkRouter", {}),
        ("deepseek_v3", "DeepseekV3Config", "DeepseekV3TopkRouter", {}),
        ("deepseek_v3", "DeepseekV3Config", "DeepseekV3TopkRouter", dict(norm_topk_prob=False)),
    ],
)
def test_grouped_router_equals_transformers_on_many_tokens(family, config_cls, router_cls, kw):
    """Routers alone on 512 random tokens: the same experts with the same weights."""
    hf_cfg = getattr(transformers, config_cls)(**{**COMMON, **FAMILIES[family][2], **kw})
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    router = getattr(module, router_cls)(hf_cfg)
    torch.manual_seed(0)
    torch.nn.init.normal_(router.weight, std=0.2)
    if hasattr(router, "e_score_correction_bias"):
        router.e_score_correction_bias.copy_(0.1 * torch.randn_like(router.e_score_correction_bias))
    x = torch.randn(512, hf_cfg.hidden_size)
    with torch.no_grad():
        _, want_w, want_ids = router(x)
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    bias = getattr(router, "e_score_correction_bias", None)
    ids, w = grouped_topk(x @ router.weight.T, cfg.top_k, cfg.grouped, bias)
    want_ids, order = want_ids.sort(dim=-1)
    assert torch.equal(ids.sort(dim=-1).values, want_ids)
    got_w = w.gather(-1, ids.sort(dim=-1).indices)
    assert torch.allclose(got_w, want_w.gather(-1, order), atol=1e-6)

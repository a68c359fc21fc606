"""Tiny random MoE checkpoints of every family, built with transformers' own classes.

Odd sizes on purpose: hidden not a power of two, GQA, top-k > 2 where the family allows it,
several layers. Each `save_pretrained` writes the real Hugging Face layout that `hobbit
prepare` reads (per-expert tensors, config.json, safetensors), plus a BPE tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
VOCAB = 384

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=72,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,
    tie_word_embeddings=False,
)


def quantizable(**overrides) -> dict:
    """A Mixtral shape whose experts block-quantize (K-quants need rows of 256 multiples)."""
    shape = dict(hidden_size=256, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                 num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)  # fmt: skip
    return {**shape, **overrides}


FAMILIES = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=40, num_local_experts=6, num_experts_per_tok=3, rope_theta=10000.0),
    ),
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        # sparsemixer is defined for top-2 only; attention and lm_head biases as Phi-3.5-MoE.
        dict(
            intermediate_size=40,
            num_local_experts=6,
            num_experts_per_tok=2,
            attention_bias=True,
            lm_head_bias=True,
            router_jitter_noise=0.01,
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=56,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=48,
            num_experts=6,
            num_experts_per_tok=3,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=56,
            moe_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=3,
            head_dim=16,
            norm_topk_prob=True,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(intermediate_size=40, num_experts=6, num_experts_per_tok=3, clip_qkv=8.0),
    ),
    # MLA without and with the low-rank query, a dense first layer, group-limited routing
    # (V2: softmax, a group's best score; V3: sigmoid + correction bias, its best two), YaRN.
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            num_key_value_heads=6,
            intermediate_size=56,
            moe_intermediate_size=24,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=3,
            first_k_dense_replace=1,
            kv_lora_rank=20,
            q_lora_rank=None,
            qk_nope_head_dim=12,
            qk_rope_head_dim=8,
            v_head_dim=10,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            # DeepSeek-V2-Lite's YaRN: mscale == mscale_all_dim
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=128,
                beta_fast=32,
                beta_slow=1,
                mscale=0.707,
                mscale_all_dim=0.707,
            ),
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_key_value_heads=6,
            intermediate_size=56,
            moe_intermediate_size=24,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=3,
            first_k_dense_replace=1,
            kv_lora_rank=20,
            q_lora_rank=28,
            qk_nope_head_dim=12,
            qk_rope_head_dim=8,
            v_head_dim=10,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=128,
                mscale=1.0,
                mscale_all_dim=0.5,
            ),
        ),
    ),
    # Both attention kinds (sliding, full, sliding) with a window of 5 that every prompt
    # passes; sinks; a clamp that the activations reach; YaRN without truncation, as
    # gpt-oss ships it. Saved by transformers as float experts (MXFP4: test_gpt_oss.py).
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            head_dim=16,
            intermediate_size=40,
            num_local_experts=6,
            num_experts_per_tok=3,
            sliding_window=5,
            swiglu_limit=1.0,
            swiglu_alpha=1.5,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=4.0,
                original_max_position_embeddings=128,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
            ),
        ),
    ),
}


def train_tokenizer(dest: Path) -> None:
    """A byte-level BPE on a slice of Tiny Shakespeare, saved as transformers would."""
    text = (DATA / "tinyshakespeare.txt").read_text()[:60_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 4,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    bos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": True}
        )
    )


def make_checkpoint(
    family: str,
    dest: Path,
    tokenizer_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    seed: int = 0,
    **overrides,
) -> transformers.PreTrainedModel:
    """Save a random `family` model to dest and return it (float32, eval mode)."""
    config_cls, model_cls, kw = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **kw, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # zeros from transformers: test nothing
            buf.copy_(0.1 * torch.randn_like(buf))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate_up_proj_bias", "down_proj_bias")):  # gpt-oss: zeros too
                p.copy_(0.1 * torch.randn_like(p))
    save = model.to(dtype) if dtype != torch.float32 else model
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    save.save_pretrained(dest, **kwargs)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dest / f.name)
    (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": 0}))
    return model.float()


def prepared_pair(d: Path, tokenizer_dir: Path, pack: bool | None = None, **shape) -> Path:
    """A tiny Mixtral checkpoint at d/hf prepared into d/model as paired Q8_0 + Q4_K expert
    shards (pack=True: with slot packs for torch's kernels); returns d/model. `shape` must
    be quantizable()."""
    import hobbit_tools

    make_checkpoint("mixtral", d / "hf", tokenizer_dir, **shape)
    hobbit_tools.prepare(d / "hf", d / "model", high="Q8_0", low="Q4_K", pack=pack)
    return d / "model"

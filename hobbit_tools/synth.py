"""Random-weight Hugging Face MoE checkpoints of any shape, for benchmarks.

The output is a real checkpoint directory (config.json, sharded safetensors with index,
tokenizer.json) that `hobbit prepare` reads like any other; its text is noise. Written one
tensor at a time, so a multi-GB checkpoint needs little memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .shards import staging_dir


@dataclass(frozen=True)
class SynthShape:
    hidden: int = 512
    ffn: int = 1792  # Mixtral's ffn/hidden ratio is 3.5
    layers: int = 8
    experts: int = 8
    top_k: int = 2
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 32000


# Mixtral-8x7B is hidden 4096, ffn 14336, 32 layers, 8 experts top-2, 32/8 heads.
PRESETS = {
    "mixtral-mini": SynthShape(),  # ~420 MB at bf16, experts 84% of it
    "mixtral-1g": SynthShape(hidden=1024, ffn=3584, layers=6, experts=8, heads=16, kv_heads=4),
    "mixtral-2g": SynthShape(hidden=1024, ffn=3584, layers=12, experts=8, heads=16, kv_heads=4),
}


def byte_tokenizer() -> dict:
    """A byte-level BPE with no merges: every byte is a token, plus <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, **{ch: i + 2 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return json.loads(tok.to_str())


def make_random_checkpoint(
    out: str | Path,
    shape: SynthShape,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    shard_bytes: int = 1 << 30,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Write a random Mixtral-architecture checkpoint of `shape` to `out`."""
    s = shape
    head_dim = s.hidden // s.heads
    gen = torch.Generator().manual_seed(seed)
    tensors: list[tuple[str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", (s.vocab, s.hidden))
    ]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", (s.hidden,)),
            (p + "post_attention_layernorm.weight", (s.hidden,)),
            (p + "self_attn.q_proj.weight", (s.heads * head_dim, s.hidden)),
            (p + "self_attn.k_proj.weight", (s.kv_heads * head_dim, s.hidden)),
            (p + "self_attn.v_proj.weight", (s.kv_heads * head_dim, s.hidden)),
            (p + "self_attn.o_proj.weight", (s.hidden, s.heads * head_dim)),
            (p + "block_sparse_moe.gate.weight", (s.experts, s.hidden)),
        ]
        for e in range(s.experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            tensors += [
                (q + "w1.weight", (s.ffn, s.hidden)),
                (q + "w3.weight", (s.ffn, s.hidden)),
                (q + "w2.weight", (s.hidden, s.ffn)),
            ]
    tensors += [("model.norm.weight", (s.hidden,)), ("lm_head.weight", (s.vocab, s.hidden))]

    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "num_local_experts": s.experts,
        "num_experts_per_tok": s.top_k,
        "vocab_size": s.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": 0,
        "eos_token_id": 1,
        "hobbit_synth": {"shape": asdict(s), "seed": seed, "note": "random weights"},
    }
    itemsize = torch.empty(0, dtype=dtype).element_size()
    total = sum(_numel(shape) * itemsize for _, shape in tensors)
    with staging_dir(Path(out), force) as tmp:
        weight_map: dict[str, str] = {}
        batch: dict[str, torch.Tensor] = {}
        batch_bytes, files = 0, 0
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="synth", disable=not progress)

        def flush():
            nonlocal batch, batch_bytes, files
            files += 1
            name = f"model-{files:05d}.safetensors"
            save_file(batch, tmp / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(batch, name))
            batch, batch_bytes = {}, 0

        for name, shape in tensors:
            t = _init(name, shape, gen).to(dtype)
            batch[name] = t
            batch_bytes += t.numel() * itemsize
            bar.update(t.numel() * itemsize)
            if batch_bytes >= shard_bytes:
                flush()
        if batch:
            flush()
        bar.close()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(byte_tokenizer()))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
        )
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 0, "eos_token_id": 1})
        )
    return Path(out)


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape)
    # Scaled so activations keep unit size through the residual stream.
    return torch.randn(shape, generator=gen) * (shape[1] ** -0.5)


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n

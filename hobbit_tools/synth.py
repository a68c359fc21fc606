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

from .staging import staging_dir, unknown_entries


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
    # Fine-grained routing (Mixtral's softmax-over-top-k is Qwen3's norm_topk_prob routing).
    # Qwen3-30B-A3B's routing shape, 6,144 experts and 384 lookups a token, with small dims:
    # lookups, not bytes, dominate (the control plane's benchmark)
    "qwen3-routing": SynthShape(
        hidden=256, ffn=64, layers=48, experts=128, top_k=8, heads=4, kv_heads=2, vocab=8192
    ),
    # Qwen3-30B-A3B's expert dims (128 of 2048x768, top-8), 2 of its 48 layers: 1.2 G expert
    # parameters (near-the-bound offloading)
    "qwen3-experts": SynthShape(
        hidden=2048, ffn=768, layers=2, experts=128, top_k=8, heads=32, kv_heads=4
    ),
    # OLMoE-1B-7B's experts (64 of 2048x1024, top-8), 2 of its 16 layers
    "olmoe": SynthShape(
        hidden=2048, ffn=1024, layers=2, experts=64, top_k=8, heads=16, kv_heads=16
    ),
}


class ShardedSafetensors:
    """Writes tensors into model-NNNNN.safetensors files of about `shard_bytes` each, plus
    the index: memory holds one shard's tensors at most."""

    def __init__(self, out: Path, shard_bytes: int = 1 << 30):
        self.out, self.shard_bytes = out, shard_bytes
        self.batch: dict[str, torch.Tensor] = {}
        self.batch_bytes = self.files = self.total = 0
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        self.batch[name] = t.contiguous()
        nbytes = t.numel() * t.element_size()
        self.batch_bytes += nbytes
        self.total += nbytes
        if self.batch_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        self.files += 1
        name = f"model-{self.files:05d}.safetensors"
        save_file(self.batch, self.out / name, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self.batch, name))
        self.batch, self.batch_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def bpe_tokenizer(vocab_size: int) -> dict:
    """A byte-level BPE trained on the packaged calibration prose (Hardy), at most
    `vocab_size` tokens (2048 at most), with <s> and </s>: real merges, so that llama.cpp
    loads a synth model's split and the two can be raced on the same bytes."""
    from importlib.resources import files

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(len(alphabet) + 2, min(vocab_size, 2048)),
        special_tokens=["<s>", "</s>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    text = (files("hobbit_tools.profile") / "calibration" / "prose.txt").read_text(encoding="utf-8")
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
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
    with staging_dir(Path(out), force, replaceable=not_a_made_checkpoint, need_bytes=total) as tmp:
        writer = ShardedSafetensors(tmp, shard_bytes)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="synth", disable=not progress)
        for name, shape in tensors:
            t = _init(name, shape, gen).to(dtype)
            writer.add(name, t)
            bar.update(t.numel() * itemsize)
        writer.close()
        bar.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(bpe_tokenizer(s.vocab)))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
        )
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 0, "eos_token_id": 1})
        )
    return Path(out)


def not_a_made_checkpoint(path: Path) -> str | None:
    """None if `path` is a checkpoint `synth` or `widen` wrote (so `--force` may replace it)."""
    try:
        config = json.loads((Path(path) / "config.json").read_bytes())
    except (OSError, ValueError):
        return "has no readable config.json"
    if not isinstance(config, dict) or not (
        "hobbit_synth" in config or "hobbit_widened_from" in config
    ):
        return "is not a checkpoint hobbit synth or widen wrote"
    return unknown_entries(
        Path(path),
        lambda n: n.endswith((".safetensors", ".json", ".tmp")),
    )


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


def widen_checkpoint(
    src: str | Path,
    out: str | Path,
    expert_ffn: int,
    *,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Copy checkpoint `src` with every routed expert's FFN widened to `expert_ffn` by zero
    padding: gate/up rows and down columns of zeros add silu(0) * 0 = 0 to the output, so
    the model computes exactly the same function and routes exactly the same way, with
    experts as many bytes (and as much compute) as a much larger model's."""
    from .families import ModelConfig
    from .quantize.checkpoint import Checkpoint
    from .quantize.convert import _split_names

    ckpt = Checkpoint(src)
    cfg = ModelConfig.from_hf(ckpt.config)
    fam = cfg.spec
    if expert_ffn < cfg.expert_ffn:
        raise ValueError(f"expert_ffn {expert_ffn} is narrower than the model's {cfg.expert_ffn}")
    if fam.gpt_oss:
        raise ValueError("widening gpt-oss's stacked (and MXFP4) experts is not supported")
    experts, _ = _split_names(ckpt, cfg)
    role_of = {m.name: role for (_, _, role), m in experts.items()}
    extra = expert_ffn - cfg.expert_ffn
    total = sum(
        _numel(ckpt.shape(n)) * (expert_ffn / cfg.expert_ffn if n in role_of else 1)
        for n in ckpt.names()
    )
    config = {**ckpt.config, fam.expert_ffn_key: expert_ffn}
    if fam.expert_ffn_key == "intermediate_size" and not all(cfg.moe_layers):
        raise ValueError(
            "widening models with dense-FFN layers sharing intermediate_size is not supported"
        )
    config["hobbit_widened_from"] = cfg.expert_ffn
    width = {"F32": 4, "F16": 2, "BF16": 2}
    need = int(
        sum(
            _numel(ckpt.shape(n))
            * width.get(ckpt.dtype(n), 4)
            * (expert_ffn / cfg.expert_ffn if n in role_of else 1)
            for n in ckpt.names()
        )
    )
    with staging_dir(
        Path(out), force, replaceable=not_a_made_checkpoint, keep=[src], need_bytes=need
    ) as tmp:
        bar = tqdm(total=total, unit="param", unit_scale=True, desc="widen", disable=not progress)
        writer = ShardedSafetensors(tmp)
        for key in ckpt.names():
            t = ckpt.read(key)
            role = role_of.get(key)
            if role in ("gate", "up"):
                t = torch.cat([t, t.new_zeros(extra, t.shape[1])], dim=0)
            elif role == "down":
                t = torch.cat([t, t.new_zeros(t.shape[0], extra)], dim=1)
            writer.add(key, t)
            bar.update(t.numel())
        writer.close()
        bar.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for extra_file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (ckpt.path / extra_file).is_file():
                (tmp / extra_file).write_bytes((ckpt.path / extra_file).read_bytes())
    return Path(out)

"""Per-family differences, in one place.

Every supported Hugging Face MoE family is one `Family` row. Everything else (the converter,
the runtime model, the tests) reads its quirks from here instead of branching on model_type.
`ModelConfig.from_hf` turns a config.json into the one frozen config the runtime uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import gguf

from . import validate
from .errors import HobbitError


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    arch: gguf.MODEL_ARCH  # llama.cpp architecture the shards are written as
    experts_stem: str  # routed experts' HF name inside a layer
    expert_roles: dict[str, str]  # HF projection name -> gate | up | down
    norm: Literal["rms", "layer"] = "rms"
    router: Literal["softmax", "sparsemixer"] = "softmax"
    always_norm_topk: bool = False  # renormalise top-k weights regardless of norm_topk_prob
    qk_norm: Literal[None, "head", "full"] = (
        None  # RMSNorm on q/k: per head, or on the whole projection
    )
    permute_qk: bool = False  # llama.cpp stores q/k permuted for its `llama` architecture
    expert_ffn_key: str = "intermediate_size"
    has_shared_expert: bool = False
    sparse_step_keys: bool = False  # honours mlp_only_layers and decoder_sparse_step


_QWEN_ROLES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_MIXTRAL_ROLES = {"w1": "gate", "w3": "up", "w2": "down"}

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family(
            "mixtral",
            gguf.MODEL_ARCH.LLAMA,
            "block_sparse_moe.experts",
            _MIXTRAL_ROLES,
            always_norm_topk=True,
            permute_qk=True,
        ),
        Family(
            "phimoe",
            gguf.MODEL_ARCH.PHIMOE,
            "block_sparse_moe.experts",
            _MIXTRAL_ROLES,
            norm="layer",
            router="sparsemixer",
        ),
        Family(
            "qwen2_moe",
            gguf.MODEL_ARCH.QWEN2MOE,
            "mlp.experts",
            _QWEN_ROLES,
            expert_ffn_key="moe_intermediate_size",
            has_shared_expert=True,
            sparse_step_keys=True,
        ),
        Family(
            "qwen3_moe",
            gguf.MODEL_ARCH.QWEN3MOE,
            "mlp.experts",
            _QWEN_ROLES,
            qk_norm="head",
            expert_ffn_key="moe_intermediate_size",
            sparse_step_keys=True,
        ),
        Family("olmoe", gguf.MODEL_ARCH.OLMOE, "mlp.experts", _QWEN_ROLES, qk_norm="full"),
    ]
}


def family_for(model_type: str | None) -> Family:
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = ", ".join(sorted(FAMILIES))
    raise HobbitError(
        f"model_type {model_type!r} is not a supported MoE family (supported: {supported}). "
        "Dense models have no experts to offload; run them with llama.cpp or transformers."
    )


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: Literal["default", "longrope"] = "default"
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    short_mscale: float = 1.0
    long_mscale: float = 1.0
    original_max_positions: int = 0  # longrope switches to long_factor past this length


@dataclass(frozen=True)
class ModelConfig:
    """Everything the runtime needs to know about a model's shape. Shapes: D hidden, H heads,
    Hkv kv heads, Dh head dim, E routed experts, K experts per token, F expert ffn."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope: RopeConfig
    max_context: int
    num_experts: int
    top_k: int
    expert_ffn: int
    norm_topk_prob: bool
    dense_ffn: int  # FFN width of non-MoE layers (qwen mlp_only_layers)
    shared_expert_ffn: int
    moe_layers: tuple[bool, ...] = field(repr=False)
    router_jitter_eps: float = 0.0
    clip_qkv: float | None = None
    tie_embeddings: bool = False

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        fam = family_for(cfg.get("model_type"))
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            num_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
            top_k = int(cfg["num_experts_per_tok"])
            expert_ffn = int(cfg[fam.expert_ffn_key])
            vocab = int(cfg["vocab_size"])
        except KeyError as e:
            raise HobbitError(
                f"config.json lacks {e.args[0]!r}, which {fam.model_type} needs"
            ) from e
        except (TypeError, ValueError) as e:
            raise HobbitError(f"config.json holds a non-integer shape number ({e})") from e
        validate.model_numbers(
            "config.json: ",
            layers=layers,
            hidden=hidden,
            heads=heads,
            experts=num_experts,
            top_k=top_k,
            expert_ffn=expert_ffn,
            vocab=vocab,
        )
        if fam.router == "sparsemixer" and top_k != 2:
            raise HobbitError(
                f"{fam.model_type} routes with sparsemixer, defined for top-2 only; got {top_k}"
            )
        moe_layers = tuple(_is_moe_layer(cfg, fam, i) for i in range(layers))
        max_ctx = int(cfg.get("max_position_embeddings") or 4096)
        # A sliding window longer than the context never slides; cap the context at the
        # window instead of implementing windowed attention.
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
            max_ctx = min(max_ctx, int(cfg["sliding_window"]))
        config = cls(
            family=fam.model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            norm_eps=float(cfg.get("rms_norm_eps") or cfg.get("layer_norm_eps") or 1e-5),
            rope=_rope_config(cfg),
            max_context=max_ctx,
            num_experts=num_experts,
            top_k=top_k,
            expert_ffn=expert_ffn,
            norm_topk_prob=fam.always_norm_topk or bool(cfg.get("norm_topk_prob", False)),
            dense_ffn=int(cfg.get("intermediate_size") or 0),
            shared_expert_ffn=int(cfg.get("shared_expert_intermediate_size") or 0)
            if fam.has_shared_expert
            else 0,
            moe_layers=moe_layers,
            router_jitter_eps=float(cfg.get("router_jitter_noise") or 0.0),
            clip_qkv=cfg.get("clip_qkv"),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
        return validate.model_config(config)


def _is_moe_layer(cfg: dict, fam: Family, layer: int) -> bool:
    if not fam.sparse_step_keys:
        return True
    step = int(cfg.get("decoder_sparse_step") or 1)
    return layer not in (cfg.get("mlp_only_layers") or []) and (layer + 1) % step == 0


def _rope_config(cfg: dict) -> RopeConfig:
    # transformers >= 5 writes rope_parameters; released checkpoints carry rope_theta + rope_scaling.
    params = dict(cfg.get("rope_parameters") or {})
    if not params:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind != "longrope":
        raise HobbitError(f"RoPE type {kind!r} is not supported yet (supported: default, longrope)")
    max_pos = int(cfg.get("max_position_embeddings") or 4096)
    original = int(
        params.get("original_max_position_embeddings")
        or cfg.get("original_max_position_embeddings")
        or max_pos
    )
    factor = max_pos / original
    # Phi-MoE publishes its own mscales; otherwise longrope's default attention factor.
    default_mscale = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    attention = params.get("attention_factor")
    return RopeConfig(
        theta=theta,
        kind="longrope",
        short_factor=tuple(float(x) for x in params["short_factor"]),
        long_factor=tuple(float(x) for x in params["long_factor"]),
        short_mscale=float(params.get("short_mscale") or attention or default_mscale),
        long_mscale=float(params.get("long_mscale") or attention or default_mscale),
        original_max_positions=original,
    )

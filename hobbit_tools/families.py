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
    router: Literal["softmax", "sparsemixer", "grouped"] = "softmax"  # grouped: DeepSeek's
    scoring: Literal["softmax", "sigmoid"] = "softmax"  # grouped routers' expert scores
    always_norm_topk: bool = False  # renormalise top-k weights regardless of norm_topk_prob
    qk_norm: Literal[None, "head", "full"] = (
        None  # RMSNorm on q/k: per head, or on the whole projection
    )
    permute_qk: bool = False  # llama.cpp stores q/k permuted for its `llama` architecture
    expert_ffn_key: str = "intermediate_size"
    has_shared_expert: bool = False
    sparse_step_keys: bool = False  # honours mlp_only_layers and decoder_sparse_step
    mla: bool = False  # DeepSeek's multi-head latent attention (compressed KV)
    skip_mtp_layers: bool = False  # drop checkpoint layers past num_hidden_layers (MTP heads)
    # gpt-oss: experts stacked per layer (MXFP4 or float), biased with a clamped SwiGLU;
    # attention sinks and sliding-window layers (runtime/gptoss.py, quantize/mxfp4.py)
    gpt_oss: bool = False


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
        Family(
            "deepseek_v2",
            gguf.MODEL_ARCH.DEEPSEEK2,
            "mlp.experts",
            _QWEN_ROLES,
            router="grouped",
            expert_ffn_key="moe_intermediate_size",
            has_shared_expert=True,
            mla=True,
        ),
        Family(
            "deepseek_v3",
            gguf.MODEL_ARCH.DEEPSEEK2,
            "mlp.experts",
            _QWEN_ROLES,
            router="grouped",
            scoring="sigmoid",
            expert_ffn_key="moe_intermediate_size",
            has_shared_expert=True,
            mla=True,
            skip_mtp_layers=True,  # as llama.cpp: the multi-token-prediction layer is not run
        ),
        Family(
            "gpt_oss",
            gguf.MODEL_ARCH.GPT_OSS,
            "mlp.experts",
            {},  # stacked: quantize/mxfp4.py splits gate_up_proj and down_proj per expert
            # softmax over the top-k logits, which is the renormalised top-k of the softmax
            always_norm_topk=True,
            gpt_oss=True,
        ),
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
    kind: Literal["default", "longrope", "yarn"] = "default"
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    short_mscale: float = 1.0
    long_mscale: float = 1.0
    original_max_positions: int = 0  # longrope switches to long_factor past this length
    # yarn: interpolation factor, ramp bounds (rotations), cos/sin scale, truncated bounds
    factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True
    mscale_all_dim: float = 0.0  # DeepSeek: the softmax scale grows by mscale(factor, this)^2


@dataclass(frozen=True)
class MlaConfig:
    """DeepSeek's multi-head latent attention: keys and values are rebuilt per head from a
    shared latent of kv_rank, which (with the one rotary key) is all the cache holds."""

    q_rank: int  # 0: queries projected directly, no low-rank step
    kv_rank: int
    nope_dim: int  # per-head query/key dims without rotary
    rope_dim: int  # per-head rotary dims (the rotary key is shared by all heads)
    v_dim: int
    interleaved_rope: bool  # rotary pairs are adjacent (x0, x1), (x2, x3), ...
    scale: float  # softmax scale


@dataclass(frozen=True)
class OssConfig:
    """gpt-oss: which layers attend through a sliding window (the others see the whole
    context), and the experts' clamped SwiGLU: (clamp(up, +-limit) + 1) * g * sigmoid(alpha *
    g) with g = min(gate, limit)."""

    sliding_window: int  # a query sees itself and the window - 1 tokens before it
    sliding: tuple[bool, ...]  # per layer, from layer_types
    alpha: float
    limit: float


@dataclass(frozen=True)
class GroupedRouting:
    """DeepSeek's routers: experts scored by softmax (V2) or sigmoid plus a per-expert
    correction bias for the choice (V3, noaux_tc); the choice limited to the topk_group best
    of n_group expert groups; combine weights times routed_scaling_factor."""

    method: Literal["greedy", "group_limited_greedy", "noaux_tc"]
    n_group: int
    topk_group: int
    scale: float
    normalize: bool


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
    mla: MlaConfig | None = None
    grouped: GroupedRouting | None = None
    oss: OssConfig | None = None

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def rope_dim(self) -> int:
        """Dims per head that RoPE rotates."""
        return self.mla.rope_dim if self.mla else self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        fam = family_for(cfg.get("model_type"))
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            num_experts = int(
                cfg.get("num_local_experts")
                or cfg.get("num_experts")
                or cfg.get("n_routed_experts")
                or 0
            )
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
        rope = _rope_config(cfg)
        mla = _mla_config(cfg, rope) if fam.mla else None
        max_ctx = int(cfg.get("max_position_embeddings") or 4096)
        # A sliding window longer than the context never slides; cap the context at the
        # window instead of implementing windowed attention (gpt-oss's window is applied).
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", True) and not fam.gpt_oss:
            max_ctx = min(max_ctx, int(cfg["sliding_window"]))
        config = cls(
            family=fam.model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            # MLA rebuilds keys and values for every head (its config's head_dim is the
            # rotary part only).
            num_kv_heads=heads if mla else int(cfg.get("num_key_value_heads") or heads),
            head_dim=mla.nope_dim + mla.rope_dim
            if mla
            else int(cfg.get("head_dim") or hidden // heads),
            norm_eps=float(cfg.get("rms_norm_eps") or cfg.get("layer_norm_eps") or 1e-5),
            rope=rope,
            max_context=max_ctx,
            num_experts=num_experts,
            top_k=top_k,
            expert_ffn=expert_ffn,
            norm_topk_prob=fam.always_norm_topk or bool(cfg.get("norm_topk_prob", False)),
            dense_ffn=int(cfg.get("intermediate_size") or 0),
            shared_expert_ffn=_shared_expert_ffn(cfg, fam, expert_ffn),
            moe_layers=moe_layers,
            router_jitter_eps=float(cfg.get("router_jitter_noise") or 0.0),
            clip_qkv=cfg.get("clip_qkv"),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            mla=mla,
            grouped=_grouped_routing(cfg, fam, num_experts, top_k)
            if fam.router == "grouped"
            else None,
            oss=_oss_config(cfg, layers) if fam.gpt_oss else None,
        )
        return validate.model_config(config)


def _is_moe_layer(cfg: dict, fam: Family, layer: int) -> bool:
    if fam.mla:  # DeepSeek: the first first_k_dense_replace layers are dense
        return layer >= int(cfg.get("first_k_dense_replace") or 0)
    if not fam.sparse_step_keys:
        return True
    step = int(cfg.get("decoder_sparse_step") or 1)
    return layer not in (cfg.get("mlp_only_layers") or []) and (layer + 1) % step == 0


def _shared_expert_ffn(cfg: dict, fam: Family, expert_ffn: int) -> int:
    if not fam.has_shared_expert:
        return 0
    if fam.mla:  # DeepSeek: n_shared_experts of the routed experts' width, fused into one
        return expert_ffn * int(cfg.get("n_shared_experts") or 0)
    return int(cfg.get("shared_expert_intermediate_size") or 0)


def _mla_config(cfg: dict, rope: RopeConfig) -> MlaConfig:
    try:
        nope, rot = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
        mla = dict(kv_rank=int(cfg["kv_lora_rank"]), v_dim=int(cfg["v_head_dim"]))
    except KeyError as e:
        raise HobbitError(f"config.json lacks {e.args[0]!r}, which MLA attention needs") from e
    scale = (nope + rot) ** -0.5
    if rope.kind == "yarn" and rope.mscale_all_dim and rope.factor > 1:
        scale *= (0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0) ** 2
    return MlaConfig(
        q_rank=int(cfg.get("q_lora_rank") or 0),
        nope_dim=nope,
        rope_dim=rot,
        interleaved_rope=bool(cfg.get("rope_interleave", True)),
        scale=scale,
        **mla,
    )


def _oss_config(cfg: dict, layers: int) -> OssConfig:
    # transformers' default when config.json has no layer_types: sliding, full, sliding, ...
    types = cfg.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
    ]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if len(types) != layers or unknown:
        raise HobbitError(
            f"config.json: layer_types must name sliding_attention or full_attention for each "
            f"of the {layers} layers; got {types}"
        )
    window = int(cfg.get("sliding_window") or 0)
    if window < 1 and "sliding_attention" in types:
        raise HobbitError("config.json: sliding_attention layers need a sliding_window >= 1")
    return OssConfig(
        sliding_window=window,
        sliding=tuple(t == "sliding_attention" for t in types),
        alpha=float(cfg.get("swiglu_alpha", 1.702)),
        limit=float(cfg.get("swiglu_limit", 7.0)),
    )


def _grouped_routing(cfg: dict, fam: Family, num_experts: int, top_k: int) -> GroupedRouting:
    # transformers' V3 router is always noaux_tc (sigmoid + correction bias), its V2 router
    # never renormalises the top-k weights (DeepSeek-V2's released configs say
    # norm_topk_prob: false): the reference's behaviour, whatever the config says.
    if fam.scoring == "sigmoid":
        method, normalize = "noaux_tc", bool(cfg.get("norm_topk_prob", False))
    else:
        method, normalize = str(cfg.get("topk_method") or "greedy"), False
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise HobbitError(
            f"topk_method {method!r} is not supported (supported: greedy, group_limited_greedy)"
        )
    n_group = int(cfg.get("n_group") or 1)
    topk_group = int(cfg.get("topk_group") or n_group)
    if method != "greedy" and (num_experts % n_group or not 0 < topk_group <= n_group):
        raise HobbitError(
            f"config.json: {num_experts} experts do not split into n_group={n_group} groups "
            f"of which topk_group={topk_group} are chosen"
        )
    if method != "greedy" and topk_group * (num_experts // n_group) < top_k:
        raise HobbitError(
            f"config.json: topk_group={topk_group} groups hold fewer experts than "
            f"num_experts_per_tok={top_k}"
        )
    return GroupedRouting(
        method=method,
        n_group=n_group,
        topk_group=topk_group,
        scale=float(cfg.get("routed_scaling_factor") or 1.0),
        normalize=normalize,
    )


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
    max_pos = int(cfg.get("max_position_embeddings") or 4096)
    original = int(
        params.get("original_max_position_embeddings")
        or cfg.get("original_max_position_embeddings")
        or max_pos
    )
    if kind == "yarn":
        return _yarn_config(params, theta, max_pos, original)
    if kind != "longrope":
        raise HobbitError(
            f"RoPE type {kind!r} is not supported yet (supported: default, longrope, yarn)"
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


def _yarn_config(params: dict, theta: float, max_pos: int, original: int) -> RopeConfig:
    """As transformers' _compute_yarn_parameters."""
    factor = float(params.get("factor") or max_pos / original)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    m, m_all = params.get("mscale"), params.get("mscale_all_dim")
    if attention is None:
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return RopeConfig(
        theta=theta,
        kind="yarn",
        original_max_positions=original,
        factor=factor,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        attention_factor=float(attention),
        truncate=bool(params.get("truncate", True)),
        mscale_all_dim=float(m_all or 0.0),
    )

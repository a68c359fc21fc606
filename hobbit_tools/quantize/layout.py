"""Where each checkpoint tensor goes: llama.cpp names, expected shapes, storage types.

Names follow llama.cpp through the gguf package's tensor-name maps. Routed experts are
stacked per layer and role into `blk.N.ffn_{gate,up,down}_exps.weight` of shape [E, rows,
cols] (expert index outermost), so one expert's slice of each is contiguous on disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from ..errors import HobbitError
from ..families import ModelConfig
from ..shards import TensorPlan
from . import qtypes
from .checkpoint import Checkpoint

ROLES = ("gate", "up", "down")

# Dense-FFN layers of MoE families (qwen's mlp_only_layers) are absent from the gguf
# package's per-architecture maps.
_EXTRA_NAMES = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def expert_tensor_name(layer: int, role: str) -> str:
    return f"blk.{layer}.ffn_{role}_exps.weight"


@dataclass(frozen=True)
class DenseTensor:
    plan: TensorPlan
    source: str  # checkpoint tensor name
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    def encode(self, ckpt: Checkpoint) -> np.ndarray:
        x = ckpt.read(self.source).to(torch.float32).numpy()
        if self.transform is not None:
            x = self.transform(x)
        return qtypes.quantize(np.ascontiguousarray(x), self.plan.qtype)


def gguf_name(cfg: ModelConfig, hf_name: str) -> str | None:
    # llama.cpp's converter renames DeepSeek-V3's bias so that its tensor map finds it
    hf_name = hf_name.replace("e_score_correction_bias", "e_score_correction.bias")
    if cfg.oss is not None and (oss := _oss_name(hf_name)):
        return oss
    name = _name_map(cfg).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is not None:
        return name
    parts = hf_name.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"]:
        extra = _EXTRA_NAMES.get(".".join(parts[3:5]))
        if extra:
            return f"blk.{parts[2]}.{extra}.{parts[5]}"
    return None


def _oss_name(hf_name: str) -> str | None:
    """gpt-oss's names outside the gguf package's map, as llama.cpp's converter writes them:
    sinks get a .weight; the stacked experts' biases become ffn_{gate,up,down}_exps.bias
    (gate_up's interleaved bias is split by `_split_gate_up`)."""
    parts = hf_name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        return None
    stem = {
        "self_attn.sinks": "attn_sinks.weight",
        "mlp.experts.gate_up_proj_bias": "ffn_gate_up_exps.bias",
        "mlp.experts.down_proj_bias": "ffn_down_exps.bias",
    }.get(".".join(parts[3:]))
    return f"blk.{parts[2]}.{stem}" if stem else None


_MAPS: dict[tuple, gguf.TensorNameMap] = {}


def _name_map(cfg: ModelConfig) -> gguf.TensorNameMap:
    key = (cfg.spec.arch, cfg.num_layers)
    if key not in _MAPS:
        _MAPS[key] = gguf.get_tensor_name_map(cfg.spec.arch, cfg.num_layers)
    return _MAPS[key]


def required_dense_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every non-expert tensor the runtime needs, with its shape (rows, cols)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (v, d)
    fam = cfg.spec
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (d,), b + ffn_norm_name(cfg) + ".weight": (d,)}
        if cfg.oss is not None:
            shapes |= _oss_shapes(cfg, b)
        if cfg.mla:
            shapes |= _mla_shapes(cfg, b)
        else:
            shapes |= {
                b + "attn_q.weight": (q, d),
                b + "attn_k.weight": (kv, d),
                b + "attn_v.weight": (kv, d),
                b + "attn_output.weight": (d, q),
            }
        if fam.qk_norm == "head":
            shapes |= {
                b + "attn_q_norm.weight": (cfg.head_dim,),
                b + "attn_k_norm.weight": (cfg.head_dim,),
            }
        elif fam.qk_norm == "full":
            shapes |= {b + "attn_q_norm.weight": (q,), b + "attn_k_norm.weight": (kv,)}
        if fam.norm == "layer":
            shapes |= {b + "attn_norm.bias": (d,), b + "ffn_norm.bias": (d,)}
        if cfg.moe_layers[i]:
            shapes[b + "ffn_gate_inp.weight"] = (cfg.num_experts, d)
            if cfg.shared_expert_ffn:
                s = cfg.shared_expert_ffn
                shapes |= {
                    b + "ffn_gate_shexp.weight": (s, d),
                    b + "ffn_up_shexp.weight": (s, d),
                    b + "ffn_down_shexp.weight": (d, s),
                }
                if not cfg.mla:  # qwen2_moe gates its shared expert; DeepSeek adds them as is
                    shapes[b + "ffn_gate_inp_shexp.weight"] = (1, d)
            if cfg.grouped is not None and cfg.grouped.method == "noaux_tc":
                shapes[b + "exp_probs_b.bias"] = (cfg.num_experts,)
        else:
            f = cfg.dense_ffn
            shapes |= {
                b + "ffn_gate.weight": (f, d),
                b + "ffn_up.weight": (f, d),
                b + "ffn_down.weight": (d, f),
            }
    if fam.norm == "layer":
        shapes["output_norm.bias"] = (d,)
    return shapes


def ffn_norm_name(cfg: ModelConfig) -> str:
    """llama.cpp's name for the norm before the FFN (gpt-oss: post_attention_norm)."""
    return "post_attention_norm" if cfg.oss is not None else "ffn_norm"


def _oss_shapes(cfg: ModelConfig, b: str) -> dict[str, tuple[int, ...]]:
    """gpt-oss: sinks per head, the router's bias, the experts' biases [E, F] / [E, D]."""
    e, f, d = cfg.num_experts, cfg.expert_ffn, cfg.hidden_size
    return {
        b + "attn_sinks.weight": (cfg.num_heads,),
        b + "ffn_gate_inp.bias": (e,),
        b + "ffn_gate_exps.bias": (e, f),
        b + "ffn_up_exps.bias": (e, f),
        b + "ffn_down_exps.bias": (e, d),
    }


def _split_gate_up(by_gguf: dict[str, str]) -> None:
    """gpt-oss's interleaved gate_up bias (one checkpoint tensor) -> gate and up biases."""
    for g in [g for g in by_gguf if g.endswith(".ffn_gate_up_exps.bias")]:
        hf = by_gguf.pop(g)
        by_gguf[g.replace("gate_up", "gate")] = hf
        by_gguf[g.replace("gate_up", "up")] = hf


def _mla_shapes(cfg: ModelConfig, b: str) -> dict[str, tuple[int, ...]]:
    """llama.cpp's deepseek2 layout: kv_b split per head into k_b (transposed) and v_b."""
    m, h, d = cfg.mla, cfg.num_heads, cfg.hidden_size
    q = h * (m.nope_dim + m.rope_dim)
    shapes = {
        b + "attn_kv_a_mqa.weight": (m.kv_rank + m.rope_dim, d),
        b + "attn_kv_a_norm.weight": (m.kv_rank,),
        b + "attn_k_b.weight": (h, m.kv_rank, m.nope_dim),
        b + "attn_v_b.weight": (h, m.v_dim, m.kv_rank),
        b + "attn_output.weight": (d, h * m.v_dim),
    }
    if m.q_rank:
        return shapes | {
            b + "attn_q_a.weight": (m.q_rank, d),
            b + "attn_q_a_norm.weight": (m.q_rank,),
            b + "attn_q_b.weight": (q, m.q_rank),
        }
    return shapes | {b + "attn_q.weight": (q, d)}


def _split_kv_b(cfg: ModelConfig, by_gguf: dict[str, str]) -> None:
    """attn_kv_b (one checkpoint tensor) -> attn_k_b + attn_v_b, both read from it."""
    for g in [g for g in by_gguf if g.endswith(".attn_kv_b.weight")]:
        hf = by_gguf.pop(g)
        by_gguf[g.replace("attn_kv_b", "attn_k_b")] = hf
        by_gguf[g.replace("attn_kv_b", "attn_v_b")] = hf


def _source_shape(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint shape a tensor is made from (kv_b for the split MLA tensors)."""
    if name.endswith((".attn_k_b.weight", ".attn_v_b.weight")):
        m = cfg.mla
        return (cfg.num_heads * (m.nope_dim + m.v_dim), m.kv_rank)
    if cfg.oss is not None and name.endswith((".ffn_gate_exps.bias", ".ffn_up_exps.bias")):
        return (shape[0], 2 * shape[1])
    return shape


def dense_plan(
    ckpt: Checkpoint, cfg: ModelConfig, names: list[str], qtype: str
) -> list[DenseTensor]:
    required = required_dense_shapes(cfg)
    by_gguf: dict[str, str] = {}
    unknown = []
    for hf in names:
        g = gguf_name(cfg, hf)
        if g is None:
            unknown.append(hf)
        else:
            by_gguf[g] = hf
    if unknown:
        raise HobbitError(
            f"checkpoint has tensors hobbit does not know for {cfg.family}: {', '.join(unknown[:5])}"
        )
    if cfg.mla:
        _split_kv_b(cfg, by_gguf)
    if cfg.oss is not None:
        _split_gate_up(by_gguf)
    missing = [g for g in required if g not in by_gguf]
    if missing:
        hint = ", ".join(missing[:5]) + (
            f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise HobbitError(f"checkpoint lacks tensors: {hint}")
    plans = []
    for g in sorted(by_gguf, key=_order):
        hf = by_gguf[g]
        src = ckpt.shape(hf)
        want = required.get(g) or _bias_shape(g, required, src)
        if tuple(src) != _source_shape(cfg, g, tuple(want)):
            expected = list(_source_shape(cfg, g, tuple(want)))
            raise HobbitError(f"{hf} has shape {list(src)}, expected {expected} from config.json")
        shape = tuple(want)
        # Norms, biases and routers stay F32, as llama.cpp keeps them: routing is sensitive.
        # A matrix whose rows are no whole number of the type's blocks stays F32 too.
        blocks = len(shape) >= 2 and shape[-1] % qtypes.block_size(qtype) == 0
        t = qtype if blocks and "ffn_gate_inp" not in g and not g.endswith(".bias") else "F32"
        rows = math.prod(shape[:-1])
        nbytes = rows * qtypes.row_nbytes(t, shape[-1]) if len(shape) >= 2 else shape[0] * 4
        plans.append(DenseTensor(TensorPlan(g, tuple(shape), t, nbytes), hf, _transform(cfg, g)))
    return plans


def _bias_shape(name: str, required: dict, shape) -> tuple[int, ...]:
    weight = required.get(name.replace(".bias", ".weight"))
    if name.endswith(".bias") and weight is not None:
        return (weight[0],)
    return tuple(shape)


def _order(name: str) -> tuple:
    parts = name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), ".".join(parts[2:]))
    return (0 if name.startswith("token_embd") else 2, 0, name)


def _transform(cfg: ModelConfig, name: str):
    if name.endswith(".attn_k_b.weight"):
        return lambda x: split_kv_b(x, cfg)[0]
    if name.endswith(".attn_v_b.weight"):
        return lambda x: split_kv_b(x, cfg)[1]
    if cfg.oss is not None and name.endswith(".ffn_gate_exps.bias"):
        return lambda x: np.ascontiguousarray(x[:, 0::2])  # interleaved: gate, up, gate, ...
    if cfg.oss is not None and name.endswith(".ffn_up_exps.bias"):
        return lambda x: np.ascontiguousarray(x[:, 1::2])
    if not cfg.spec.permute_qk:
        return None
    if name.endswith("attn_q.weight"):
        return lambda x: permute_qk(x, cfg.num_heads)
    if name.endswith("attn_k.weight"):
        return lambda x: permute_qk(x, cfg.num_kv_heads)
    return None


def split_kv_b(w: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """MLA's kv_b [H*(N+V), R] -> k_b [H, R, N] (transposed), v_b [H, V, R], as llama.cpp's
    converter writes them for its absorbed attention."""
    m = cfg.mla
    kv = w.reshape(cfg.num_heads, m.nope_dim + m.v_dim, w.shape[-1])
    return kv[:, : m.nope_dim].transpose(0, 2, 1), kv[:, m.nope_dim :]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K layout for its `llama` architecture: rotary pairs interleaved."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute_qk`: back to Hugging Face's half-split rotary layout."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )

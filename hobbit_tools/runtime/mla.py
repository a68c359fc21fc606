"""DeepSeek's multi-head latent attention (MLA), computed in the latent space.

Shape legend: T tokens in this call, S cache length, D hidden, H heads, R kv_rank (the
latent), P rotary dims, N per-head dims without rotary, V value head dim.

The cache holds, per layer and token, only the normalised latent c [R] and the rotary key
k_pe [P] that all heads share: R + P numbers where full keys and values would take H*(N+P+V).
Keys and values are never rebuilt: as in llama.cpp, the key up-projection is absorbed into
the query (q_nope[h] @ W_kb[h] lives in the latent space) and the value up-projection is
applied after attention, so attention itself is one-kv-head attention over the cache with
keys [c, k_pe] and values c.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..families import ModelConfig
from .rope import apply_rope, apply_rope_interleaved


@dataclass
class MlaWeights:
    kv_a: torch.Tensor  # [R+P, D]
    kv_a_norm: torch.Tensor  # [R]
    k_b: torch.Tensor  # [H, N, R]: k_nope[h] = W_kb[h] @ c
    v_b: torch.Tensor  # [H, R, V]: v[h] = c @ v_b[h]
    q: torch.Tensor | None = None  # [H*(N+P), D] (no q_rank)
    q_a: torch.Tensor | None = None  # [q_rank, D]
    q_a_norm: torch.Tensor | None = None  # [q_rank]
    q_b: torch.Tensor | None = None  # [H*(N+P), q_rank]


class LatentCache:
    """Preallocated [L, S, R+P]: each token's latent and rotary key; `length` filled."""

    def __init__(self, cfg: ModelConfig, max_len: int, dtype: torch.dtype):
        m = cfg.mla
        self.kv = torch.zeros(cfg.num_layers, max_len, m.kv_rank + m.rope_dim, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def reserve(self, n: int) -> None:
        """Preallocated: already room for max_len tokens (the latent is small)."""

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def full_kv_nbytes(cfg: ModelConfig, max_len: int, dtype: torch.dtype) -> int:
    """What a cache of the rebuilt per-head keys and values would take."""
    m = cfg.mla
    per_token = cfg.num_heads * (m.nope_dim + m.rope_dim + m.v_dim)
    return cfg.num_layers * max_len * per_token * torch.empty(0, dtype=dtype).element_size()


def mla_attention(
    cfg: ModelConfig,
    w: MlaWeights,
    cache: LatentCache,
    layer: int,
    x: torch.Tensor,
    start: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm,
) -> torch.Tensor:
    """x [T, D] (after the layer's input norm) -> attention output [T, H*V]; writes this
    call's latents into `cache` at start..start+T. `norm(x, weight)` is the RMSNorm."""
    m, T, H = cfg.mla, x.shape[0], cfg.num_heads
    rope = apply_rope_interleaved if m.interleaved_rope else apply_rope
    q = (
        F.linear(x, w.q)
        if w.q is not None
        else F.linear(norm(F.linear(x, w.q_a), w.q_a_norm), w.q_b)
    )
    q = q.view(T, H, m.nope_dim + m.rope_dim).transpose(0, 1)  # [H, T, N+P]
    q_nope, q_pe = q.split([m.nope_dim, m.rope_dim], dim=-1)
    c, k_pe = F.linear(x, w.kv_a).split([m.kv_rank, m.rope_dim], dim=-1)
    end = start + T
    kv = cache.kv[layer]
    kv[start:end, : m.kv_rank] = norm(c, w.kv_a_norm)
    kv[start:end, m.kv_rank :] = rope(k_pe[None], cos, sin)[0]
    q_lat = torch.cat((torch.matmul(q_nope, w.k_b), rope(q_pe, cos, sin)), dim=-1)  # [H,T,R+P]
    keys = kv[:end][None]  # [1, S, R+P]
    mask = None
    if T > 1:  # query t sees keys 0..start+t
        mask = torch.ones(T, end, dtype=torch.bool).tril(diagonal=start)
    out = F.scaled_dot_product_attention(
        q_lat[None],
        keys[None],
        keys[..., : m.kv_rank][None],
        attn_mask=mask,
        scale=m.scale,
        enable_gqa=True,
    )[0]  # [H, T, R]
    return torch.matmul(out, w.v_b).transpose(0, 1).reshape(T, H * m.v_dim)

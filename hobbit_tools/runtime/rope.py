"""Rotary position embeddings: tables precomputed once for the whole context."""

from __future__ import annotations

import math

import torch

from ..families import RopeConfig


class Rope:
    """cos/sin tables [S, Dh] in the compute dtype; longrope keeps a short and a long table
    and, like transformers, uses the long one once the sequence passes the original length;
    yarn blends interpolated and original frequencies and scales the tables."""

    def __init__(self, cfg: RopeConfig, head_dim: int, max_positions: int, dtype: torch.dtype):
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        base = cfg.theta**exponent
        if cfg.kind == "default":
            self.tables = [_table(1.0 / base, 1.0, max_positions, dtype)]
        elif cfg.kind == "yarn":
            inv = _yarn_inv_freq(cfg, base, head_dim)
            self.tables = [_table(inv, cfg.attention_factor, max_positions, dtype)]
        else:
            short = 1.0 / (torch.tensor(cfg.short_factor, dtype=torch.float32) * base)
            long = 1.0 / (torch.tensor(cfg.long_factor, dtype=torch.float32) * base)
            self.tables = [
                _table(short, cfg.short_mscale, max_positions, dtype),
                _table(long, cfg.long_mscale, max_positions, dtype),
            ]
        self.switch_at = cfg.original_max_positions

    def __call__(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        long = len(self.tables) > 1 and start + length > self.switch_at
        cos, sin = self.tables[1 if long else 0]
        return cos[start : start + length], sin[start : start + length]


def _table(inv_freq: torch.Tensor, scale: float, n: int, dtype: torch.dtype):
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _yarn_inv_freq(cfg: RopeConfig, base: torch.Tensor, dim: int) -> torch.Tensor:
    """As transformers' _compute_yarn_parameters: original frequencies for the dims that turn
    more than beta_fast times over the original context, interpolated (/ factor) below
    beta_slow, a linear ramp between."""

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(cfg.original_max_positions / (rotations * 2 * math.pi))) / (
            2 * math.log(cfg.theta)
        )

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (cfg.factor * base)) * ramp + (1.0 / base) * extrapolation


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [H, T, Dh]; cos/sin [T, Dh]. Hugging Face's half-split (NeoX) rotation."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [H, T, Dh]; cos/sin [T, Dh] as `Rope` makes them. DeepSeek's layout: rotary pairs
    adjacent, (x0, x1), (x2, x3), ...; the result de-interleaved (pairs' first elements,
    then their second), as transformers returns it: attention only takes dot products."""
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

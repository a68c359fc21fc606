"""Rotary position embeddings: tables precomputed once for the whole context."""

from __future__ import annotations

import torch

from ..families import RopeConfig


class Rope:
    """cos/sin tables [S, Dh] in the compute dtype; longrope keeps a short and a long table
    and, like transformers, uses the long one once the sequence passes the original length."""

    def __init__(self, cfg: RopeConfig, head_dim: int, max_positions: int, dtype: torch.dtype):
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        base = cfg.theta**exponent
        if cfg.kind == "default":
            self.tables = [_table(1.0 / base, 1.0, max_positions, dtype)]
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [H, T, Dh]; cos/sin [T, Dh]. Hugging Face's half-split (NeoX) rotation."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin

"""MXFP4, gpt-oss's expert format, and gpt-oss's stacked expert tensors.

MXFP4 (OCP microscaling): blocks of 32 e2m1 values (codes 0..7: +0, 0.5, 1, 1.5, 2, 3, 4, 6;
8..15 the same negated) sharing one E8M0 scale byte s, value = code * 2^(s - 127).

Two byte layouts of the same numbers:
* gpt-oss checkpoints (OpenAI's, read by transformers' `convert_moe_packed_tensors`):
  `*_blocks` uint8 [..., G, 16] with element 2j in the low nibble of byte j and 2j+1 in its
  high nibble, `*_scales` uint8 [..., G] apart;
* GGUF MXFP4 (ggml's block_mxfp4): 17 bytes a block, the scale byte then 16 bytes whose
  byte j holds element j (low nibble) and element j + 16 (high nibble).
Codes and scale bytes are the same in both (ggml's table holds the values doubled and its
scale halves them), so converting is a nibble shuffle: exact, no requantization.

gpt-oss stacks each layer's experts in two tensors: `gate_up_proj` [E, D, 2F] (used as
x @ W, gate and up interleaved along the last dim: gate = [..., ::2], up = [..., 1::2]) and
`down_proj` [E, F, D]; released checkpoints hold both as MXFP4 with rows the output features
(`gate_up_proj_blocks` [E, 2F, D/32, 16], interleaved rows), a transformers random-init save
as floats. `stacked_experts` serves each expert's gate/up/down [rows, cols] from either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import HobbitError
from . import qtypes

BLOCK = 32
_ROLES_OF = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}


def openai_to_gguf(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> GGUF MXFP4 bytes [..., G * 17]."""
    blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales, np.uint8)
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise HobbitError(
            f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not pair "
            "(blocks must be [..., G, 16] with scales [..., G]): the checkpoint is damaged"
        )
    codes = np.stack((blocks & 0x0F, blocks >> 4), axis=-1).reshape(*blocks.shape[:-1], BLOCK)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    out = np.concatenate((scales[..., None], qs), axis=-1)  # [..., G, 17]
    return np.ascontiguousarray(out).reshape(*scales.shape[:-1], -1)


def gguf_to_openai(raw: np.ndarray, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """GGUF MXFP4 bytes [..., cols / 32 * 17] -> (blocks [..., G, 16], scales [..., G])."""
    raw = np.asarray(raw, np.uint8)
    b = raw.reshape(*raw.shape[:-1], cols // BLOCK, 17)
    scales, qs = b[..., 0], b[..., 1:]
    codes = np.concatenate((qs & 0x0F, qs >> 4), axis=-1)  # elements 0..15, then 16..31
    pairs = codes.reshape(*codes.shape[:-1], 16, 2)
    return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4)), np.ascontiguousarray(scales)


def quantize_openai(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [..., cols] -> gpt-oss checkpoint blocks and scales (gguf's MXFP4 quantizer)."""
    return gguf_to_openai(qtypes.quantize(x, "MXFP4"), x.shape[-1])


def dequantize_openai(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """gpt-oss blocks [..., G, 16] and scales [..., G] -> float32 [..., G * 32]."""
    raw = openai_to_gguf(blocks, scales)
    shape = (*raw.shape[:-1], raw.shape[-1] // 17 * BLOCK)
    return qtypes.dequantize(raw, "MXFP4", shape)


@dataclass
class StackedMatrix:
    """One expert's gate, up or down matrix [rows, cols] (rows the output features) inside
    a layer's stacked tensor, held as floats or as MXFP4 blocks and scales."""

    ckpt: object  # quantize.checkpoint.Checkpoint
    stem: str  # model.layers.N.mlp.experts.gate_up_proj | ...down_proj
    expert: int
    role: str
    mxfp4: bool
    shape: tuple[int, int]
    _last: dict = field(default_factory=dict, repr=False)  # shared per stem: the last read

    @property
    def name(self) -> str:
        return f"{self.stem}{'_blocks' if self.mxfp4 else ''}[{self.expert}] ({self.role})"

    def _rows(self, a: np.ndarray) -> np.ndarray:
        """The role's rows of the expert's [2F | D, ...] output-major slice."""
        if self.role == "down":
            return a
        return a[0::2] if self.role == "gate" else a[1::2]

    def _read(self, suffix: str) -> np.ndarray:
        key = (suffix, self.expert)
        if key not in self._last:  # gate then up: one read of the expert's gate_up slice
            self._last.clear()
            self._last[key] = self.ckpt.read_index(self.stem + suffix, self.expert).numpy()
        return self._last[key]

    def raw(self, qtype: str) -> np.ndarray | None:
        """The stored bytes as GGUF `qtype` without requantizing, where they are that type."""
        if not (self.mxfp4 and qtype == "MXFP4"):
            return None
        return openai_to_gguf(self._rows(self._read("_blocks")), self._rows(self._read("_scales")))

    def read(self) -> np.ndarray:
        """float32 [rows, cols]."""
        if self.mxfp4:
            return dequantize_openai(
                self._rows(self._read("_blocks")), self._rows(self._read("_scales"))
            )
        w = self._read("").astype(np.float32, copy=False).T  # x @ W -> [out, in]
        return np.ascontiguousarray(self._rows(w))


def is_stacked_expert(name: str) -> bool:
    return bool(_STACKED.match(name))


_STACKED = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_blocks|_scales)?$"
)


def stacked_experts(ckpt, cfg) -> dict[tuple[int, int, str], StackedMatrix]:
    """(layer, expert, role) -> its matrix, from gpt-oss's stacked expert tensors."""
    out: dict[tuple[int, int, str], StackedMatrix] = {}
    f, d = cfg.expert_ffn, cfg.hidden_size
    for name in ckpt.names():
        m = _STACKED.match(name)
        if m is None or m.group(3) == "_scales":
            continue
        layer, kind, mx = int(m.group(1)), m.group(2), m.group(3) == "_blocks"
        stem = name.removesuffix("_blocks")
        shape = ckpt.shape(name)
        if mx and (len(shape) != 4 or stem + "_scales" not in ckpt.names()):
            raise HobbitError(f"{name} is {list(shape)} without its _scales: not gpt-oss MXFP4")
        last: dict = {}
        for e in range(shape[0]):
            for role in _ROLES_OF[kind]:
                rows_cols = (d, f) if role == "down" else (f, d)
                out[(layer, e, role)] = StackedMatrix(ckpt, stem, e, role, mx, rows_cols, last)
        _check_stacked(ckpt, name, stem, kind, mx, cfg)
    return out


def _check_stacked(ckpt, name: str, stem: str, kind: str, mx: bool, cfg) -> None:
    f, d, e = cfg.expert_ffn, cfg.hidden_size, cfg.num_experts
    rows, cols = (2 * f, d) if kind == "gate_up_proj" else (d, f)
    if mx and cols % BLOCK:
        raise HobbitError(f"{name}: rows of {cols} are no whole number of MXFP4 blocks of 32")
    if mx:
        want = {name: (e, rows, cols // BLOCK, 16), stem + "_scales": (e, rows, cols // BLOCK)}
    else:
        want = {name: (e, cols, rows)}  # stored as x @ W
    for n, shape in want.items():
        if ckpt.shape(n) != shape:
            raise HobbitError(
                f"{n} has shape {list(ckpt.shape(n))}, expected {list(shape)} from config.json"
            )

"""GGUF tensor types: quantize numpy arrays to raw GGUF bytes and back.

`gguf.quants` (llama.cpp's Python package) is the reference for what the bytes mean: every
`dequantize` goes through it, and `quantize` uses it for the types it can quantize (F16,
BF16, Q8_0, Q4_0, Q4_1, MXFP4; bit-exact with ggml's reference quantizers). MXFP4 (gpt-oss's
experts: 32 e2m1 values and one power-of-two scale a block) is normally not quantized at all
but carried over from the checkpoint's own blocks (`mxfp4.py`). The K-quants (Q4_K,
Q2_K, Q6_K), which gguf cannot quantize, use our vectorised quantizers in `kquants`.

Raw bytes are little-endian GGUF blocks, one row of `cols` elements after another:
`quantize(x)` has shape [..., row_nbytes(qtype, cols)] and dtype uint8 for every type,
the float types included.
"""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import kquants

_T = GGMLQuantizationType

QTYPES: dict[str, GGMLQuantizationType] = {
    "F32": _T.F32,
    "F16": _T.F16,
    "BF16": _T.BF16,
    "Q8_0": _T.Q8_0,
    "Q6_K": _T.Q6_K,
    "Q4_0": _T.Q4_0,
    "Q4_1": _T.Q4_1,
    "Q4_K": _T.Q4_K,
    "Q2_K": _T.Q2_K,
    "MXFP4": _T.MXFP4,
}

# Types quantized by our own code (gguf only dequantizes them).
_OURS = {
    "Q4_K": kquants.quantize_q4_k,
    "Q2_K": kquants.quantize_q2_k,
    "Q6_K": kquants.quantize_q6_k,
}


def _name(qtype: str | GGMLQuantizationType) -> str:
    if isinstance(qtype, GGMLQuantizationType):
        name = qtype.name
    else:
        name = str(qtype).upper()
    if name not in QTYPES:
        raise ValueError(f"unknown tensor type {qtype!r}; supported: {', '.join(QTYPES)}")
    return name


def ggml_type(qtype: str | GGMLQuantizationType) -> GGMLQuantizationType:
    """The gguf enum for a type name (case-insensitive)."""
    return QTYPES[_name(qtype)]


def block_size(qtype: str | GGMLQuantizationType) -> int:
    """Elements per block (1 for the float types, 32 for Q8_0/Q4_0/Q4_1, 256 for K-quants)."""
    return GGML_QUANT_SIZES[ggml_type(qtype)][0]


def type_size(qtype: str | GGMLQuantizationType) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[ggml_type(qtype)][1]


def row_nbytes(qtype: str | GGMLQuantizationType, cols: int) -> int:
    """Bytes of one row of `cols` elements. ValueError if cols is not a multiple of the
    type's block size."""
    name = _name(qtype)
    bs, ts = GGML_QUANT_SIZES[QTYPES[name]]
    cols = int(cols)
    if cols <= 0 or cols % bs:
        raise ValueError(f"{name} needs rows a multiple of {bs} elements; this tensor has {cols}")
    return cols // bs * ts


def quantize(x: np.ndarray, qtype: str | GGMLQuantizationType) -> np.ndarray:
    """x float [..., cols] -> raw GGUF bytes, np.uint8 [..., row_nbytes(qtype, cols)].

    Deterministic (identical input -> identical bytes). BF16 rounds to nearest even (as gguf
    and ggml do, NaNs made quiet); F16 rounds to nearest even via numpy."""
    name = _name(qtype)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("quantize needs at least a 1-D array")
    nbytes = row_nbytes(name, x.shape[-1])
    out_shape = (*x.shape[:-1], nbytes)
    if name == "F32":
        out = np.ascontiguousarray(x, dtype="<f4").view(np.uint8)
    elif name == "F16":
        out = np.ascontiguousarray(x.astype("<f2")).view(np.uint8)
    elif name in _OURS:
        out = _OURS[name](x)
    else:
        out = gguf.quants.quantize(np.ascontiguousarray(x), QTYPES[name])
        out = np.ascontiguousarray(out).view(np.uint8)
    return out.reshape(out_shape)


def dequantize(
    raw: np.ndarray, qtype: str | GGMLQuantizationType, shape: tuple[int, ...]
) -> np.ndarray:
    """Raw GGUF bytes -> float32 array of `shape` (thin wrapper around gguf's dequantize)."""
    name = _name(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("dequantize needs a shape with at least one dimension")
    nbytes = row_nbytes(name, shape[-1])
    raw = np.ascontiguousarray(np.asarray(raw).view(np.uint8))
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    if raw.size != rows * nbytes:
        raise ValueError(
            f"{name} tensor of shape {shape} needs {rows * nbytes} bytes; got {raw.size}"
        )
    raw = raw.reshape(*shape[:-1], nbytes)
    qt = QTYPES[name]
    if name == "BF16":
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif name in ("F32", "F16"):
        out = raw.view("<f4" if name == "F32" else "<f2")
    else:
        out = gguf.quants.dequantize(raw, qt)
    return np.asarray(out, dtype=np.float32).reshape(shape)

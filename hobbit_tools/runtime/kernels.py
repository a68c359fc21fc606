"""Compute paths for expert linears y = x @ W.T, one per GGUF tensor type.

Every expert matrix arrives as raw GGUF bytes (uint8 [out, row_nbytes]); `QLinear.from_raw`
converts it once per expert load ("convert after the read") into the form its compute path
wants; the result is called on activations x [T, in] in the compute dtype. Interface:
`QLinear.from_raw(raw, qtype, (out, in), dtype)`, `layer(x)`, `layer.nbytes` (resident
bytes), `layer.path`; `reference_linear` is what every path is tested against.

Paths, chosen per type in `KERNEL_FOR` (bf16/fp16 activations) from measurements on this
2-core AVX2 machine (no native bf16; numbers in `hobbit_tools.quantize.kernel_bench`):

* ``Int4Linear`` (Q4_0, Q4_1, Q4_K): torch's CPU int4 weight-only GEMM
  `_weight_int4pack_mm_for_cpu`, w = (q - 8) * scale + zero per group of 32 along K, with
  scales_and_zeros [K/32, N, 2] in the activation dtype (checked by experiment). The three
  formats map onto it exactly: Q4_0 zero = 0; Q4_1 zero = m + 8d; Q4_K scale = d*sc,
  zero = 8*d*sc - dmin*m. Scales and zeros are held in bf16 (fp32 and fp16 activations take
  a scalar path, ~13x slower), rounding them by <= 2^-9 relative. The packed layout
  is built straight from the GGUF nibbles (checked once against torch's converter, with a
  fallback to it). Output rows are padded to a multiple of 32.
  Also offered for Q8_0 (not the default): q + 128 = 16*hi + lo split into two nibbles and
  one int4 GEMM over K doubled ([x, x] against [W_hi | W_lo]), exact, 1.25 bytes/weight
  resident, but ~1.3x slower than bf16 at T = 1 and 6x slower to convert.
* ``Int8Linear`` (Q2_K): `_weight_int8pack_mm` (per-channel int8 GEMM, the fastest weight
  kernel here). Exact: inside a 256-wide super-block w + dmin*m = d * (sc*q) with sc*q an
  integer 0..45, so K is split into in/256 int8 GEMMs whose per-channel scale is that
  super-block's d, plus one small fp32 GEMM for the 16-wide mins (16-element sums of x
  against dmin*m). 16-wide sub-blocks cannot map onto int4pack groups (32..256 only).
* ``DenseLinear`` (F32, F16, BF16, Q8_0, Q6_K, MXFP4): plain matmul against a dense weight;
  Q8_0, Q6_K and MXFP4 are dequantized to bf16 once at load (2 bytes/weight: Q8_0's per-32 scales have
  no torch kernel, and the int4 split above is slower at T = 1; Q6_K's 16-wide int8 scales
  neither). F16 weights are converted to the activation dtype; F32 weights stay fp32.

Prefill: without native bf16 GEMM a bf16 GEMM runs 4..8x slower than fp32, and the int
kernels do not amortise their unpacking over tokens, so from T >= `prefill_min_tokens`
(per path, measured crossovers: dense 3, int8 16, int4 48) the weight is expanded to fp32
chunk by chunk into a reused 4 MiB scratch and multiplied with MKL's fp32 GEMM.

float32 activations are an accuracy mode (`ACCURATE_FOR`): every type is dequantized to
fp32 at load (4 bytes/weight) and matches the reference to fp32 rounding.

All paths are deterministic: the same input gives bit-identical output (the runtime relies
on it for identical logits across backends). The route depends on T, so a token's output
may differ in the last bits with the number of tokens routed to the expert in one call.
`from_raw` never keeps a reference to `raw` unless asked to (copy=False, dense types only).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from ..quantize import qtypes

__all__ = [
    "QLinear",
    "DenseLinear",
    "Int4Linear",
    "Int8Linear",
    "ACCURATE_FOR",
    "KERNEL_FOR",
    "from_raw",
    "reference_linear",
    "dequantize_torch",
    "native_bf16_gemm",
]

_BLOCK_N = 32  # rows per block of torch's CPU int4 packed layout
# Elements per chunk when expanding weights to fp32 (dequantization and the prefill route):
# 4 MiB of fp32 stays in cache and is reused, where a fresh full-size fp32 weight costs more
# in page faults (~0.35 ms/MB here) than the conversion itself; still large enough for MKL
# to run near peak.
_CHUNK_ELEMS = 1 << 20
_CONV_ELEMS = 1 << 18  # bytes per chunk of the load-time int4 packing

_native_bf16: bool | None = None


def native_bf16_gemm() -> bool:
    """Whether this CPU has a fast bf16 GEMM (oneDNN with AVX512-BF16 or AMX)."""
    global _native_bf16
    if _native_bf16 is None:
        try:
            _native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _native_bf16 = False
    return _native_bf16


# --------------------------------------------------------------------------- raw decoding
# All load-time conversion is numpy, i.e. single-threaded with no OpenMP parallel regions:
# `from_raw` runs on the runtime's I/O threads next to the compute, and torch's intra-op
# parallelism there oversubscribes the cores. Measured with a busy second core: chunked
# torch ops took 4 s to dequantize one Mixtral Q8_0 expert, numpy 0.37 s. Work goes in row
# chunks of ~256K elements so temporaries stay in cache and get reused (fresh memory costs
# ~0.35 ms/MB in page faults on this VM, more than the arithmetic).


def _blocks(raw, qtype: str, shape: tuple[int, int]) -> np.ndarray:
    """raw bytes (torch or numpy uint8) -> numpy uint8 [out, blocks per row, bytes per block]."""
    out, cols = shape
    nbytes = qtypes.row_nbytes(qtype, cols)
    if isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8:
            raise TypeError(f"raw bytes must be uint8, got {raw.dtype}")
        raw = raw.detach().cpu().numpy()
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise TypeError(f"raw bytes must be uint8, got {raw.dtype}")
    if raw.size != out * nbytes:
        raise ValueError(
            f"{qtype} matrix of shape {tuple(shape)} needs {out * nbytes} bytes; got {raw.size}"
        )
    bs, ts = qtypes.block_size(qtype), qtypes.type_size(qtype)
    return raw.reshape(out, cols // bs, ts)


def _f16(b: np.ndarray, off: int) -> np.ndarray:
    """The little-endian fp16 at byte `off` (even) of each block [..., bytes] -> float32.
    (Read through a uint16 view of the whole block: gathering 2-byte slices is 10x slower.)"""
    return b.view("<u2")[..., off // 2].view("<f2").astype(np.float32)


# Below torch's grain size (32768) elementwise kernels run inline in the calling thread.
_SERIAL = 16384


def _copy_serial(dst: torch.Tensor, src: np.ndarray) -> None:
    """dst (1-D torch, any float dtype) <- src (1-D numpy), converting (round to nearest
    even) in slices small enough that torch never opens a parallel region."""
    s = torch.from_numpy(src)
    for a in range(0, s.numel(), _SERIAL):
        dst[a : a + _SERIAL].copy_(s[a : a + _SERIAL])


def _as_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """numpy float32 -> new contiguous torch tensor of `dtype`, converted serially."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == torch.float32:
        return torch.from_numpy(a)
    out = torch.empty(a.shape, dtype=dtype)
    _copy_serial(out.view(-1), a.reshape(-1))
    return out


def _q4k_parts(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K blocks [r, S, 144] -> scale = d*sc, mins = dmin*m [r, S*8] (w = scale*q - mins);
    the 6-bit codes unpacked as ggml's get_scale_min_k4, four at a time in uint32 words."""
    r, s = b.shape[:2]
    d, dmin = _f16(b, 0), _f16(b, 2)
    w = b.view("<u4")[..., 1:4]  # the 12 scale bytes as 3 words: d-part, m-part, high bits
    dd, mm, md = w[..., 0], w[..., 1], w[..., 2]
    lo6, lo4, hi2 = np.uint32(0x3F3F3F3F), np.uint32(0x0F0F0F0F), np.uint32(0x30303030)
    sc = np.stack([dd & lo6, (md & lo4) | ((dd >> np.uint32(2)) & hi2)], axis=-1)
    mn = np.stack([mm & lo6, ((md >> np.uint32(4)) & lo4) | ((mm >> np.uint32(2)) & hi2)], -1)
    scale = sc.view(np.uint8).reshape(r * s, 8) * d.reshape(-1, 1)
    mins = mn.view(np.uint8).reshape(r * s, 8) * dmin.reshape(-1, 1)
    return scale.reshape(r, s * 8), mins.reshape(r, s * 8)


def _dequant_rows(b: np.ndarray, qtype: str) -> np.ndarray:
    """Blocks of a few rows [r, nblk, bytes] -> float32 [r, K], bit-identical to gguf."""
    r = b.shape[0]
    if qtype == "F32":
        return np.ascontiguousarray(b).reshape(r, -1).view("<f4")
    if qtype == "F16":
        return np.ascontiguousarray(b).reshape(r, -1).view("<f2").astype(np.float32)
    if qtype == "BF16":
        u = np.ascontiguousarray(b).reshape(r, -1).view("<u2").astype(np.uint32)
        return (u << 16).view(np.float32)
    if qtype == "Q8_0":
        return np.multiply(
            b[..., 2:].view(np.int8), _f16(b, 0)[..., None], dtype=np.float32
        ).reshape(r, -1)
    return gguf.quants.dequantize(np.ascontiguousarray(b).reshape(r, -1), qtypes.QTYPES[qtype])


def _row_chunk(cols: int) -> int:
    return max(1, _CONV_ELEMS // max(cols, 1))


def dequantize_torch(
    raw: torch.Tensor, qtype: str, shape: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Raw GGUF bytes [out, row_nbytes] -> torch [out, in] in `dtype`: the values of
    `qtypes.dequantize` (gguf's formulas, bit-identical in fp32) rounded once to `dtype`,
    computed chunk by chunk in numpy (single-threaded; see above)."""
    qtype = qtypes.ggml_type(qtype).name
    shape = (int(shape[0]), int(shape[1]))
    b = _blocks(raw, qtype, shape)
    out = torch.empty(shape, dtype=dtype)
    step = _row_chunk(shape[1])
    for a in range(0, shape[0], step):
        w = _dequant_rows(b[a : a + step], qtype)
        if dtype == torch.float32:
            out[a : a + step].numpy()[...] = w
        else:
            _copy_serial(out[a : a + step].view(-1), w.reshape(-1))
    return out


# --------------------------------------------------------------------------- int4 packing
# torch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`, found by experiment and
# checked against it once per process): blocks of 32 rows, [N/32, K, 16] bytes with byte
# (b, k, i) = q[32b + i, k] | q[32b + 16 + i, k] << 4. N must be a multiple of 32 (torch
# itself needs 16 and packs a 16-row tail differently; we pad to 32).


def _pack_int4_torch(q: torch.Tensor) -> torch.Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def _pack_int4_codes(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] -> int4pack bytes [N, K/2] (numpy: its strided byte
    transpose is ~2x faster than torch's, ~8x faster than torch's int32 converter)."""
    n, k = q.shape
    a = q.contiguous().numpy().reshape(n // _BLOCK_N, 2, 16, k)
    comb = a[:, 0] | (a[:, 1] << 4)  # [N/32, 16, K]
    return torch.from_numpy(np.ascontiguousarray(comb.transpose(0, 2, 1)).reshape(n, k // 2))


def _wide(a: np.ndarray) -> tuple[np.ndarray, Callable[[int], int]]:
    """View a C-contiguous uint8 array as the widest unsigned ints its rows allow, so that
    bytewise shift-and-mask work runs 2..8 bytes per operation (numpy's uint8 shifts are
    slow). Returns the view and a function repeating a byte mask over one element."""
    for dt, size in ((np.uint64, 8), (np.uint32, 4), (np.uint16, 2)):
        if a.shape[-1] % size == 0 and a.flags.c_contiguous:
            return a.view(dt), lambda byte, size=size, dt=dt: dt(
                int.from_bytes(bytes([byte]) * size, "little")
            )
    return a, np.uint8


def _pack_int4_gguf(blocks: np.ndarray, npad: int, off: int, m: int, half: int) -> torch.Tensor:
    """GGUF 4-bit blocks -> int4pack bytes [npad, K/2], without materialising the codes.

    blocks: uint8 [N, nblk, block bytes] whose nibbles sit at bytes off .. off + m*half of
    each block, element (j, h, l) (index j*2*half + h*half + l of the block) being nibble h
    of byte off + j*half + l (Q4_0: off 2, m 1, half 16; Q4_1: off 4; Q4_K: off 16, m 4,
    half 32). Rows N..npad are zero. Works on chunks of 32-row blocks so temporaries stay
    small and get reused (fresh memory costs ~0.35 ms/MB in page faults here, more than
    the work itself); the nibble pairing runs on whole rows viewed as wide ints, and the
    gather of the code bytes is fused with the row->column transpose."""
    n, nblk, ts = blocks.shape
    nb = npad // _BLOCK_N
    out = np.empty((nb, nblk, m, 2, half, 16), dtype=np.uint8)
    step = max(1, _CONV_ELEMS // (_BLOCK_N * nblk * ts))  # 32-row blocks per chunk
    for c0 in range(0, nb, step):
        c1 = min(nb, c0 + step)
        chunk = blocks[c0 * _BLOCK_N : c1 * _BLOCK_N]
        if chunk.shape[0] < (c1 - c0) * _BLOCK_N:
            chunk = np.concatenate(
                [chunk, np.zeros(((c1 - c0) * _BLOCK_N - chunk.shape[0], nblk, ts), np.uint8)]
            )
        a, mask = _wide(np.ascontiguousarray(chunk).reshape(c1 - c0, 2, 16, nblk * ts))
        a0, a1 = a[:, 0], a[:, 1]
        m0f, mf0 = mask(0x0F), mask(0xF0)
        lo = (a0 & m0f) | ((a1 << 4) & mf0)
        hi = ((a0 >> 4) & m0f) | (a1 & mf0)
        for h, part in enumerate((lo, hi)):
            src = part.view(np.uint8).reshape(c1 - c0, 16, nblk, ts)[..., off : off + m * half]
            out[c0:c1, :, :, h] = src.reshape(c1 - c0, 16, nblk, m, half).transpose(0, 2, 3, 4, 1)
    return torch.from_numpy(out.reshape(npad, -1))


_layout_ok: bool | None = None


def int4_layout_ok() -> bool:
    """Whether our direct packing reproduces torch's converter on this build (checked once;
    if not, codes are materialised and packed by torch, slower but correct)."""
    global _layout_ok
    if _layout_ok is None:
        g = torch.Generator().manual_seed(0)
        probe = torch.randint(0, 16, (64, 128), generator=g, dtype=torch.uint8)
        try:
            ref = _pack_int4_torch(probe).reshape(-1)
            _layout_ok = torch.equal(_pack_int4_codes(probe).reshape(-1), ref)
        except RuntimeError:
            _layout_ok = False
    return _layout_ok


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] (N % 32 == 0) -> weight for `_weight_int4pack_mm_for_cpu`."""
    return _pack_int4_codes(q) if int4_layout_ok() else _pack_int4_torch(q)


def _pad_rows(t: torch.Tensor, n: int, value=0) -> torch.Tensor:
    if t.shape[0] == n:
        return t
    pad = t.new_full((n - t.shape[0], *t.shape[1:]), value)
    return torch.cat([t, pad], dim=0)


# --------------------------------------------------------------------------- fp32 scratch

_scratch = threading.local()


def _scratch_f32(numel: int) -> torch.Tensor:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        # a normal tensor even when first made under inference_mode: it is reused outside it
        with torch.inference_mode(False):
            buf = torch.empty(max(numel, _CHUNK_ELEMS), dtype=torch.float32)
        _scratch.buf = buf
    return buf[:numel]


# --------------------------------------------------------------------------- interface


class QLinear:
    """One expert matrix ready to compute: `y = layer(x)` is x @ W.T for x [T, in] in the
    compute dtype, y [T, out] in the same dtype.

    Build with `QLinear.from_raw(raw, qtype, (out, in), dtype)`; the class is picked from
    `KERNEL_FOR[qtype]` (or `ACCURATE_FOR` when dtype is float32). Attributes: `qtype`,
    `shape` (out, in), `dtype`, `nbytes` (resident bytes after conversion), `path` (name of
    the compute path), `prefill_min_tokens` (T from which the fp32 prefill route is used;
    0 = never). `from_raw` never keeps a reference to `raw`: the caller may reuse the buffer
    as soon as it returns (unless from_raw(..., copy=False) was asked for).
    """

    qtype: str
    shape: tuple[int, int]
    dtype: torch.dtype
    nbytes: int
    path: str
    prefill_min_tokens: int = 0

    @classmethod
    def from_raw(
        cls,
        raw: torch.Tensor,
        qtype: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        *,
        copy: bool = True,
    ) -> QLinear:
        """Convert raw GGUF bytes (uint8, [out, row_nbytes] or flat) of an (out, in) matrix.

        copy=False lets a path whose resident form is the raw bytes themselves (BF16 weights
        with bf16 activations, F32 weights) keep a view of `raw` instead of a copy: no
        conversion time and no second copy in memory, but the caller must then keep `raw`
        unchanged for as long as the layer is used (e.g. an arena slot that is freed only
        together with the layer)."""
        name = qtypes.ggml_type(qtype).name
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise ValueError(f"expert matrices are 2-D; got shape {shape}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported compute dtype {dtype}")
        if isinstance(raw, np.ndarray):
            raw = torch.from_numpy(raw)
        if cls is QLinear:
            impl = (ACCURATE_FOR if dtype == torch.float32 else KERNEL_FOR).get(name)
            if impl is None:
                raise ValueError(f"no compute path for tensor type {name}")
        else:
            impl = cls
        with torch.no_grad():
            if not copy and impl is DenseLinear:
                return DenseLinear._build(raw, name, shape, dtype, copy=False)
            return impl._build(raw, name, shape, dtype)

    @classmethod
    def _build(cls, raw, qtype, shape, dtype) -> QLinear:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.shape[1]:
            raise ValueError(f"expected x [T, {self.shape[1]}], got {tuple(x.shape)}")
        with torch.no_grad():
            t = x.shape[0]
            if t == 0:
                return x.new_zeros(0, self.shape[0])
            if 0 < self.prefill_min_tokens <= t:
                return self._prefill(x)
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _expand(self, n0: int, n1: int) -> torch.Tensor:
        """Rows n0:n1 of the weight as float32 [n1 - n0, in] (may be a view of scratch)."""
        raise NotImplementedError

    def _row_step(self) -> int:
        return max(_BLOCK_N, _CHUNK_ELEMS // self.shape[1] // _BLOCK_N * _BLOCK_N)

    def dense_weight(self) -> torch.Tensor:
        """The weight this path computes with, as a new float32 [out, in] tensor."""
        n = self.shape[0]
        step = self._row_step()
        return torch.cat([self._expand(a, min(n, a + step)).clone() for a in range(0, n, step)])

    def _prefill(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 route: expand the weight chunk by chunk into cached scratch, fp32 GEMM."""
        n = self.shape[0]
        xt = x.float().t()
        yt = torch.empty(n, x.shape[0], dtype=torch.float32)
        step = self._row_step()
        for a in range(0, n, step):
            b = min(n, a + step)
            torch.mm(self._expand(a, b), xt, out=yt[a:b])
        return yt.t().to(x.dtype).contiguous()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.qtype}, out={self.shape[0]}, in={self.shape[1]}, "
            f"path={self.path}, {self.nbytes} bytes)"
        )


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class DenseLinear(QLinear):
    """Plain matmul against a dense weight held in the compute dtype (fp32 for F32 weights).

    Used for F32/F16/BF16, for Q8_0, Q6_K and MXFP4 (dequantized once at load), and for every type
    when the compute dtype is float32 (`ACCURATE_FOR`). A bf16/fp16 weight takes the fp32
    route from T >= DENSE_PREFILL_MIN_TOKENS where the CPU has no native bf16 GEMM."""

    def __init__(self, w: torch.Tensor, qtype: str, dtype: torch.dtype, path: str):
        self.w = w.contiguous()
        self.qtype = qtype
        self.shape = (int(w.shape[0]), int(w.shape[1]))
        self.dtype = dtype
        self.path = path
        self.nbytes = self.w.numel() * self.w.element_size()
        low = self.w.dtype in (torch.bfloat16, torch.float16)
        self.prefill_min_tokens = DENSE_PREFILL_MIN_TOKENS if low and not native_bf16_gemm() else 0

    @classmethod
    def _build(cls, raw, qtype, shape, dtype, copy=True):
        same = {"BF16": torch.bfloat16, "F32": torch.float32}.get(qtype)
        if same is not None and (dtype == same or qtype == "F32"):
            b = _blocks(raw, qtype, shape).reshape(shape[0], -1)
            if copy or not isinstance(raw, torch.Tensor):
                b = b.copy()  # numpy memcpy: single-threaded
            w = torch.from_numpy(b).view(same)
            return cls(w, qtype, dtype, f"dense-{_dname(same)}")
        wdtype = torch.float32 if qtype == "F32" else dtype
        w = dequantize_torch(raw, qtype, shape, wdtype)
        kind = "dense" if qtype in ("F32", "F16", "BF16") else "dequant"
        return cls(w, qtype, dtype, f"{kind}-{_dname(wdtype)}")

    def _forward(self, x):
        if self.w.dtype != x.dtype:
            return F.linear(x.to(self.w.dtype), self.w).to(x.dtype)
        return F.linear(x, self.w)

    def _expand(self, n0, n1):
        if self.w.dtype == torch.float32:
            return self.w[n0:n1]
        return _scratch_f32((n1 - n0) * self.shape[1]).view(n1 - n0, -1).copy_(self.w[n0:n1])


class Int4Linear(QLinear):
    """`_weight_int4pack_mm_for_cpu` on bf16 activations (see module docstring).

    Holds the packed codes [Npad, K'/2] (Npad = out rounded up to 32; K' = in, or 2*in for
    the nibble-split Q8_0 variant) and bf16 (scale, zero) pairs [K'/32, Npad, 2]."""

    GROUP = 32

    def __init__(self, qtype, shape, dtype, packed, scale, zero, split=False):
        # packed: int4pack bytes [Npad, K'/2]; scale, zero: numpy fp32 [Npad, K'/32]
        n, k = shape
        self.qtype, self.shape, self.dtype = qtype, (n, k), dtype
        self.split = split
        self.npad = packed.shape[0]
        self.kp = packed.shape[1] * 2
        self.packed = packed
        sz = np.stack([scale, zero], axis=-1).transpose(1, 0, 2)  # [G, Npad, 2]
        self.sz = _as_torch(sz, torch.bfloat16)
        self.path = "int4pack-g32" + ("-split" if split else "")
        self.nbytes = self.packed.numel() + self.sz.numel() * 2
        # the fp32 route unpacks our own layout: off where torch's converter packed instead
        fp32_route = not native_bf16_gemm() and int4_layout_ok()
        self.prefill_min_tokens = INT4_PREFILL_MIN_TOKENS if fp32_route else 0

    @classmethod
    def _build(cls, raw, qtype, shape, dtype):
        n, k = shape
        npad = -(-n // _BLOCK_N) * _BLOCK_N
        b = _blocks(raw, qtype, shape)
        if qtype == "Q8_0":
            # q + 128 = 16 * hi + lo; s*q = (hi - 8) * 16s + [(lo - 8) * s + 8s]
            b = np.concatenate([b, np.zeros((npad - n, *b.shape[1:]), np.uint8)])
            d = _f16(b, 0)
            u = (b[..., 2:] ^ 0x80).reshape(npad, k)  # q + 128
            packed = pack_int4(torch.from_numpy(np.concatenate([u >> 4, u & 0x0F], axis=1)))
            scale = np.concatenate([16 * d, d], axis=1)
            zero = np.concatenate([np.zeros_like(d), 8 * d], axis=1)
            return cls(qtype, shape, dtype, packed, scale, zero, split=True)
        if qtype == "Q4_0":
            d = _f16(b, 0)
            scale, zero, off, m, half = d, np.zeros_like(d), 2, 1, 16
        elif qtype == "Q4_1":
            d, mn = _f16(b, 0), _f16(b, 2)
            scale, zero, off, m, half = d, mn + 8 * d, 4, 1, 16
        elif qtype == "Q4_K":
            scale, mins = _q4k_parts(b)
            zero, off, m, half = 8 * scale - mins, 16, 4, 32
        else:
            raise ValueError(f"{qtype} has no int4 path")
        if int4_layout_ok():
            packed = _pack_int4_gguf(b, npad, off, m, half)
        else:
            qs = b[..., off : off + m * half].reshape(n, -1, 1, half)
            codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, k)
            codes = np.concatenate([codes, np.zeros((npad - n, k), np.uint8)])
            packed = _pack_int4_torch(torch.from_numpy(codes))
        if npad != n:  # padded rows: scale = zero = 0, so they compute zeros
            pad = ((0, npad - n), (0, 0))
            scale, zero = np.pad(scale, pad), np.pad(zero, pad)
        return cls(qtype, shape, dtype, packed, scale, zero)

    def _forward(self, x):
        xb = x.to(torch.bfloat16)
        if self.split:
            xb = torch.cat([xb, xb], dim=1)
        y = torch._weight_int4pack_mm_for_cpu(xb, self.packed, self.GROUP, self.sz)
        if self.npad != self.shape[0]:
            y = y[:, : self.shape[0]]
        return y.to(x.dtype).contiguous()

    def _expand(self, n0, n1):
        # Rows n0:n1 (n0 % 32 == 0) from the packed layout [Npad/32, K', 16]. The byte
        # transpose goes through numpy (2x faster than torch's for uint8); the rows are
        # written contiguously so MKL gets a plain row-major A (a transposed A is 10x
        # slower for small T).
        k, kp, g = self.shape[1], self.kp, self.GROUP
        r = n1 - n0
        rp = -(-r // _BLOCK_N) * _BLOCK_N
        c = rp // _BLOCK_N
        b0 = n0 // _BLOCK_N
        p = self.packed.view(self.npad // _BLOCK_N, kp, 16)[b0 : b0 + c].numpy()
        t = torch.from_numpy(np.ascontiguousarray(p.transpose(0, 2, 1)))  # [c, 16, K']
        w = _scratch_f32(rp * kp).view(c, 2, 16, kp)
        w[:, 0].copy_(t & 0x0F)
        w[:, 1].copy_(t >> 4)
        sz = self.sz[:, n0 : n0 + rp].float()  # [G, rp, 2]
        scale = sz[..., 0].t()[..., None]
        zero = (sz[..., 1] - 8 * sz[..., 0]).t()[..., None]
        w = w.view(rp, kp // g, g).mul_(scale).add_(zero).view(rp, kp)[:r]
        if self.split:
            w = w[:, :k].add_(w[:, k:])
        return w


class Int8Linear(QLinear):
    """Q2_K on `_weight_int8pack_mm` (per-output-channel int8 GEMM), exact: within a 256-wide
    super-block w + dmin*m = d * v with v = sc*q an integer in 0..45, so the K-reduction is
    split into in/256 int8 GEMMs, each with the super-block's d as the per-channel scale,
    summed in fp32; the 16-wide mins enter through one small fp32 GEMM of 16-element sums of
    x against dmin*m [out, in/16]. Holds v as int8 [in/256, out, 256] (1 byte per weight),
    d in bf16 [in/256, out] and the mins in fp32 (0.25 bytes per weight)."""

    SUPER = 256

    def __init__(self, qtype, shape, dtype, v, d, mins):
        # v: int8 torch [S, N, 256]; d: numpy fp32 [N, S]; mins: numpy fp32 [N, K/16]
        self.qtype, self.shape, self.dtype = qtype, tuple(shape), dtype
        self.v = v
        self.d = _as_torch(d.T, torch.bfloat16)  # [S, N]
        self.mins = torch.from_numpy(np.ascontiguousarray(mins, dtype=np.float32))
        self.path = "int8pack-k256"
        self.nbytes = self.v.numel() + self.d.numel() * 2 + self.mins.numel() * 4
        self.prefill_min_tokens = INT8_PREFILL_MIN_TOKENS if not native_bf16_gemm() else 0

    @classmethod
    def _build(cls, raw, qtype, shape, dtype):
        if qtype != "Q2_K":
            raise ValueError(f"{qtype} has no int8 path")
        n, k = shape
        bn = _blocks(raw, qtype, shape)
        s = k // cls.SUPER
        d, dmin = _f16(bn, 80), _f16(bn, 82)
        mins = ((bn[..., 0:16] >> 4) * dmin[..., None]).astype(np.float32).reshape(n, -1)
        # v = sc * q, built directly in the [S, N, 256] layout. Element c*128 + j*32 + l of
        # a super-block is bits 2j..2j+1 of qs byte c*32 + l and its scale is
        # sc[c*8 + 2j + l//16]; the shifts run on 8 bytes at a time.
        qs = np.ascontiguousarray(bn[..., 16:80].transpose(1, 0, 2)).view(np.uint64)
        sc = (np.ascontiguousarray(bn[..., 0:16].transpose(1, 0, 2)) & 0x0F).reshape(
            s, n, 2, 4, 2, 1
        )
        v = np.empty((s, n, 2, 4, 2, 16), dtype=np.uint8)
        for j in range(4):
            t = ((qs >> np.uint64(2 * j)) & np.uint64(0x0303030303030303)).view(np.uint8)
            np.multiply(t.reshape(s, n, 2, 2, 16), sc[:, :, :, j], out=v[:, :, :, j])
        v = torch.from_numpy(v.reshape(s, n, cls.SUPER)).view(torch.int8)
        return cls(qtype, shape, dtype, v, d, mins)

    def _forward(self, x):
        t, k = x.shape
        s = k // self.SUPER
        xs = x.to(torch.bfloat16).view(t, s, self.SUPER).transpose(0, 1).contiguous()
        y = F.linear(x.float().view(t, -1, 16).sum(-1), self.mins).neg_()
        for j in range(s):
            y += torch._weight_int8pack_mm(xs[j], self.v[j], self.d[j])
        return y.to(x.dtype)

    def _expand(self, n0, n1):
        r, k = n1 - n0, self.shape[1]
        w = _scratch_f32(r * k).view(r, k // self.SUPER, self.SUPER)
        w.copy_(self.v[:, n0:n1].permute(1, 0, 2))
        w.mul_(self.d[:, n0:n1].t().float()[..., None])
        w.view(r, k // 16, 16).sub_(self.mins[n0:n1, :, None])
        return w.view(r, k)


# T from which each path switches to the fp32 route on CPUs without native bf16 GEMM
# (measured single-thread crossovers, see kernel_bench). Per instance: `layer.prefill_min_tokens`.
DENSE_PREFILL_MIN_TOKENS = 3
INT4_PREFILL_MIN_TOKENS = 48
INT8_PREFILL_MIN_TOKENS = 16

# qtype -> compute path for bf16 / fp16 activations (measured choices, see kernel_bench)
KERNEL_FOR: dict[str, type[QLinear]] = {
    "F32": DenseLinear,
    "F16": DenseLinear,
    "BF16": DenseLinear,
    "Q8_0": DenseLinear,
    "Q6_K": DenseLinear,
    "Q4_0": Int4Linear,
    "Q4_1": Int4Linear,
    "Q4_K": Int4Linear,
    "Q2_K": Int8Linear,
    "MXFP4": DenseLinear,  # no torch kernel for e2m1: dequantized to bf16 at load
}
# float32 activations: accuracy mode, every type dequantized at load to fp32.
ACCURATE_FOR: dict[str, type[QLinear]] = dict.fromkeys(KERNEL_FOR, DenseLinear)


def from_raw(
    raw: torch.Tensor, qtype: str, shape, dtype: torch.dtype, *, copy: bool = True
) -> QLinear:
    """Same as `QLinear.from_raw`."""
    return QLinear.from_raw(raw, qtype, shape, dtype, copy=copy)


def reference_linear(
    x: torch.Tensor, raw: torch.Tensor | np.ndarray, qtype: str, shape
) -> torch.Tensor:
    """The reference: dequantize with gguf (`qtypes.dequantize`), then x @ W.T in float64.
    Returns float32 [T, out]."""
    a = raw.numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
    w = torch.from_numpy(qtypes.dequantize(a, qtype, tuple(shape)))
    return (x.double() @ w.double().T).float()

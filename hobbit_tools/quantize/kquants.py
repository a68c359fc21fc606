"""Vectorised numpy quantizers for ggml K-quants (Q4_K, Q2_K, Q6_K).

Written from the block formats in ggml (`ggml-common.h`), with the byte layout checked
against `gguf.quants.dequantize`, which is the reference for what the bytes mean:

* ``block_q4_K`` (144 bytes / 256 weights): fp16 ``d``, fp16 ``dmin``, 12 bytes holding 8
  six-bit sub-block scales and 8 six-bit mins, 128 bytes of 4-bit quants.
  ``w = d * sc[j] * q - dmin * m[j]`` for sub-block ``j`` of 32 weights, ``q`` in 0..15.
* ``block_q2_K`` (84 bytes / 256 weights): 16 bytes of (4-bit scale | 4-bit min << 4), 64
  bytes of 2-bit quants, fp16 ``d``, fp16 ``dmin``.
  ``w = d * sc[j] * q - dmin * m[j]`` for sub-block ``j`` of 16 weights, ``q`` in 0..3.
* ``block_q6_K`` (210 bytes / 256 weights): 128 bytes low 4 bits, 64 bytes high 2 bits,
  16 int8 sub-block scales, fp16 ``d``. ``w = d * sc[j] * (q - 32)``, sub-blocks of 16.

The search follows ggml's reference quantizers (``make_qkx2_quants`` for Q4_K / Q2_K,
``make_qx_quants`` for Q6_K): per sub-block, try a small grid of candidate inverse scales,
round, and solve the weighted least-squares problem for (scale, min) given the rounded
levels, keeping the candidate with the smallest weighted squared error. Then, beyond ggml,
once the sub-block scales are quantized to their 6/4/8-bit codes, the two fp32 super-block
factors (``d``, ``dmin``) are refit by weighted least squares and the levels re-rounded,
which is kept only where it lowers the error. Everything is vectorised over all blocks;
the only Python loops run over the (fixed, small) candidate grid and over chunks of rows
that bound the temporary memory. Output is deterministic: identical input gives identical
bytes (no threading, no randomness, fixed chunking).

``weights`` (optional, same shape as ``x``, >= 0) are per-element importances (e.g. from an
importance matrix); by default all weights are 1, i.e. the plain squared error is minimised
(see ``_default_weights``).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K_BYTES = 144
Q2_K_BYTES = 84
Q6_K_BYTES = 210

# Elements per chunk: big enough to amortise numpy call overhead, small enough that the
# candidate-search temporaries stay in cache.
_CHUNK = 1 << 17
_F16_MAX = 65504.0


def _check(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError(f"{name} needs at least a 1-D array")
    if x.shape[-1] % QK_K:
        raise ValueError(
            f"{name} needs rows a multiple of {QK_K} elements; this tensor has {x.shape[-1]}"
        )
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: the tensor holds NaN or infinite values")
    return x


def _chunks(n_blocks: int, per_block: int):
    step = max(1, _CHUNK // per_block)
    for s in range(0, n_blocks, step):
        yield s, min(n_blocks, s + step)


def _rowsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis (einsum: much faster than ndarray.sum for short rows, and
    numpy's own deterministic loop rather than BLAS)."""
    return np.einsum("...i->...", a)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product over the last axis."""
    return np.einsum("...i,...i->...", a, b)


def _f16(a: np.ndarray) -> np.ndarray:
    """Round to fp16 (clipped to the finite range) and return the value as float32."""
    return np.clip(a, -_F16_MAX, _F16_MAX).astype(np.float16)


def _default_weights(x: np.ndarray) -> np.ndarray:
    """Importances used when the caller gives none: uniform, i.e. minimise the plain squared
    reconstruction error. (ggml's heuristic weights, sqrt(mean(x^2)) + |x| for Q4_K, |x| for
    Q2_K and x^2 for Q6_K, gave 0.7%, 6% and 2.5% higher plain RMSE on Gaussian weights in
    this search; without activation statistics the plain error is what bounds the error of
    x @ W.T for isotropic x.)"""
    return np.ones_like(x)


def make_qkx2(
    x: np.ndarray,
    w: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised ``make_qkx2_quants`` (squared-error variant).

    x, w: [M, n] (M sub-blocks of n values, importances w >= 0). Finds (scale >= 0,
    mn <= 0) minimising sum w * (scale * L + mn - x)^2 with L = clip(round((x - mn) /
    scale), 0, nmax) over the candidate grid iscale = (nmax + rmin + rdelta * i) / range.
    Returns (scale [M], the_min [M]) with the_min = -mn >= 0 as stored by ggml.
    """
    x = x.astype(np.float32, copy=False)
    w = w.astype(np.float32, copy=False)
    xmin = np.minimum(x.min(axis=-1), 0.0)
    xmax = x.max(axis=-1)
    rng = xmax - xmin
    flat = rng <= 0
    rng = np.where(flat, 1.0, rng).astype(np.float32)
    sum_w = _rowsum(w)
    wx = w * x
    sum_x = _rowsum(wx)
    sum_x2 = _dot(wx, x).astype(np.float64)
    xs = x - xmin[:, None]
    nm = np.float32(nmax)

    def levels(iscale: np.ndarray) -> np.ndarray:
        L = xs * iscale[:, None]
        np.rint(L, out=L)
        np.clip(L, 0.0, nm, out=L)
        return L

    def err(scale, mn, sum_l, sum_l2, sum_xl):
        # sum w (s L + m - x)^2 expanded; evaluated in float64 to avoid cancellation.
        s = scale.astype(np.float64)
        m = mn.astype(np.float64)
        return (
            s * s * sum_l2
            + m * m * sum_w
            + sum_x2
            + 2 * s * m * sum_l
            - 2 * s * sum_xl
            - 2 * m * sum_x
        )

    def sums(L):
        wl = w * L
        return (
            _rowsum(wl).astype(np.float64),
            _dot(wl, L).astype(np.float64),
            _dot(wl, x).astype(np.float64),
        )

    # Starting point: plain min/max.
    iscale = nm / rng
    best_scale = (1.0 / iscale).astype(np.float32)
    best_min = xmin.astype(np.float32)
    best_err = err(best_scale, best_min, *sums(levels(iscale)))
    sum_w64 = sum_w.astype(np.float64)
    sum_x64 = sum_x.astype(np.float64)
    for i in range(nstep + 1):
        iscale = ((rmin + rdelta * i + nmax) / rng).astype(np.float32)
        sl, sl2, sxl = sums(levels(iscale))
        D = sum_w64 * sl2 - sl * sl
        ok = D > 0
        Ds = np.where(ok, D, 1.0)
        scale = (sum_w64 * sxl - sum_x64 * sl) / Ds
        mn = (sl2 * sum_x64 - sl * sxl) / Ds
        pos = mn > 0
        if pos.any():
            mn = np.where(pos, 0.0, mn)
            scale = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1.0), scale)
        scale = scale.astype(np.float32)
        mn = mn.astype(np.float32)
        e = err(scale, mn, sl, sl2, sxl)
        better = ok & (e < best_err)
        best_err = np.where(better, e, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, mn, best_min)
    best_scale = np.where(flat, 0.0, best_scale).astype(np.float32)
    best_min = np.where(flat, xmin, best_min).astype(np.float32)
    return best_scale, -best_min


def _refit_affine(x, w, a, b, d0, m0):
    """Least squares for (d, m) in x ~ d * a - m * b per super-block.

    x, w, a: [B, n]; b: [B, n] (the per-element min multiplier). Returns (d, m) float32, or
    the starting values where the 2x2 system is singular or gives a negative factor."""
    wa = w * a
    wb = w * b
    saa = _dot(wa, a).astype(np.float64)
    sbb = _dot(wb, b).astype(np.float64)
    sab = _dot(wa, b).astype(np.float64)
    sxa = _dot(wa, x).astype(np.float64)
    sxb = _dot(wb, x).astype(np.float64)
    det = saa * sbb - sab * sab
    ok = det > 1e-12 * np.maximum(saa * sbb, 1e-30)
    dets = np.where(ok, det, 1.0)
    # minimise sum w (d a - m b - x)^2: [saa -sab; -sab sbb] [d; m] = [sxa; -sxb]
    d = (sxa * sbb - sab * sxb) / dets
    m = (sxa * sab - saa * sxb) / dets
    ok &= (d > 0) & (m >= 0)
    # Blocks without a min term (b == 0 everywhere): scale-only fit.
    # (the sign of d is then free: Q6_K stores signed scales).
    only_d = (sbb == 0) & (saa > 0)
    d = np.where(only_d, sxa / np.where(saa > 0, saa, 1.0), d)
    m = np.where(only_d, 0.0, m)
    ok = np.where(only_d, d != 0, ok)
    return np.where(ok, d, d0).astype(np.float32), np.where(ok, m, m0).astype(np.float32)


def _werr(x, w, y):
    r = y - x
    return _dot(w * r, r).astype(np.float64)


# ----------------------------------------------------------------------------- Q4_K


def _affine_levels(x, d, dmin, ls, lm, qmax):
    """x [B, S, n]; d, dmin [B] (fp16-rounded float32); ls, lm [B, S] integer codes.
    Levels L in 0..qmax and the reconstruction d*ls*L - dmin*lm."""
    sc = (d[:, None] * ls)[..., None]
    mn = (dmin[:, None] * lm)[..., None]
    inv = np.divide(1.0, sc, out=np.zeros_like(sc), where=sc != 0)
    L = np.rint((x + mn) * inv)
    np.clip(L, 0, qmax, out=L)
    return L, sc * L - mn


def _affine_chunk(x, wts, subs, size, qmax, code_max, rmin, rdelta, nstep, pack) -> np.ndarray:
    """Q4_K and Q2_K: `subs` sub-blocks of `size` with a scale and a min each, coded in
    0..code_max against two fp16 super-block factors; levels 0..qmax."""
    B = x.shape[0]
    xb = x.reshape(B * subs, size)
    w = _default_weights(xb) if wts is None else wts.reshape(B * subs, size)
    scales, mins = make_qkx2(xb, w, qmax, rmin, rdelta, nstep)
    scales = scales.reshape(B, subs)
    mins = mins.reshape(B, subs)
    max_scale = scales.max(axis=-1)
    max_min = mins.max(axis=-1)
    inv_s = np.divide(code_max, max_scale, out=np.zeros_like(max_scale), where=max_scale > 0)
    inv_m = np.divide(code_max, max_min, out=np.zeros_like(max_min), where=max_min > 0)
    ls = np.minimum(code_max, np.rint(inv_s[:, None] * scales)).astype(np.float32)
    lm = np.minimum(code_max, np.rint(inv_m[:, None] * mins)).astype(np.float32)
    d16 = _f16(np.where(max_scale > 0, max_scale / code_max, 0.0))
    m16 = _f16(np.where(max_min > 0, max_min / code_max, 0.0))
    d = d16.astype(np.float32)
    dmin = m16.astype(np.float32)
    x3 = x.reshape(B, subs, size)
    w3 = w.reshape(B, subs, size)
    L, y = _affine_levels(x3, d, dmin, ls, lm, qmax)
    best = _werr(x3.reshape(B, -1), w3.reshape(B, -1), y.reshape(B, -1))
    # Refit d, dmin for the chosen codes, round to fp16, re-round the levels; keep if better.
    for _ in range(2):
        a = (ls[..., None] * L).reshape(B, -1)
        b = np.broadcast_to(lm[..., None], (B, subs, size)).reshape(B, -1)
        nd, nm = _refit_affine(x3.reshape(B, -1), w3.reshape(B, -1), a, b, d, dmin)
        nd16, nm16 = _f16(nd), _f16(nm)
        L2, y2 = _affine_levels(x3, nd16.astype(np.float32), nm16.astype(np.float32), ls, lm, qmax)
        e2 = _werr(x3.reshape(B, -1), w3.reshape(B, -1), y2.reshape(B, -1))
        better = e2 < best
        if not better.any():
            break
        best = np.where(better, e2, best)
        d16 = np.where(better, nd16, d16)
        m16 = np.where(better, nm16, m16)
        d = d16.astype(np.float32)
        dmin = m16.astype(np.float32)
        L = np.where(better[:, None, None], L2, L)
    return pack(d16, m16, ls.astype(np.uint8), lm.astype(np.uint8), L.astype(np.uint8))


def _q4k_chunk(x: np.ndarray, wts: np.ndarray | None) -> np.ndarray:
    return _affine_chunk(x, wts, 8, 32, 15, 63.0, -1.0, 0.1, 20, _pack_q4k)


def _pack_q4k(d16, m16, ls, lm, L) -> np.ndarray:
    B = L.shape[0]
    out = np.empty((B, Q4_K_BYTES), dtype=np.uint8)
    out[:, 0:2] = d16.reshape(B, 1).view(np.uint8)
    out[:, 2:4] = m16.reshape(B, 1).view(np.uint8)
    sc = out[:, 4:16]
    sc[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    sc[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    q = L.reshape(B, 4, 2, 32)
    out[:, 16:] = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(B, 128)
    return out


def quantize_q4_k(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """x float32 [..., cols] (cols % 256 == 0) -> raw Q4_K bytes uint8 [..., cols/256*144]."""
    return _run(x, weights, "Q4_K", Q4_K_BYTES, _q4k_chunk)


# ----------------------------------------------------------------------------- Q2_K


def _q2k_chunk(x: np.ndarray, wts: np.ndarray | None) -> np.ndarray:
    return _affine_chunk(x, wts, 16, 16, 3, 15.0, -0.5, 0.1, 15, _pack_q2k)


def _pack_q2k(d16, m16, ls, lm, L) -> np.ndarray:
    B = L.shape[0]
    out = np.empty((B, Q2_K_BYTES), dtype=np.uint8)
    out[:, 0:16] = ls | (lm << 4)
    q = L.reshape(B, 2, 4, 32)
    out[:, 16:80] = (
        q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    ).reshape(B, 64)
    out[:, 80:82] = d16.reshape(B, 1).view(np.uint8)
    out[:, 82:84] = m16.reshape(B, 1).view(np.uint8)
    return out


def quantize_q2_k(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """x float32 [..., cols] (cols % 256 == 0) -> raw Q2_K bytes uint8 [..., cols/256*84]."""
    return _run(x, weights, "Q2_K", Q2_K_BYTES, _q2k_chunk)


# ----------------------------------------------------------------------------- Q6_K


def make_qx(x: np.ndarray, w: np.ndarray, nmax: int) -> np.ndarray:
    """Vectorised ``make_qx_quants``: symmetric scale per row of x [M, n] with levels in
    [-nmax, nmax - 1], chosen among 19 candidates by weighted least squares. Returns the
    (signed) scale [M]; 0 for all-zero rows."""
    x = x.astype(np.float32, copy=False)
    idx = np.abs(x).argmax(axis=-1)
    mx = np.take_along_axis(x, idx[:, None], axis=-1)[:, 0]
    zero = mx == 0
    mxs = np.where(zero, 1.0, mx).astype(np.float32)
    wx = w * x
    best_scale = np.zeros(x.shape[0], dtype=np.float32)
    best = np.full(x.shape[0], -1.0)
    for i in range(-9, 10):
        iscale = (-(nmax + 0.1 * i) / mxs).astype(np.float32)
        L = x * iscale[:, None]
        np.rint(L, out=L)
        np.clip(L, -nmax, nmax - 1, out=L)
        sumlx = _rowsum(wx * L).astype(np.float64)
        suml2 = _rowsum(w * L * L).astype(np.float64)
        ok = suml2 > 0
        s2 = np.where(ok, suml2, 1.0)
        # error reduction of the LS fit is sumlx^2 / suml2: maximise it.
        gain = np.where(ok, sumlx * sumlx / s2, -1.0)
        better = gain > best
        best = np.where(better, gain, best)
        best_scale = np.where(better, (sumlx / s2).astype(np.float32), best_scale)
    return np.where(zero, 0.0, best_scale).astype(np.float32)


def _q6k_levels(x, d, ls):
    sc = (d[:, None] * ls)[..., None]
    inv = np.divide(1.0, sc, out=np.zeros_like(sc), where=sc != 0)
    L = np.rint(x * inv)
    np.clip(L, -32, 31, out=L)
    return L, sc * L


def _q6k_chunk(x: np.ndarray, wts: np.ndarray | None) -> np.ndarray:
    B = x.shape[0]
    xb = x.reshape(B * 16, 16)
    w = _default_weights(xb) if wts is None else wts.reshape(B * 16, 16)
    scales = make_qx(xb, w, 32).reshape(B, 16)
    idx = np.abs(scales).argmax(axis=-1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=-1)[:, 0]
    zero = max_scale == 0
    iscale = np.where(zero, 0.0, -128.0 / np.where(zero, 1.0, max_scale)).astype(np.float32)
    d16 = _f16(np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, iscale)))
    ls = np.clip(np.rint(iscale[:, None] * scales), -128, 127).astype(np.float32)
    d = d16.astype(np.float32)
    x3 = x.reshape(B, 16, 16)
    w3 = w.reshape(B, 16, 16)
    L, y = _q6k_levels(x3, d, ls)
    best = _werr(x3.reshape(B, -1), w3.reshape(B, -1), y.reshape(B, -1))
    for _ in range(2):
        a = (ls[..., None] * L).reshape(B, -1)
        nd, _ = _refit_affine(x3.reshape(B, -1), w3.reshape(B, -1), a, np.zeros_like(a), d, d)
        nd16 = _f16(nd)
        L2, y2 = _q6k_levels(x3, nd16.astype(np.float32), ls)
        e2 = _werr(x3.reshape(B, -1), w3.reshape(B, -1), y2.reshape(B, -1))
        better = e2 < best
        if not better.any():
            break
        best = np.where(better, e2, best)
        d16 = np.where(better, nd16, d16)
        d = d16.astype(np.float32)
        L = np.where(better[:, None, None], L2, L)
    return _pack_q6k(d16, ls.astype(np.int8), (L + 32).astype(np.uint8))


def _pack_q6k(d16, ls, L) -> np.ndarray:
    B = L.shape[0]
    out = np.empty((B, Q6_K_BYTES), dtype=np.uint8)
    q = L.reshape(B, 2, 4, 32)  # [chunk of 128, quarter, 32]
    lo = q & 0x0F
    hi = q >> 4
    ql = out[:, 0:128].reshape(B, 2, 2, 32)
    ql[:, :, 0] = lo[:, :, 0] | (lo[:, :, 2] << 4)
    ql[:, :, 1] = lo[:, :, 1] | (lo[:, :, 3] << 4)
    out[:, 128:192] = (
        hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    ).reshape(B, 64)
    out[:, 192:208] = ls.view(np.uint8)
    out[:, 208:210] = d16.reshape(B, 1).view(np.uint8)
    return out


def quantize_q6_k(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """x float32 [..., cols] (cols % 256 == 0) -> raw Q6_K bytes uint8 [..., cols/256*210]."""
    return _run(x, weights, "Q6_K", Q6_K_BYTES, _q6k_chunk)


# ----------------------------------------------------------------------------- driver


def _run(x, weights, name, type_size, chunk_fn) -> np.ndarray:
    x = _check(x, name)
    shape = x.shape
    blocks = x.reshape(-1, QK_K)
    wb = None
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float32)
        if weights.shape != shape:
            raise ValueError(f"{name}: weights shape {weights.shape} != tensor shape {shape}")
        if (weights < 0).any() or not np.isfinite(weights).all():
            raise ValueError(f"{name}: weights must be finite and >= 0")
        wb = weights.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    for s, e in _chunks(blocks.shape[0], QK_K):
        out[s:e] = chunk_fn(blocks[s:e], None if wb is None else wb[s:e])
    return out.reshape(*shape[:-1], shape[-1] // QK_K * type_size)

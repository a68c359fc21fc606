"""Every compute path against `reference_linear` (gguf dequantize, then a float64 matmul).

Tolerance: relative Frobenius error ||y - ref|| / ||ref|| over the [T, out] output.
* bf16 activations: 8e-3. Measured worst 4.6e-3 (Q4_1, whose zero m + 8d is rounded to
  bf16), ~2e-3 for dense bf16: the output's own bf16 rounding is 2^-9 = 1.95e-3 per
  element, plus bf16-held int4 scales/zeros or bf16 weights.
* Q2_K on the int8 path: 2e-2 (measured worst 6.6e-3..9e-3): each 256-wide partial sum leaves the
  int8 kernel rounded to bf16 and the 16-wide mins are subtracted after, so the rounding is
  relative to terms larger than the result. (Q2_K itself has a 27% weight error.)
* float32 activations (every type dequantized to fp32 at load): 1e-5 (measured 2.5e-7).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hobbit_tools.quantize import qtypes
from hobbit_tools.runtime import kernels as K

TOL_BF16 = 8e-3
TOL_Q2K_INT8 = 2e-2
TOL_F32 = 1e-5

# (class, type) pairs: every default path of KERNEL_FOR plus the measured alternatives
PATHS = [
    (K.Int4Linear, "Q4_0"),
    (K.Int4Linear, "Q4_1"),
    (K.Int4Linear, "Q4_K"),
    (K.Int4Linear, "Q8_0"),  # nibble split over K doubled (not the default)
    (K.Int8Linear, "Q2_K"),
    (K.DenseLinear, "F32"),
    (K.DenseLinear, "F16"),
    (K.DenseLinear, "BF16"),
    (K.DenseLinear, "Q8_0"),
    (K.DenseLinear, "Q6_K"),
    (K.DenseLinear, "Q2_K"),
    (K.DenseLinear, "Q4_K"),
]
# odd numbers of rows (not multiples of 8 or 32), the type's block multiples of columns
SHAPES = [(40, 256), (72, 512), (33, 768), (97, 256)]
TOKENS = (1, 3, 17)


def make_raw(t, out, cols, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out, cols)) * 0.02).astype(np.float32)
    w[:, :8] += 0.05  # some column structure, so mins/zeros matter
    return torch.from_numpy(qtypes.quantize(w, t))


def rel(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def tol_for(cls, t, dtype):
    if dtype == torch.float32:
        return TOL_F32
    return TOL_Q2K_INT8 if cls is K.Int8Linear else TOL_BF16


@pytest.mark.parametrize("cls, t", PATHS, ids=[f"{c.__name__}-{t}" for c, t in PATHS])
def test_path_matches_reference(cls, t):
    g = torch.Generator().manual_seed(1)
    for i, (out, cols) in enumerate(SHAPES):
        raw = make_raw(t, out, cols, seed=i)
        lin = cls.from_raw(raw, t, (out, cols), torch.bfloat16)
        assert lin.shape == (out, cols) and lin.qtype == t and lin.nbytes > 0
        for T in TOKENS:
            x = torch.randn(T, cols, generator=g).to(torch.bfloat16)
            ref = K.reference_linear(x, raw, t, (out, cols))
            # both routes: the decode kernel and the fp32 prefill route (which unpacks our own
            # int4 layout, so it exists only where torch's converter agrees with it)
            routes = (0,) if cls is K.Int4Linear and not K.int4_layout_ok() else (0, 1)
            for route in routes:
                lin.prefill_min_tokens = route
                y = lin(x)
                assert y.shape == (T, out) and y.dtype == torch.bfloat16 and y.is_contiguous()
                err = rel(y, ref)
                assert err < tol_for(cls, t, torch.bfloat16), (out, cols, T, route, err)


@pytest.mark.parametrize("t", list(qtypes.QTYPES))
def test_default_dispatch(t):
    out, cols = 40, 512
    raw = make_raw(t, out, cols)
    x = torch.randn(3, cols)
    ref = K.reference_linear(x, raw, t, (out, cols))
    # bf16: the measured fast path of the type
    lin = K.QLinear.from_raw(raw, t, (out, cols), torch.bfloat16)
    assert type(lin) is K.KERNEL_FOR[t]
    assert rel(lin(x.bfloat16()), ref) < tol_for(type(lin), t, torch.bfloat16)
    # fp32: accuracy mode, dequantized at load
    lin32 = K.from_raw(raw, t, (out, cols), torch.float32)
    assert type(lin32) is K.DenseLinear and lin32.w.dtype == torch.float32
    y32 = lin32(x)
    assert y32.dtype == torch.float32 and rel(y32, ref) < TOL_F32
    # fp16 activations work too (int kernels run in bf16 inside)
    lin16 = K.QLinear.from_raw(raw, t, (out, cols), torch.float16)
    y16 = lin16(x.half())
    assert y16.dtype == torch.float16 and rel(y16, ref) < 2 * TOL_Q2K_INT8


@pytest.mark.parametrize("cls, t", PATHS, ids=[f"{c.__name__}-{t}" for c, t in PATHS])
def test_deterministic_and_owns_its_memory(cls, t):
    out, cols = 72, 512
    raw = make_raw(t, out, cols)
    keep = raw.clone()
    lin = cls.from_raw(raw, t, (out, cols), torch.bfloat16)
    x = torch.randn(5, cols).bfloat16()
    y1 = lin(x)
    raw.fill_(0)  # the caller reuses its read buffer: the layer must not notice
    assert torch.equal(lin(x), y1)
    assert torch.equal(cls.from_raw(keep, t, (out, cols), torch.bfloat16)(x), y1)
    # the prefill route is deterministic too
    lin.prefill_min_tokens = 1
    assert torch.equal(lin(x), lin(x))


def test_dense_weight_is_what_the_path_computes():
    for cls, t in PATHS:
        if cls is K.Int4Linear and not K.int4_layout_ok():
            continue  # its expansion reads our own layout only (see the prefill route)
        raw = make_raw(t, 40, 512)
        lin = cls.from_raw(raw, t, (40, 512), torch.bfloat16)
        w = torch.from_numpy(qtypes.dequantize(raw.numpy(), t, (40, 512)))
        err = rel(lin.dense_weight(), w)
        assert err < (4e-3 if t == "Q2_K" else 2e-3), (cls.__name__, t, err)


@pytest.mark.parametrize("t", list(qtypes.QTYPES))
def test_dequantize_torch_matches_gguf(t):
    raw = make_raw(t, 37, 512)
    want = qtypes.dequantize(raw.numpy(), t, (37, 512))
    got = K.dequantize_torch(raw, t, (37, 512))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-9)
    bf = K.dequantize_torch(raw, t, (37, 512), torch.bfloat16)
    assert torch.equal(bf, torch.from_numpy(want).to(torch.bfloat16))


def test_int4_packing_matches_torch():
    if not K.int4_layout_ok():
        pytest.skip("torch packs int4 in another layout on this CPU (its converter is used)")
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (96, 256), generator=g, dtype=torch.uint8)
    want = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    assert torch.equal(K._pack_int4_codes(q).reshape(-1), want.reshape(-1))
    # straight from GGUF Q4_0 blocks (padded rows come out as zero bytes)
    raw = make_raw("Q4_0", 70, 256)
    blocks = raw.reshape(70, 8, 18)
    codes = torch.cat([blocks[..., 2:] & 0x0F, blocks[..., 2:] >> 4], dim=-1).reshape(70, 256)
    codes = torch.cat([codes, torch.zeros(26, 256, dtype=torch.uint8)])
    got = K._pack_int4_gguf(blocks.numpy(), 96, 2, 1, 16)
    assert torch.equal(got, K._pack_int4_codes(codes))


def test_expert_ffn_matches_reference():
    """gate/up/down with SiLU, as the runtime composes them, for each low/high type."""
    hidden, ffn, T = 256, 512, 9
    x = torch.randn(T, hidden).bfloat16()
    for t in ("BF16", "Q8_0", "Q4_K", "Q4_0", "Q2_K"):
        raws = [make_raw(t, ffn, hidden, 1), make_raw(t, ffn, hidden, 2), make_raw(t, hidden, ffn)]
        shapes = [(ffn, hidden), (ffn, hidden), (hidden, ffn)]
        g, u, d = (
            K.QLinear.from_raw(r, t, s, torch.bfloat16) for r, s in zip(raws, shapes, strict=True)
        )
        y = d(F.silu(g(x)) * u(x))
        gr, ur = (K.reference_linear(x, r, t, s) for r, s in zip(raws[:2], shapes[:2], strict=True))
        ref = K.reference_linear(F.silu(gr) * ur, raws[2], t, shapes[2])
        assert rel(y, ref) < 3 * tol_for(type(d), t, torch.bfloat16), t


def test_errors_and_edge_cases():
    raw = make_raw("Q4_K", 40, 256)
    with pytest.raises(ValueError, match="needs 5760 bytes"):
        K.QLinear.from_raw(raw[:20], "Q4_K", (40, 256), torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 256"):
        K.QLinear.from_raw(raw, "Q4_K", (40, 250), torch.bfloat16)
    with pytest.raises(ValueError, match="unsupported compute dtype"):
        K.QLinear.from_raw(raw, "Q4_K", (40, 256), torch.int8)
    with pytest.raises(ValueError, match="no int8 path"):
        K.Int8Linear.from_raw(raw, "Q4_K", (40, 256), torch.bfloat16)
    lin = K.QLinear.from_raw(raw, "Q4_K", (40, 256), torch.bfloat16)
    with pytest.raises(ValueError, match=r"expected x \[T, 256\]"):
        lin(torch.randn(2, 128).bfloat16())
    assert lin(torch.zeros(0, 256).bfloat16()).shape == (0, 40)
    # numpy bytes are accepted as well
    lin2 = K.QLinear.from_raw(raw.numpy(), "Q4_K", (40, 256), torch.bfloat16)
    x = torch.randn(2, 256).bfloat16()
    assert torch.equal(lin(x), lin2(x))
    assert "Int4Linear(Q4_K" in repr(lin)


def test_copy_false_aliases_dense_raw():
    raw = make_raw("BF16", 40, 256)
    x = torch.randn(2, 256).bfloat16()
    lin = K.QLinear.from_raw(raw, "BF16", (40, 256), torch.bfloat16, copy=False)
    assert lin.w.data_ptr() == raw.data_ptr()  # zero-copy: a view of the caller's bytes
    assert rel(lin(x), K.reference_linear(x, raw, "BF16", (40, 256))) < TOL_BF16
    # quantized types convert anyway and never alias
    q = make_raw("Q4_K", 40, 256)
    lq = K.from_raw(q, "Q4_K", (40, 256), torch.bfloat16, copy=False)
    y = lq(x)
    q.fill_(0)
    assert torch.equal(lq(x), y)

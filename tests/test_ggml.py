"""ggml's kernels on GGUF bytes (`runtime/ggml.py`) against the reference: gguf's dequantizer,
then a float64 matmul.

Tolerance: relative Frobenius error over the output. ggml quantizes the activations to the
type's dot-product partner (Q8_0 for Q8_0/Q4_0/Q4_1, Q8_K for the K-quants) before the
integer dot products, as llama.cpp does: ~0.4% relative error per element for 8-bit
activations (measured worst 6e-3 here). F16 weights take fp16 activations (2^-11 rounding:
measured 1.5e-4); F32 ones are exact to fp32 rounding.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hobbit_tools.quantize import qtypes
from hobbit_tools.runtime import ggml
from hobbit_tools.runtime.experts import GGUFExpert
from hobbit_tools.runtime.kernels import dequantize_torch, reference_linear

pytestmark = pytest.mark.skipif(not ggml.available(), reason=str(ggml.why_not()))

TOL_Q = 1.5e-2
TOL_F32, TOL_F16 = 1e-5, 1e-3
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q2_K", "F32", "F16"]
SHAPES = [(40, 256), (33, 768), (97, 512)]  # odd row counts, block multiples of columns


def _raw(qtype, out, cols, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out, cols)) * 0.02).astype(np.float32)
    w[:, :8] += 0.05  # some column structure, so mins and zeros matter
    return np.ascontiguousarray(qtypes.quantize(w, qtype).reshape(-1).view(np.uint8))


def rel(y, ref) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def tol(qtype) -> float:
    return {"F32": TOL_F32, "F16": TOL_F16}.get(qtype, TOL_Q)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 5])
def test_linear_matches_reference(qtype, shape, tokens):
    n, k = shape
    raw = _raw(qtype, n, k)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(1))
    y = ggml.linear(x, (raw.ctypes.data, qtype, shape))
    assert y.shape == (tokens, n) and y.dtype == torch.float32
    assert rel(y, reference_linear(x, raw, qtype, shape)) < tol(qtype)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q2_K"])
@pytest.mark.parametrize("tokens", [1, 4])
def test_expert_ffn_matches_reference(qtype, tokens):
    d, f = 256, 256
    raws = [_raw(qtype, f, d, 0), _raw(qtype, f, d, 1), _raw(qtype, d, f, 2)]
    mats = tuple(
        (r.ctypes.data, qtype, s) for r, s in zip(raws, [(f, d), (f, d), (d, f)], strict=True)
    )
    slot = np.zeros(8, np.uint8)
    expert = GGUFExpert(mats, sum(r.size for r in raws), slot, {})
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(2))
    g, u, dn = (
        dequantize_torch(torch.from_numpy(r), qtype, m[2]) for r, m in zip(raws, mats, strict=True)
    )
    ref = F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), dn)
    assert rel(expert(x), ref) < 2 * TOL_Q


def test_cached_one_token_graph_is_bit_identical_to_a_fresh_one():
    d, f = 256, 512
    raws = [_raw("Q4_K", f, d, 0), _raw("Q4_K", f, d, 1), _raw("Q4_K", d, f, 2)]
    mats = tuple(
        (r.ctypes.data, "Q4_K", s) for r, s in zip(raws, [(f, d), (f, d), (d, f)], strict=True)
    )
    graph = ggml.ExpertFFN(*mats)
    for seed in range(3):
        x = torch.randn(1, d, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(graph(x), ggml.ffn(x, *mats))
    # re-pointed at another expert's bytes: computes that expert
    other = [_raw("Q4_K", f, d, 5), _raw("Q4_K", f, d, 6), _raw("Q4_K", d, f, 7)]
    mats2 = tuple((r.ctypes.data, "Q4_K", m[2]) for r, m in zip(other, mats, strict=True))
    graph.bind(*(m[0] for m in mats2))
    assert torch.equal(graph(x), ggml.ffn(x, *mats2))
    assert not torch.equal(graph(x), ggml.ffn(x, *mats))


def test_thread_count_does_not_change_results():
    n, k = 160, 512
    raw = _raw("Q8_0", n, k)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(3))
    before = ggml.threads()
    try:
        ggml.set_threads(1)
        one = ggml.linear(x, (raw.ctypes.data, "Q8_0", (n, k)))
        ggml.set_threads(2)
        two = ggml.linear(x, (raw.ctypes.data, "Q8_0", (n, k)))
    finally:
        ggml.set_threads(before)
    assert torch.equal(one, two)


def test_q8_0_dense_shard_runs_on_its_bytes(tmp_path, tokenizer_dir):
    """--dense Q8_0 (as llama.cpp's converter writes a Q8_0 model): matrices stay GGUF bytes,
    the logits stay near the F32-dense model's (weights and activations at 8 bits: measured
    2-20% relative per position on this random tiny model, whose logits are noise-sized),
    and offloading stays bit-identical."""
    from tiny_models import make_checkpoint, quantizable

    import hobbit_tools

    make_checkpoint("mixtral", tmp_path / "hf", tokenizer_dir, **quantizable(num_hidden_layers=2))
    for dense in ("F32", "Q8_0"):
        hobbit_tools.prepare(tmp_path / "hf", tmp_path / dense, dense=dense, high="Q8_0")
    f32, q8 = hobbit_tools.load(tmp_path / "F32"), hobbit_tools.load(tmp_path / "Q8_0")
    assert q8.info["dense_bytes"] < f32.info["dense_bytes"] / 3
    ids = f32.encode("Now is the winter of our discontent")
    assert rel(q8.logits(ids), f32.logits(ids)) < 0.35
    off = hobbit_tools.load(tmp_path / "Q8_0", memory="50%")
    assert torch.equal(off.logits(ids), q8.logits(ids))


def test_ggml_plain_computes_the_experts_as_read(tmp_path, tokenizer_dir):
    """kernels="ggml-plain": the Q4_K experts are not rewritten in ggml's interleaved
    layout after their read (cheaper per miss), their loads go as plain batched reads, the
    run says so, and the logits stay near those of the repacked copies (the interleaved
    kernels round the activations in other groups: within the quantized tolerance)."""
    from tiny_models import make_checkpoint, quantizable

    import hobbit_tools

    if not ggml.repack_traits("Q4_K", (256, 256)):
        pytest.skip("this ggml build has no interleaved layout for Q4_K on this CPU")
    make_checkpoint("mixtral", tmp_path / "hf", tokenizer_dir, **quantizable(num_hidden_layers=2))
    hobbit_tools.prepare(tmp_path / "hf", tmp_path / "m", dense="F32", high="Q4_K")
    packed = hobbit_tools.load(tmp_path / "m", memory="50%", policy="lru")
    plain = hobbit_tools.load(tmp_path / "m", memory="50%", policy="lru", kernels="ggml-plain")
    assert packed.info["kernels"] == {"high": "ggml"}
    assert plain.info["kernels"] == {"high": "ggml-plain"}
    store = plain.model.experts.store
    assert not store.p["high"].repack and store.p["high"].batched == store.p["high"].file.direct
    assert packed.model.experts.store.p["high"].repack
    ids = plain.encode("Now is the winter of our discontent")
    assert rel(plain.logits(ids), packed.logits(ids)) < TOL_Q
    entry = next(iter(plain.model.experts.cache.entries.values()))
    assert all(not w.traits for w in entry.expert.mats)
    resident = hobbit_tools.load(tmp_path / "m", kernels="ggml-plain")
    assert resident.info["kernels"] == {"high": "ggml-plain"}


def _repacked(qtype, shape, seed=0):
    """A matrix's GGUF bytes and a copy repacked into ggml's interleaved layout."""
    raw = _raw(qtype, *shape, seed)
    if not ggml.repack_traits(qtype, shape):
        pytest.skip(f"this ggml build has no interleaved layout for {qtype} {shape} on this CPU")
    copy = raw.copy()
    w = ggml.repack(ggml.Weight(copy.ctypes.data, qtype, shape))
    return raw, copy, w


@pytest.mark.parametrize("qtype", ["Q4_K", "Q4_0"])
@pytest.mark.parametrize("tokens", [1, 5])  # ggml's interleaved gemv, and its 4-row gemm
def test_repacked_weight_matches_reference(qtype, tokens):
    shape = (64, 512)
    raw, copy, w = _repacked(qtype, shape)
    assert w.traits and copy.size == raw.size and not np.array_equal(copy, raw)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(4))
    ref = reference_linear(x, raw, qtype, shape)
    assert rel(ggml.linear(x, w), ref) < tol(qtype)
    # the bytes alone are no longer GGUF's: read as plain Q4_K they compute something else
    assert not rel(ggml.linear(x, ggml.Weight(copy.ctypes.data, qtype, shape)), ref) < 0.1


def test_repacked_expert_one_token_graph_equals_its_many_token_graph():
    d, f = 256, 512
    parts = [_repacked("Q4_K", s, seed) for seed, s in enumerate([(f, d), (f, d), (d, f)])]
    mats = tuple(w for _, _, w in parts)
    graph = ggml.ExpertFFN(*mats)
    plain = tuple(ggml.Weight(r.ctypes.data, "Q4_K", w.shape) for r, _, w in parts)
    for seed in range(2):
        x = torch.randn(1, d, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(graph(x), ggml.ffn(x, *mats))
        assert rel(graph(x), ggml.ffn(x, *plain)) < 2 * TOL_Q


def test_no_repack_where_ggml_has_no_layout():
    raw = _raw("Q4_K", 33, 768)  # 33 rows: the interleaved layouts take rows in 4s or 8s
    w = ggml.Weight(raw.ctypes.data, "Q4_K", (33, 768))
    before = raw.copy()
    assert ggml.repack(w) == w and np.array_equal(raw, before)


def test_build_hint_names_what_the_build_leaves_unused():
    have = ggml.cpu_features()
    hint = ggml.build_hint({"avx2", "avx512f"})
    if have.get("avx512") and have.get("llamafile"):
        assert hint is None
    else:
        assert hint and ggml.BUILD_FOR_THIS_CPU in hint
        assert ("AVX512" in hint) == (not have.get("avx512"))
        assert ("llamafile" in hint) == (not have.get("llamafile"))
    if have.get("llamafile"):
        assert ggml.build_hint({"avx2"}) is None  # an AVX2 CPU has nothing more to gain


def test_a_group_of_experts_in_one_call_equals_each_alone_bit_for_bit():
    """A layer's experts for one token in one ggml graph (`Combiner.add_group`): the same
    sums as one call per expert, across precisions and layouts (Q8_0, repacked Q4_K)."""
    from hobbit_tools.runtime.experts import Combiner, groupable

    d, f = 256, 512
    experts, keep = [], []
    for seed, qtype in enumerate(["Q4_K", "Q8_0", "Q4_K", "Q8_0", "Q4_K"]):
        raws = [_raw(qtype, *s, 10 * seed + i) for i, s in enumerate([(f, d), (f, d), (d, f)])]
        mats = tuple(
            ggml.repack(ggml.Weight(r.ctypes.data, qtype, s))
            for r, s in zip(raws, [(f, d), (f, d), (d, f)], strict=True)
        )
        keep.append(raws)
        experts.append(GGUFExpert(mats, 0, np.zeros(8, np.uint8), {}))
    assert groupable(experts) and not groupable(experts[:1])
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(9))
    w = torch.rand(1, 6, generator=torch.Generator().manual_seed(10))
    slots = [4, 0, 2, 5, 1]
    one, grouped = Combiner(x, w), Combiner(x, w)
    for e, k in zip(experts, slots, strict=True):
        one.add(e, x, [0], [k])
    grouped.add_group(experts, x, slots)
    assert torch.equal(one.result(), grouped.result())
    grouped.add_group(experts[2:], x, slots[2:])  # a smaller group: another graph, same sums
    assert torch.equal(one.result(), grouped.result())

"""The many-token route (runtime/prefill.py): Q8_0 GGUF bytes expanded to bf16 and multiplied
by torch, against gguf's dequantizer and a float64 matmul; the policy that takes it; the
model and the offloading cache through it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants
from tiny_models import prepared_pair, quantizable

import hobbit_tools
from hobbit_tools.runtime import experts, ggml, prefill

pytestmark = pytest.mark.skipif(not ggml.available(), reason=f"ggml: {ggml.why_not()}")


@pytest.fixture(autouse=True)
def _route_restored():
    saved = dict(prefill.ROUTE)
    yield
    prefill.ROUTE.clear()
    prefill.ROUTE.update(saved)


def _q8(shape, seed):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
    raw = np.ascontiguousarray(quants.quantize(w, GGMLQuantizationType.Q8_0))
    ref = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q8_0)).double()
    return raw, (raw.ctypes.data, "Q8_0", shape), ref


def _rel(got, want):
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("tokens", [1, 5, 16, 33])
def test_linear_and_ffn_match_the_dequantized_float64_product(tokens):
    d, f = 96, 160  # rows that do not fill a chunk evenly, token counts off the padding
    (rg, g, wg), (ru, u, wu), (rd, dn, wd) = _q8((f, d), 0), _q8((f, d), 1), _q8((d, f), 2)
    x = torch.randn(tokens, d)
    y = prefill.linear(x, g)
    assert y.shape == (tokens, f) and y.dtype == torch.float32
    assert _rel(y, x.double() @ wg.T) < 1e-2
    want = F.linear(F.silu(F.linear(x.double(), wg)) * F.linear(x.double(), wu), wd)
    got = prefill.ffn(x, g, u, dn)
    assert _rel(got, want) < 1.5e-2
    # no worse than ggml's own kernel, which rounds the activations to 8 bits
    assert _rel(got, want) < 1.5 * _rel(ggml.ffn(x, g, u, dn), want) + 1e-3
    del rg, ru, rd


def test_chunks_divide_the_rows_so_a_matrix_has_one_kernel_shape():
    for n, k in [(3584, 1024), (1024, 3584), (768, 2048), (2048, 768), (32000, 1024)]:
        step = prefill._rows_per_chunk(n, k)
        assert n % step == 0 and step * k <= prefill._CHUNK and step % 16 == 0
    assert prefill._rows_per_chunk(5, 1 << 20) == 1  # a row wider than a chunk: one at a time


def test_a_failing_share_reaches_the_caller_and_the_crew_goes_on():
    crew = prefill._Crew(2)

    def boom(scratch):
        raise ValueError("share failed")

    with pytest.raises(ValueError, match="share failed"):
        crew.run([lambda s: None, boom])
    done = []
    crew.run([lambda s: done.append(0), lambda s: done.append(1)])
    assert sorted(done) == [0, 1]


def test_the_route_is_taken_from_its_token_count_on(monkeypatch):
    prefill.set_route({"Q8_0": 4})
    assert not prefill.takes("Q8_0", 3) and prefill.takes("Q8_0", 4)
    assert not prefill.takes("Q4_K", 64) and not prefill.takes(None, 64)
    prefill.set_route({"Q8_0": 0})  # measured: never
    assert not prefill.takes("Q8_0", 1000)
    # the default: only where the CPU has a fast bf16 GEMM and ggml no llamafile GEMM
    from hobbit_tools.runtime import kernels

    monkeypatch.setattr(kernels, "native_bf16_gemm", lambda: False)
    prefill.set_route(None)
    assert prefill.ROUTE == {}
    monkeypatch.setattr(kernels, "native_bf16_gemm", lambda: True)
    monkeypatch.setattr(ggml, "cpu_features", lambda: {"llamafile": True})
    assert prefill.default_route() == {}
    monkeypatch.setattr(ggml, "cpu_features", lambda: {"llamafile": False})
    assert prefill.default_route() == {"Q8_0": prefill.DEFAULT_FROM}


def test_measure_times_both_paths_and_says_from_where_the_route_wins():
    t = prefill.measure((64, 64), tokens=(2, 4))
    assert t["tokens"] == [2, 4] and len(t["ggml_ms"]) == len(t["bf16_ms"]) == 2
    assert all(v > 0 for v in t["ggml_ms"] + t["bf16_ms"])
    assert t["from"] in (0, 2, 4)
    if t["from"]:
        assert t["bf16_ms"][-1] < t["ggml_ms"][-1]


def test_prefill_through_the_route_offloaded_is_bit_identical_to_resident(
    tmp_path, tokenizer_dir, monkeypatch
):
    """Both compute their experts from GGUF bytes through the same route, so an offloading
    cache's prefill logits equal resident's bit for bit; the route really runs, and its
    logits are as close to the float32 weights' as ggml's."""
    model_dir = prepared_pair(tmp_path, tokenizer_dir, **quantizable())
    ids = torch.randint(1, 384, (24,), generator=torch.Generator().manual_seed(0))
    resident = hobbit_tools.load(model_dir, policy="resident", precision="high").model
    offloaded = hobbit_tools.load(model_dir, policy="lru", memory="40%").model
    prefill.set_route({"Q8_0": 2})  # after loading: `load` sets the process's route
    calls = []
    real = prefill.ffn
    monkeypatch.setattr(prefill, "ffn", lambda *a: calls.append(1) or real(*a))
    got = {}
    for name, model in (("resident", resident), ("lru", offloaded)):
        model.reset()
        got[name] = model.forward(ids, all_logits=True)
    assert calls, "the route was not taken"
    assert torch.equal(got["resident"], got["lru"])
    exact = hobbit_tools.load(model_dir, policy="resident", precision="high", kernels="torch")
    exact.model.reset()
    want = exact.model.forward(ids, all_logits=True).double()  # float32 dequantized weights
    prefill.set_route({})
    resident.reset()
    on_ggml = resident.forward(ids, all_logits=True)
    assert _rel(got["resident"], want) < 1.5 * _rel(on_ggml, want) + 1e-3


def test_gguf_expert_takes_the_route_only_for_one_type_and_many_tokens(monkeypatch):
    f, d = 64, 64
    mats = [_q8((f, d), 0), _q8((f, d), 1), _q8((d, f), 2)]
    slot = np.zeros(1, np.uint8)
    e = experts.GGUFExpert(tuple(m[1] for m in mats), 0, slot, {})
    assert e.qtype == "Q8_0"
    prefill.set_route({"Q8_0": 3})
    used = []
    monkeypatch.setattr(prefill, "ffn", lambda x, *m: used.append(x.shape[0]) or x)
    e(torch.randn(2, d))
    e(torch.randn(3, d))
    assert used == [3]
    mixed = experts.GGUFExpert((mats[0][1], mats[1][1], (0, "Q4_K", (d, f))), 0, slot, {})
    assert mixed.qtype is None

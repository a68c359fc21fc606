"""Decode layer graphs: one token's dense work a layer (and, resident, the previous layer's
experts) as one ggml graph computes what the torch path computes, across KV cache growth,
for every family it takes; other models say why they keep the torch path; offloading
stays bit-identical to resident."""

import pytest
import torch
from tiny_models import make_checkpoint, prepared_pair

import hobbit_tools
from hobbit_tools.runtime import layer_graph
from hobbit_tools.runtime.layer_graph import Carry
from hobbit_tools.runtime.model import KVCache, Transformer

TAKES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]  # GQA, q/k norms, biases, shared


def _decode(model, prompt, tokens, graphs: bool) -> torch.Tensor:
    """Logits of a prefill then one decode step per token [1 + len(tokens), V]."""
    saved = model.layer_graphs
    model.layer_graphs = saved if graphs else None
    try:
        model.reset()
        out = [model.forward(torch.tensor(prompt))]
        out += [model.forward(torch.tensor([t])) for t in tokens]
        return torch.stack(out)
    finally:
        model.layer_graphs = saved


@pytest.mark.parametrize("family", TAKES)
def test_layer_graphs_decode_as_the_torch_path(family, tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(KVCache, "FIRST", 8)  # the cache grows (and graphs rebuild) mid-run
    make_checkpoint(family, tmp_path / "hf", tokenizer_dir)
    hobbit_tools.prepare(tmp_path / "hf", tmp_path / "model", dense="F32", high="F32")
    # no warm-up: it would grow the 8-token cache before the decode below
    rt = hobbit_tools.load(tmp_path / "model", policy="resident", max_context=64, warm_up=False)
    model = rt.model
    assert model.layer_graphs is not None, model.layer_graphs_why_not
    calls = []
    real = layer_graph.LayerGraph.__call__
    monkeypatch.setattr(
        layer_graph.LayerGraph, "__call__", lambda g, *a: calls.append(g.key) or real(g, *a)
    )
    torch.manual_seed(0)
    prompt, tokens = torch.randint(1, 384, (5,)).tolist(), torch.randint(1, 384, (20,)).tolist()
    got = _decode(model, prompt, tokens, graphs=True)  # first: on a fresh, growing cache
    want = _decode(model, prompt, tokens, graphs=False)
    assert len(calls) == 20 * model.cfg.num_layers
    assert len({key[2] for key in calls}) > 1  # built on more than one cache size
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[0], want[0])  # the prefill does not use them


def test_models_outside_the_graphs_say_why(tmp_path, tokenizer_dir):
    make_checkpoint("phimoe", tmp_path / "phi", tokenizer_dir)
    hobbit_tools.prepare(tmp_path / "phi", tmp_path / "phi-model", dense="F32", high="F32")
    rt = hobbit_tools.load(tmp_path / "phi-model", policy="resident")
    assert rt.model.layer_graphs is None
    assert "norm" in rt.model.layer_graphs_why_not or "RoPE" in rt.model.layer_graphs_why_not
    make_checkpoint("mixtral", tmp_path / "mix", tokenizer_dir)
    hobbit_tools.prepare(tmp_path / "mix", tmp_path / "mix-model", dense="BF16", high="F32")
    rt = hobbit_tools.load(tmp_path / "mix-model", policy="resident", dtype="bfloat16")
    assert rt.model.layer_graphs is None
    assert "bfloat16" in rt.model.layer_graphs_why_not
    g = rt.generate("To be", max_new_tokens=4, stop_at_eos=False)  # the torch path runs
    assert len(g.token_ids) == 4


def test_experts_in_memory_run_inside_the_next_graph_bit_identical_to_the_cache_computing(
    tmp_path, tokenizer_dir, monkeypatch
):
    """Resident experts, and an offloading cache's when all of a layer's are in memory, are
    handed back and run in the next layer's graph; where the cache computes them itself
    (misses), the logits are the same bit for bit."""
    model_dir = prepared_pair(tmp_path, tokenizer_dir, **_quantizable())
    resident = hobbit_tools.load(model_dir, policy="resident", precision="high").model
    offloaded = hobbit_tools.load(model_dir, policy="lru", memory="40%").model
    carried = {id(resident): [], id(offloaded): []}
    real = Transformer.decode_step

    def decode_step(model, i, state, pos):
        out = real(model, i, state, pos)
        carried[id(model)].append(isinstance(out, Carry))
        return out

    monkeypatch.setattr(Transformer, "decode_step", decode_step)
    torch.manual_seed(1)
    prompt, tokens = torch.randint(1, 384, (6,)).tolist(), torch.randint(1, 384, (24,)).tolist()
    want = _decode(offloaded, prompt, tokens, graphs=True)
    got = _decode(resident, prompt, tokens, graphs=True)
    assert all(carried[id(resident)])
    assert any(carried[id(offloaded)]) and not all(carried[id(offloaded)])
    assert offloaded.experts.stats()["misses"] > 0
    assert torch.equal(got, want)
    offloaded.experts.cache.check()  # nothing left pinned
    assert not any(e.pins for e in offloaded.experts.cache.entries.values())


def _quantizable():
    from tiny_models import quantizable

    return quantizable()

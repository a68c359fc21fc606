"""Sampling, stop strings and streaming."""

import pytest
import torch
from tiny_models import make_checkpoint

import hobbit_tools
from hobbit_tools.runtime.generate import SamplingParams, StopMatcher, sample


@pytest.fixture(scope="module")
def rt(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("qwen3")
    make_checkpoint("qwen3_moe", d / "hf", tokenizer_dir)
    hobbit_tools.prepare(d / "hf", d / "model")
    return hobbit_tools.load(d / "model")


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample(logits, SamplingParams(), None) == 1


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0, -2.0])
    gen = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=1.0, top_k=2)
    assert {sample(logits, p, gen) for _ in range(200)} == {0, 1}
    p = SamplingParams(temperature=1.0, top_p=0.5)  # token 0 alone holds > 0.5
    assert {sample(logits, p, gen) for _ in range(50)} == {0}


def test_seeded_sampling_is_reproducible(rt):
    a = rt.generate("Hello", max_new_tokens=12, temperature=1.0, seed=7, stop_at_eos=False)
    b = rt.generate("Hello", max_new_tokens=12, temperature=1.0, seed=7, stop_at_eos=False)
    c = rt.generate("Hello", max_new_tokens=12, temperature=1.0, seed=8, stop_at_eos=False)
    assert a.token_ids == b.token_ids != c.token_ids


def test_stream_yields_what_generate_returns(rt):
    chunks = list(rt.stream("Hello", max_new_tokens=10, stop_at_eos=False))
    g = rt.generate("Hello", max_new_tokens=10, stop_at_eos=False)
    assert [c.token_id for c in chunks if c.token_id is not None] == g.token_ids
    assert "".join(c.text for c in chunks) == g.text == rt.tokenizer.decode(g.token_ids)
    assert g.stats["new_tokens"] == 10 and g.stats["decode_tokens_per_s"] > 0


def test_stop_string_cuts_the_text(rt):
    full = rt.generate("Hello", max_new_tokens=16, stop_at_eos=False)
    stop = full.text[5:8]
    g = rt.generate("Hello", max_new_tokens=16, stop=[stop], stop_at_eos=False)
    assert g.finish_reason == "stop"
    assert g.text == full.text[: full.text.find(stop)]


def test_eos_ends_generation(rt):
    ids = rt.encode("Hello")
    first = rt.generate(ids, max_new_tokens=1).token_ids[0]
    rt.tokenizer.eos_ids = frozenset({first})
    try:
        g = rt.generate(ids, max_new_tokens=8)
    finally:
        rt.tokenizer.eos_ids = frozenset({0})
    assert g.token_ids == [] and g.finish_reason == "eos"


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(("END",))
    assert m.feed("abcE") == ("abc", False)
    assert m.feed("N") == ("", False)
    assert m.feed("Dxyz") == ("", True)
    assert m.text == "abc"
    m = StopMatcher(("END",))
    assert m.feed("abE") == ("ab", False)
    assert m.feed("x") == ("Ex", False)


def test_the_warm_up_at_load_leaves_no_trace(rt):
    """A resident model runs a short prompt at load (first calls out of the user's first
    prompt) and forgets it: nothing in the KV cache, and the same greedy tokens and logits
    as a model loaded without it."""
    model_dir = rt.info["model_dir"]
    warm, cold = hobbit_tools.load(model_dir), hobbit_tools.load(model_dir, warm_up=False)
    assert warm.info["policy"] == "resident" and warm.info["warm_up_s"] > 0
    assert cold.info["warm_up_s"] == 0 and warm.model.cache.length == 0
    ids = warm.encode("The history of the world")
    a = warm.generate(ids, max_new_tokens=12, stop_at_eos=False)
    b = cold.generate(ids, max_new_tokens=12, stop_at_eos=False)
    assert a.token_ids == b.token_ids
    assert torch.equal(warm.logits(ids), cold.logits(ids))
    offloaded = hobbit_tools.load(model_dir, memory="50%", policy="lru")
    assert offloaded.info["warm_up_s"] == 0  # it would fill the cache with made-up experts

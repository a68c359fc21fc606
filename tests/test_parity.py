"""Every family: prepared shards run with exact parity against transformers."""

import pytest
import torch
from tiny_models import FAMILIES, make_checkpoint

import hobbit_tools

PROMPT = "To be, or not to be, that is the question:"


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from transformers through its KV cache."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        tokens = []
        for _ in range(n):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(
                torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True
            )
    return tokens


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def prepared(request, tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp(request.param)
    ref = make_checkpoint(request.param, d / "hf", tokenizer_dir)
    hobbit_tools.prepare(d / "hf", d / "model", dense="F32", high="F32")
    return ref, hobbit_tools.load(d / "model")


def test_logits_match_transformers(prepared):
    ref, rt = prepared
    ids = rt.encode(PROMPT)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].float()
    got = rt.logits(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-3


def test_greedy_tokens_match_transformers(prepared):
    ref, rt = prepared
    ids = rt.encode(PROMPT)
    g = rt.generate(ids, max_new_tokens=32, stop_at_eos=False)
    assert g.token_ids == hf_greedy(ref, ids, 32)


def test_incremental_decode_equals_full_forward(prepared):
    _, rt = prepared
    ids = rt.encode(PROMPT)
    full = rt.logits(ids)
    rt.model.reset()
    steps = [rt.model.forward(torch.tensor(ids[:5]))]
    for t in ids[5:]:
        steps.append(rt.model.forward(torch.tensor([t])))
    incremental = torch.stack(steps)
    assert (incremental - full[4:]).abs().max().item() < 1e-4

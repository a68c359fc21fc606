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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1024), (7, 2880), (3, 8, 128)])
def test_rms_norm_is_transformers_bit_for_bit(dtype, shape):
    # The runtime's norm takes torch's fused kernel in float32: it must stay exactly
    # transformers' arithmetic (the exactness of offloaded vs resident logits rests on it).
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    from hobbit_tools.runtime.model import _rms_norm

    torch.manual_seed(0)
    norm = MixtralRMSNorm(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
        for scale in (1e-3, 1.0, 1e3):
            x = (torch.randn(shape) * scale).to(dtype)
            assert torch.equal(_rms_norm(x, norm.weight, 1e-5), norm(x))

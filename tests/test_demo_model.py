"""The bundled demo checkpoint (hobbit_tools/demo/checkpoint, made by scripts/train_demo.py):
it loads with transformers, is a Mixtral whose experts hold most parameters, its tokenizer
round-trips text, and it reproduces the held-out perplexity its train_log.json records."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "hobbit_tools" / "demo" / "checkpoint"
DATA = REPO / ".." / "shared" / "data"
FILES = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "train_log.json",
]


@pytest.fixture(scope="module")
def log() -> dict:
    return json.loads((CKPT / "train_log.json").read_text())


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    m = transformers.AutoModelForCausalLM.from_pretrained(CKPT, dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(CKPT)


def test_files_and_size():
    for name in FILES:
        assert (CKPT / name).is_file(), name
    total = sum((CKPT / name).stat().st_size for name in FILES)
    assert total < 45_000_000, f"demo checkpoint is {total:,} bytes"


def test_config_is_mixtral_with_expert_majority():
    cfg = json.loads((CKPT / "config.json").read_text())
    assert cfg["model_type"] == "mixtral"
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["num_local_experts"] >= 4 and cfg["num_experts_per_tok"] == 2
    assert cfg["sliding_window"] is None
    with safe_open(CKPT / "model.safetensors", framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    numel = {k: math.prod(s) for k, s in shapes.items()}
    experts = sum(n for k, n in numel.items() if ".block_sparse_moe.experts." in k)
    assert experts / sum(numel.values()) > 0.5
    # every layer has every expert's w1/w2/w3 (the per-expert layout hobbit converts)
    for layer in range(cfg["num_hidden_layers"]):
        for e in range(cfg["num_local_experts"]):
            for w in ("w1", "w2", "w3"):
                assert f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" in shapes


def test_loads_with_transformers(model):
    assert type(model).__name__ == "MixtralForCausalLM"
    n = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for k, p in model.named_parameters() if ".experts." in k)
    assert experts / n > 0.5


def test_tokenizer_round_trips(tokenizer):
    gen = json.loads((CKPT / "generation_config.json").read_text())
    bos = tokenizer.bos_token_id
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert gen["bos_token_id"] == gen["eos_token_id"] == bos
    assert json.loads((CKPT / "tokenizer_config.json").read_text())["add_bos_token"] is True
    raw = Tokenizer.from_file(str(CKPT / "tokenizer.json"))  # what hobbit's runtime uses
    for text in [
        "The old man and the sea.",
        "  Two  spaces,\nnew lines\n\nand tabs\t!",
        "Café — naïve “quotes” 1234 ✓",
    ]:
        ids = tokenizer(text).input_ids
        assert ids[0] == bos and bos not in ids[1:]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert raw.encode(text).ids == ids
        assert raw.decode(ids) == text
    assert len(tokenizer("It was a dark and stormy night").input_ids) < 12  # merges were learnt


def test_heldout_prefix_perplexity_is_reproduced(model, tokenizer, log):
    cfg = tomllib.loads((REPO / "recipes" / "demo-train.toml").read_text())
    assert log["config"]["data"] == cfg["data"]
    books = [DATA / "books" / name for name in cfg["data"]["held_out_books"]]
    if not all(b.is_file() for b in books):
        pytest.skip(f"held-out books not found under {DATA}")
    want = log["heldout_prefix"]
    texts = [b.read_text(encoding="utf-8") for b in books]
    ids = [t for text in texts for t in tokenizer(text, verbose=False).input_ids]
    ids = ids[: want["tokens"]]
    seq_len = want["seq_len"]
    windows = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in windows.split(16):
            logits = model(input_ids=b).logits.float()
            nll += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += b[:, 1:].numel()
    ppl = math.exp(nll / count)
    assert ppl == pytest.approx(want["perplexity"], rel=0.02)
    # and the model learnt something: far below a uniform guess over the vocabulary
    assert ppl < len(tokenizer) / 10

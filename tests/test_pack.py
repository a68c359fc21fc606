"""Slot packs: the same tokens as converting from the shards, found stale when they are,
rebuilt by `hobbit pack`; reads that stop when told to."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_models import make_checkpoint, prepared_pair, quantizable

import hobbit_tools
from hobbit_tools.cli import main
from hobbit_tools.runtime.io import ReadStopped, ShardFile

SHAPE = quantizable(num_local_experts=4, num_hidden_layers=2)
PROMPT = "Now is the winter of our discontent made glorious summer by this sun of York"


@pytest.fixture(scope="module")
def paired(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("packed")
    return prepared_pair(d, tokenizer_dir, pack=True, **SHAPE)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def packed(rt) -> dict:
    return {k: p.pack is not None for k, p in rt.model.experts.store.p.items()}


@pytest.mark.parametrize("policy", ["lru", "hobbit"])
def test_packed_loads_give_the_same_logits_as_converting(paired, tmp_path, policy):
    unpacked = tmp_path / "unpacked"
    shutil.copytree(paired, unpacked)
    shutil.rmtree(unpacked / "packs")
    a = hobbit_tools.load(paired, kernels="torch", memory="60%", policy=policy)
    b = hobbit_tools.load(unpacked, kernels="torch", memory="60%", policy=policy)
    assert all(packed(a).values()) and not any(packed(b).values())
    ids = a.encode(PROMPT)
    assert torch.equal(a.logits(ids), b.logits(ids))
    ga = a.generate(ids, max_new_tokens=12, stop_at_eos=False)
    gb = b.generate(ids, max_new_tokens=12, stop_at_eos=False)
    assert ga.token_ids == gb.token_ids
    # a load reads one slot image (4096-aligned), no more
    high = a.model.experts.store.p["high"]
    assert high.load_bytes == high.slot_bytes and high.slot_bytes % 4096 == 0


def test_stale_pack_is_ignored_and_rebuilt(paired, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(paired, model)
    meta = model / "packs" / "experts-low.json"
    info = json.loads(meta.read_text())
    meta.write_text(json.dumps({**info, "key": "made-by-another-torch"}))
    rt = hobbit_tools.load(model, kernels="torch", memory="60%", policy="hobbit")
    assert packed(rt) == {"high": True, "low": False}  # falls back to converting
    assert len(rt.generate(PROMPT, max_new_tokens=4, stop_at_eos=False).token_ids) == 4
    r = run("pack", model)
    assert r.exit_code == 0, r.output
    assert "experts-high: up to date" in r.output and "experts-low: written" in r.output
    assert json.loads(meta.read_text())["key"] == info["key"]
    assert (model / "packs" / "experts-low.slots").read_bytes() == (
        paired / "packs" / "experts-low.slots"
    ).read_bytes()


def test_no_pack_then_pack_and_inspect(tmp_path, tokenizer_dir):
    make_checkpoint("mixtral", tmp_path / "hf", tokenizer_dir, **SHAPE)
    r = run("prepare", tmp_path / "hf", "-o", tmp_path / "m", "--high", "Q8_0", "--no-pack")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "m" / "packs").exists()
    assert json.loads(run("inspect", tmp_path / "m", "--json").output)["packs"] == {}
    assert run("pack", tmp_path / "m").exit_code == 0
    packs = json.loads(run("inspect", tmp_path / "m", "--json").output)["packs"]
    assert set(packs) == {"high", "low"}
    # Q8_0 is held as bf16 for its kernel: the image is ~2 bytes a weight
    weights = 3 * 256 * 256
    assert 2 * weights <= packs["high"]["slot_bytes"] < 2 * weights + 3 * 4096


def test_float_shards_are_not_packed(tmp_path, tokenizer_dir):
    make_checkpoint("mixtral", tmp_path / "hf", tokenizer_dir, **SHAPE)
    hobbit_tools.prepare(tmp_path / "hf", tmp_path / "m", high="BF16", low="none")
    assert not (tmp_path / "m" / "packs" / "experts-high.json").exists()


def test_a_read_stops_between_chunks(paired, monkeypatch):
    import hobbit_tools.runtime.io as io

    monkeypatch.setattr(io, "CHUNK", 4096)
    f = ShardFile(paired / "packs" / "experts-high.slots")
    buf = io.aligned_buffer(3 * 4096)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(ReadStopped):
        f.read_into(buf, 0, 3 * 4096, stop)
    assert f.bytes_read == 2 * 4096  # two chunks, then it stopped
    whole = f.read_into(buf, 0, 3 * 4096, lambda: False)
    assert np.array_equal(whole, np.fromfile(f.path, np.uint8, 3 * 4096))


def test_cancelling_an_in_flight_prefetch_frees_its_slot_once_it_stops(paired):
    import threading

    from hobbit_tools.runtime.io import PREFETCH

    rt = hobbit_tools.load(paired, kernels="torch", memory="60%", policy="lru")
    cache = rt.model.experts.cache
    store = cache.store
    gate, real = threading.Event(), store.read

    def slow(*args, stop=None, **kwargs):  # holds the read until the test lets it go
        gate.wait(5)
        if stop():
            raise ReadStopped("told to")
        return real(*args, stop=stop, **kwargs)

    store.read = slow
    free = len(cache.arenas["high"].free)
    entry = cache.load((1, 3, "high"), PREFETCH, 0)
    cache.protect(entry, 1)
    while not entry.future.running():
        pass
    assert cache.cancel(entry)  # in flight: told to stop, its slot not yet free
    assert (1, 3, "high") not in cache.entries
    assert len(cache.arenas["high"].free) == free - 1
    gate.set()
    with pytest.raises(ReadStopped):
        entry.future.result(5)
    cache.reap()
    assert len(cache.arenas["high"].free) == free
    store.read = real

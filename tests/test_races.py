"""The cache's slots under concurrency: a demand read run while a prefetch is paused never
touches the prefetch's bytes, and nothing frees a slot an I/O thread is still writing
(errors, close). Each test makes its interleaving happen on purpose, not by chance."""

import math
import threading

import pytest
import torch
from tiny_models import make_checkpoint

import hobbit_tools
from hobbit_tools.runtime import io
from hobbit_tools.runtime.cache import ExpertCache
from hobbit_tools.runtime.io import DEMAND, PREFETCH, IOPool
from hobbit_tools.runtime.loader import ModelFiles
from hobbit_tools.runtime.policies import LRU
from hobbit_tools.runtime.store import ExpertStore


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("races")
    make_checkpoint("mixtral", d / "hf", tokenizer_dir, num_local_experts=8, num_experts_per_tok=2)
    hobbit_tools.prepare(d / "hf", d / "model")
    return d / "model"


def torch_store(model) -> ExpertStore:
    """The path that stages and converts (no pack, torch's kernels): the one that needs a
    buffer besides the slot."""
    files = ModelFiles(model)
    qtype = files.manifest["types"]["high"]
    return ExpertStore(files, ["high"], torch.float32, packs=False, kernels={qtype: "torch"})


def pieces(store, layer, expert, part) -> int:
    """How many chunks (stop() polls) a read of one slice takes."""
    s = store.p["high"].slices[(layer, expert)][part]
    width = io.align_up(s.offset + s.nbytes) - io.align_down(s.offset)
    return math.ceil(width / io.CHUNK)


def alone(store, layer, e):
    """The expert read with nothing else going on: the reference."""
    from hobbit_tools.runtime.store import SlotArena

    arena = SlotArena(store.p["high"].slot_bytes, 1)
    return store.read(layer, e, "high", arena.view(0)), arena


def test_a_demand_read_run_inside_a_paused_prefetch_leaves_its_bytes_alone(model, monkeypatch):
    """One I/O thread; a prefetch of A pauses between its chunks just after its gate matrix
    was read and checksummed, a demand read of B is queued at that moment and runs in the
    paused thread. A and B must each come out as they do alone (before the fix both read
    into the thread's one staging buffer: A's gate became B's, and passed its checksum)."""
    monkeypatch.setattr(io, "CHUNK", io.BLOCK)  # many pauses per read
    store = torch_store(model)
    pool = IOPool(1)
    slot = store.p["high"].slot_bytes
    cache = ExpertCache(store, {"high": 4 * slot}, LRU(), pool)
    a, b = (0, 1, "high"), (0, 5, "high")
    trigger = pieces(store, 0, 1, 0) + 1  # the poll before the first chunk of `up`
    polls, demanded = [0], []
    real = pool.yield_to_demand

    def pausing():
        polls[0] += 1
        if polls[0] == trigger:
            demanded.append(cache.load(b, DEMAND, 0))
        real()

    pool.yield_to_demand = pausing
    got_a = cache.load(a, PREFETCH, 0)
    cache.finish(got_a)
    assert demanded and demanded[0].future.done()  # B ran inside A's read
    cache.finish(demanded[0])
    ref_a, _ = alone(store, 0, 1)
    ref_b, _ = alone(store, 0, 5)
    x = torch.randn(3, store.p["high"].slices[(0, 1)][0].shape[1])
    assert torch.equal(got_a.expert(x), ref_a(x))
    assert torch.equal(demanded[0].expert(x), ref_b(x))
    cache.check()
    cache.settle()
    pool.close()
    store.close()


def blocked_reads(store, release: threading.Event, started: threading.Semaphore):
    """store.read that holds each read until `release` is set (polling its stop between)."""
    real = store.read

    def read(layer, expert, precision, slot, from_pack=True, stop=None):
        started.release()
        while not release.wait(0.01):
            pass
        return real(layer, expert, precision, slot, from_pack, stop)

    return read


@pytest.mark.parametrize("how", ["abort", "close"])
def test_no_slot_is_freed_while_its_read_is_running(model, how):
    """Prefetches in flight (one running, others queued) when a load fails or the backend
    closes: abort/close return only after every read has ended, and every slot is then FREE
    or held by a READY entry. Before the fix abort freed the slots of running prefetches
    and close gave up after 5 s."""
    store = torch_store(model)
    pool = IOPool(1)
    slot = store.p["high"].slot_bytes
    cache = ExpertCache(store, {"high": 4 * slot}, LRU(), pool)
    release, started = threading.Event(), threading.Semaphore(0)
    store.read = blocked_reads(store, release, started)
    loads = [cache.load((1, e, "high"), PREFETCH, 0) for e in range(3)]
    for entry in loads:
        cache.protect(entry, 1)
    assert started.acquire(timeout=10)  # the first prefetch is being read
    assert [e.state for e in loads] == ["LOADING"] * 3
    timer = threading.Timer(0.3, release.set)
    timer.start()
    if how == "abort":
        cache.abort()
    else:
        cache.settle()
    assert all(e.future.done() for e in loads)  # nothing is still writing
    cache.check()
    if how == "abort":
        assert all(e.state != "LOADING" for e in cache.entries.values())
        assert len(cache.arenas["high"].free) + len(cache.entries) == 4
    pool.close()
    store.close()
    timer.join()


def test_the_runtime_stays_right_with_prefetch_and_staged_reads(model):
    """End to end on the staged path with prefetch and pauses on: offloaded == resident."""
    ref = hobbit_tools.load(model, kernels="torch", packs=False)
    ids = ref.encode("Is this a dagger which I see before me")
    want = ref.generate(ids, max_new_tokens=16, stop_at_eos=False).token_ids
    rt = hobbit_tools.load(model, memory="40%", policy="hobbit", dynamic_precision=False, kernels="torch",
                           packs=False, prefetch_depth=1)  # fmt: skip
    got = rt.generate(ids, max_new_tokens=16, stop_at_eos=False)
    assert got.token_ids == want
    rt.model.experts.cache.check()

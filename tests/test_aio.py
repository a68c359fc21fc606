"""Batched direct reads (kernel AIO) reaped by the model's thread: the bytes are the file's,
errors reach the load that asked, a batch larger than the context works, nothing is in
flight after settle, and the runtime using them computes exactly what resident does."""

import numpy as np
import pytest
import torch
from tiny_models import prepared_pair, quantizable

import hobbit_tools
from hobbit_tools.errors import HobbitError
from hobbit_tools.runtime import aio, io
from hobbit_tools.runtime.cache import ExpertCache
from hobbit_tools.runtime.io import PREFETCH, IOPool
from hobbit_tools.runtime.loader import ModelFiles
from hobbit_tools.runtime.policies import LRU
from hobbit_tools.runtime.store import ExpertStore

pytestmark = pytest.mark.skipif(bool(aio.available()), reason=f"no kernel AIO: {aio.available()}")


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    f = io.ShardFile(path)
    if not f.direct:
        pytest.skip(f"{tmp_path}: {f.fallback_reason}")
    yield f, path.read_bytes()
    f.close()


def test_a_batch_reads_the_files_bytes_and_completes_on_the_reaping_thread(data_file):
    f, want = data_file
    reads = aio.AsyncReads(depth=4)  # fewer than the pieces: submit reaps to make room
    buf = io.aligned_buffer(64 * io.BLOCK)
    offsets = [io.BLOCK * k for k in (7, 3, 200, 0, 31, 254, 100, 9)]
    pieces = [
        (f.fd, off, 2 * io.BLOCK, buf.ctypes.data + i * 2 * io.BLOCK)
        for i, off in enumerate(offsets)
    ]
    fut = reads.submit(pieces, lambda: "checked", "data.bin")
    reads.wait([fut])
    assert fut.result() == "checked" and reads.in_flight == 0
    for i, off in enumerate(offsets):
        assert (
            buf[i * 2 * io.BLOCK : (i + 1) * 2 * io.BLOCK].tobytes()
            == want[off : off + 2 * io.BLOCK]
        )
    reads.close()


def test_a_short_read_and_a_failing_completion_reach_the_future(data_file):
    f, _ = data_file
    reads = aio.AsyncReads()
    buf = io.aligned_buffer(4 * io.BLOCK)
    past_end = reads.submit(
        [(f.fd, f.size - io.BLOCK, 2 * io.BLOCK, buf.ctypes.data)], lambda: 1, "data.bin"
    )

    def complete():
        raise HobbitError("fails its checksum")

    bad = reads.submit([(f.fd, 0, io.BLOCK, buf.ctypes.data + 2 * io.BLOCK)], complete, "data.bin")
    reads.drain()
    with pytest.raises(HobbitError, match="short read from data.bin"):
        past_end.result()
    with pytest.raises(HobbitError, match="fails its checksum"):
        bad.result()
    reads.close()


def test_demand_goes_first_a_hurried_prefetch_joins_it_a_cancelled_one_stops(
    data_file, monkeypatch
):
    """One read in flight at a time (window of one chunk), pieces split in chunks: queued
    demand reads go before queued prefetches; `hurry` moves a prefetch's queued reads to
    the demand; `cancel` drops a prefetch's queued reads, so its later chunks never land."""
    f, want = data_file
    monkeypatch.setattr(aio, "CHUNK", io.BLOCK)
    reads = aio.AsyncReads(window=io.BLOCK)
    buf = io.aligned_buffer(32 * io.BLOCK)
    at = buf.ctypes.data

    def job(k, demand):  # 4 blocks from block 10*k into buf's 8k-th block
        return reads.submit([(f.fd, 10 * k * io.BLOCK, 4 * io.BLOCK, at + 8 * k * io.BLOCK)],
                            lambda: k, "data.bin", demand=demand)  # fmt: skip

    late, hurried, dropped = job(0, False), job(1, False), job(2, False)
    first = job(3, True)
    reads.flush()  # one read goes: the demand's first chunk
    reads.cancel(dropped)
    reads.hurry(hurried)
    reads.wait([first])
    assert first.result() == 3 and not hurried.done() and not late.done()
    reads.wait([hurried])
    assert hurried.result() == 1 and not late.done()
    reads.drain()
    assert late.result() == 0
    with pytest.raises(io.ReadStopped):
        dropped.result()
    for k in (0, 1, 3):
        got = buf[8 * k * io.BLOCK : (8 * k + 4) * io.BLOCK].tobytes()
        assert got == want[10 * k * io.BLOCK : (10 * k + 4) * io.BLOCK]
    assert not buf[16 * io.BLOCK : 20 * io.BLOCK].any()  # the cancelled job read nothing
    reads.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir):
    return prepared_pair(tmp_path_factory.mktemp("aio"), tokenizer_dir, **quantizable())


def test_settle_leaves_no_batched_read_in_flight(model):
    """Prefetches submitted, then abort (a failed load): every read has ended and every slot
    is FREE or READY, as with reader threads."""
    store = ExpertStore(ModelFiles(model), ["high"], torch.float32)
    if not store.reads_async("high"):
        pytest.skip("the shards are not read directly here")
    reads, pool = aio.AsyncReads(), IOPool(1)
    cache = ExpertCache(store, {"high": 4 * store.p["high"].slot_bytes}, LRU(), pool, reads)
    loads = [cache.load((1, e, "high"), PREFETCH, 0) for e in range(3)]
    for entry in loads:
        cache.protect(entry, 1)
    cache.flush()
    assert reads.in_flight > 0 and all(aio.batched(e.future) for e in loads)
    cache.cancel(loads[0])  # given up while in the kernel: STOPPING until reaped
    cache.abort()
    assert reads.in_flight == 0 and all(e.future.done() for e in loads)
    cache.check()
    assert len(cache.arenas["high"].free) + len(cache.entries) == 4
    pool.close()
    reads.close()
    store.close()


def test_the_runtime_on_batched_reads_matches_resident_and_reader_threads(model, monkeypatch):
    ref = hobbit_tools.load(model)
    ids = ref.encode("Is this a dagger which I see before me")
    want = ref.generate(ids, max_new_tokens=16, stop_at_eos=False).token_ids
    rt = hobbit_tools.load(
        model, memory="40%", policy="hobbit", dynamic_precision=False, prefetch_depth=1
    )
    assert rt.info["io"] == "batched direct reads (kernel AIO)"
    got = rt.generate(ids, max_new_tokens=16, stop_at_eos=False)
    assert got.token_ids == want and got.stats["misses"] > 0
    rt.model.experts.cache.check()
    monkeypatch.setenv("HOBBIT_IO", "threads")
    threaded = hobbit_tools.load(
        model, memory="40%", policy="hobbit", dynamic_precision=False, prefetch_depth=1
    )
    assert threaded.info["io"].startswith("2 reader threads")
    assert threaded.generate(ids, max_new_tokens=16, stop_at_eos=False).token_ids == want


def test_a_large_copys_first_read_goes_to_the_reader_threads(model, monkeypatch):
    """Its crc32 check then runs beside the model; once checked, its loads are batched."""
    from hobbit_tools.runtime import store as store_mod
    from hobbit_tools.runtime.store import SlotArena

    store = ExpertStore(ModelFiles(model), ["high"], torch.float32)
    if not store.reads_async("high"):
        pytest.skip("the shards are not read directly here")
    assert store.batchable(1, 2, "high")  # small: checked on the model's thread
    monkeypatch.setattr(store_mod, "CHECK_INLINE_BELOW", 0)
    assert not store.batchable(1, 2, "high")
    arena = SlotArena(store.p["high"].slot_bytes, 1)
    store.read(1, 2, "high", arena.view(0))  # as a reader thread does: read and check
    assert store.batchable(1, 2, "high") and not store.batchable(1, 3, "high")
    store.close()


def test_a_slot_arenas_pages_are_in_memory_before_any_read():
    """Faulted in at load (SlotArena), not by the first read into each page: that fault ran
    inside io_submit on the model's thread (a fresh 2 MiB page: up to 60 ms measured)."""
    import ctypes
    import mmap

    from hobbit_tools.runtime.store import SlotArena

    arena = SlotArena(3 * io.BLOCK + 100, 700)  # ~11 MiB: huge pages where the kernel has them
    page = mmap.PAGESIZE
    pages = arena.nbytes // page
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    addr = ctypes.c_void_p(arena.buf.ctypes.data)
    assert libc.mincore(addr, ctypes.c_size_t(pages * page), vec) == 0, ctypes.get_errno()
    assert all(v & 1 for v in vec), f"{sum(not v & 1 for v in vec)} of {pages} pages not resident"

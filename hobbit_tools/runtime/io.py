"""Reading expert bytes from the shards: O_DIRECT preads into page-aligned memory, served by a
small thread pool with a priority queue (the loads that convert after the read; plain
direct reads go to the kernel in batches instead, `aio.py`). Pure mechanism: knows nothing
of experts or policy.

O_DIRECT bypasses the page cache, so a read costs what the disk costs (otherwise a second
run would be served from RAM and every number would lie). It needs the file offset, length
and buffer address aligned to the block size: reads are widened to 4096-byte boundaries
(the shards align every tensor to 4096) into an aligned buffer and the caller gets a view.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import mmap
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..errors import HobbitError

BLOCK = 4096
HUGE_PAGE = 2 << 20
DEMAND, PREFETCH = 0, 1  # queue priorities: lower runs first


def align_down(n: int) -> int:
    return n & ~(BLOCK - 1)


def align_up(n: int) -> int:
    return (n + BLOCK - 1) & ~(BLOCK - 1)


def aligned_buffer(nbytes: int) -> np.ndarray:
    """Page-aligned private anonymous memory (mmap), as a uint8 array; never swapped to a
    file. Large buffers (slot arenas) ask for transparent huge pages: a kernel streaming
    through an expert then takes one TLB entry per 2 MiB instead of 512 (measured here:
    Q8_0 matmuls 10-13% faster; `mmap(-1)`'s default, shared memory, never gets them)."""
    m = mmap.mmap(-1, max(align_up(nbytes), BLOCK), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without THP: ordinary pages
            pass
    return np.frombuffer(m, dtype=np.uint8)


# reads one I/O thread can have in flight at once: a prefetch paused between its chunks and
# the demand read it runs meanwhile (`IOPool.yield_to_demand`)
READS_PER_THREAD = 2


class Buffers:
    """Aligned buffers of `nbytes`, each lent to one read at a time (`lease`). A buffer is
    never shared by two reads in flight: a paused prefetch and the demand read its thread
    runs meanwhile each hold their own, so at most READS_PER_THREAD per I/O thread are made."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    @contextmanager
    def lease(self) -> Iterator[np.ndarray]:
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None:
            buf = aligned_buffer(self.nbytes)
        try:
            yield buf
        finally:
            with self._lock:
                self._free.append(buf)

    def clear(self) -> None:
        """Let the idle buffers go (a lease after this makes a new one)."""
        with self._lock:
            self._free.clear()


class ReadStopped(Exception):
    """A read was told to stop (a prefetch found wrong) before it finished."""


CHUNK = 2 << 20  # a stoppable read checks between chunks (~2.5 ms of a 0.8 GB/s disk)


class ShardFile:
    """One shard opened for direct reads, falling back to buffered reads (with a warning
    naming the reason) where the filesystem refuses O_DIRECT, e.g. tmpfs."""

    def __init__(self, path, direct: bool = True):
        self.path = str(path)
        self.name = os.path.basename(self.path)
        self.bytes_read = 0  # what the disk delivered (block-widened, stopped reads in part)
        self._count = threading.Lock()
        self.direct = False
        self.fallback_reason = "direct I/O disabled"
        if not os.path.isfile(self.path):
            raise HobbitError(f"shard {self.path} is missing; re-run `hobbit prepare`")
        if direct:
            self.fallback_reason = self._open_direct()
            if self.fallback_reason:
                warnings.warn(
                    f"{self.name}: {self.fallback_reason}; using buffered reads, so the page "
                    "cache may serve repeated reads faster than the disk would",
                    stacklevel=2,
                )
        if not self.direct:
            self.fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def _open_direct(self) -> str:
        """Opens with O_DIRECT and proves a read works; returns why not, or ''."""
        if not hasattr(os, "O_DIRECT"):
            return "this OS has no O_DIRECT"
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            return f"O_DIRECT refused ({e.strerror})"
        try:
            os.preadv(fd, [memoryview(aligned_buffer(BLOCK))], 0)
        except OSError as e:
            os.close(fd)
            return f"O_DIRECT read refused ({e.strerror})"
        self.fd, self.direct = fd, True
        return ""

    def span(self, offset: int, nbytes: int) -> tuple[int, int]:
        """What a read of [offset, offset+nbytes) really reads: (start, length), widened to
        block boundaries for O_DIRECT. Refuses a range past the end of the file."""
        if offset + nbytes > self.size:
            raise HobbitError(
                f"{self.name} is truncated: needs byte {offset + nbytes}, "
                f"has {self.size}; re-run `hobbit prepare`"
            )
        if not self.direct:
            return offset, nbytes
        start = align_down(offset)
        return start, align_up(offset + nbytes) - start

    def count(self, n: int) -> None:
        """n more bytes delivered by the disk (from any thread)."""
        with self._count:
            self.bytes_read += n

    def read_into(
        self, buf: np.ndarray, offset: int, nbytes: int, stop: Callable[[], bool] | None = None
    ) -> np.ndarray:
        """Reads [offset, offset+nbytes) into buf (aligned, at least the widened size);
        returns the exact bytes as a view of buf. With `stop`, reads in CHUNK pieces and
        raises ReadStopped as soon as stop() is true between two of them."""
        start, length = self.span(offset, nbytes)
        view = memoryview(buf)[:length]
        got = 0
        while got < len(view):
            if stop is not None and stop():
                raise ReadStopped(self.name)
            piece = view[got : got + CHUNK] if stop is not None else view[got:]
            n = os.preadv(self.fd, [piece], start + got)
            if n <= 0:
                break
            got += n
            self.count(n)
        if got < offset + nbytes - start:
            raise HobbitError(f"short read from {self.name} at byte {start + got}")
        return buf[offset - start : offset - start + nbytes]

    def close(self) -> None:
        os.close(self.fd)


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    fn: Callable = None  # type: ignore[assignment]
    future: Future = None  # type: ignore[assignment]


class IOPool:
    """A few reader threads draining a priority queue. Demand reads overtake queued
    prefetches; queued work can be cancelled (Future.cancel) before it starts."""

    def __init__(self, threads: int = 2):
        self._heap: list[_Job] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._demand_running = 0
        self.busy_s = 0.0
        self._threads = [
            threading.Thread(target=self._worker, name=f"hobbit-io-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()
        _POOLS.add(self)

    def submit(self, fn: Callable, priority: int = DEMAND) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("IOPool is closed")
            heapq.heappush(self._heap, _Job(priority, next(self._seq), fn, fut))
            self._cv.notify()
        return fut

    def _worker(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed and not self._heap:
                    return
                job = heapq.heappop(self._heap)
            self._run(job)

    def _run(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        demand = job.priority == DEMAND
        if demand:
            with self._cv:
                self._demand_running += 1
        t0 = time.perf_counter()
        try:
            job.future.set_result(job.fn())
        except BaseException as e:  # delivered to the waiting caller
            job.future.set_exception(e)
        finally:
            self.busy_s += time.perf_counter() - t0
            if demand:
                with self._cv:
                    self._demand_running -= 1
                    self._cv.notify_all()

    def yield_to_demand(self) -> None:
        """Called by a prefetch between the chunks of its read: runs queued demand jobs
        first, in this thread, and waits while others run, so that a speculative read never
        shares the disk with a read the model is waiting for. (Run here, not by another
        thread: with one I/O thread there is no other, and the paused thread would idle.)
        The demand job must not touch the paused read's memory: jobs read into their own
        slot or a leased buffer (`Buffers`), never into per-thread scratch."""
        while True:
            with self._cv:
                if self._heap and self._heap[0].priority == DEMAND:
                    job = heapq.heappop(self._heap)
                elif self._demand_running and not self._closed:
                    self._cv.wait(0.05)
                    continue
                else:
                    return
            self._run(job)

    def close(self) -> None:
        """Cancels queued jobs and waits for the running ones to end (the cache stops its
        reads first, so that is within a chunk): files are never closed under a live read."""
        with self._cv:
            self._closed = True
            for job in self._heap:
                job.future.cancel()
            self._heap.clear()
            self._cv.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()


# Reader threads may be inside a torch op when the interpreter exits; stop them first.
_POOLS: weakref.WeakSet[IOPool] = weakref.WeakSet()
atexit.register(lambda: [pool.close() for pool in list(_POOLS)])

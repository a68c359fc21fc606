"""Direct reads submitted to the kernel in batches (Linux AIO: io_submit / io_getevents),
driven by the thread that runs the model. Pure mechanism: knows nothing of experts.

Why not reader threads: with small experts a token makes dozens of reads, and handing each
to a thread and back costs more than the read (measured on a 2-core VM, Qwen3's routing
shape: time per token outside I/O waits 1.5x resident's with two reader threads, their
wake-ups and the GIL they take back; synchronous reads on the model's thread 1.15x but no
overlap). Here a layer's misses go to the device in one system call, in flight together
(27 reads of 16 KB: 0.41 ms together, 1.75 ms one after another; large reads stream in
2 MiB chunks through an 8 MiB window, demand before prefetch), the model computes its cached
experts meanwhile and reaps the completions when it needs them: no thread, no hand-off. A
job's `complete` (checksum, build the expert) runs on the reaping thread, and its result is
the job's Future's.

Kernel AIO is asynchronous for O_DIRECT files (the shards); `available()` says whether this
system has it (Linux on x86-64 or arm64; HOBBIT_IO=threads turns it off), else, or where
io_setup refuses, the runtime's reader threads serve (`io.IOPool`).
"""

from __future__ import annotations

import ctypes as C
import errno
import os
import platform
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from ..errors import HobbitError
from .io import CHUNK, ReadStopped

# syscall numbers: x86-64's own table; arm64 uses the generic one
_SYSCALLS = {
    "x86_64": {"setup": 206, "destroy": 207, "getevents": 208, "submit": 209},
    "aarch64": {"setup": 0, "destroy": 1, "submit": 2, "getevents": 4},
}
_PREAD = 0  # IOCB_CMD_PREAD


class _IOCB(C.Structure):  # struct iocb, little-endian 64-bit layout
    _fields_ = [
        ("data", C.c_uint64),
        ("key", C.c_uint32),
        ("rw_flags", C.c_int32),
        ("opcode", C.c_uint16),
        ("reqprio", C.c_int16),
        ("fildes", C.c_uint32),
        ("buf", C.c_uint64),
        ("nbytes", C.c_uint64),
        ("offset", C.c_int64),
        ("reserved2", C.c_uint64),
        ("flags", C.c_uint32),
        ("resfd", C.c_uint32),
    ]


class _Event(C.Structure):  # struct io_event
    _fields_ = [("data", C.c_uint64), ("obj", C.c_uint64), ("res", C.c_int64), ("res2", C.c_int64)]


Piece = tuple[int, int, int, int]  # fd, file offset, bytes, destination address


class _Job:
    __slots__ = ("future", "complete", "left", "error", "name", "demand")

    def __init__(self, future: Future, complete: Callable, n: int, name: str, demand: bool):
        self.future, self.complete, self.left = future, complete, n
        self.error: BaseException | None = None
        self.name, self.demand = name, demand


_libc = None


def _syscall(name: str, *args) -> int:
    global _libc
    if _libc is None:
        _libc = C.CDLL(None, use_errno=True)
        _libc.syscall.restype = C.c_long
    return _libc.syscall(C.c_long(_SYSCALLS[platform.machine()][name]), *args)


def available() -> str:
    """'' where kernel AIO can be used here, else why not."""
    if os.name != "posix" or platform.system() != "Linux":
        return "not Linux"
    if platform.machine() not in _SYSCALLS:
        return f"no AIO syscall table for {platform.machine()}"
    if os.environ.get("HOBBIT_IO") == "threads":
        return "HOBBIT_IO=threads"
    return ""


def batched(future: Future) -> bool:
    """Whether a load's Future is an `AsyncReads` job (reaped by its caller, not a thread)."""
    return getattr(future, "batched", False)


class AsyncReads:
    """A kernel AIO context for up to `depth` reads in flight. `submit` queues a job's pieces
    (split into CHUNK-sized reads) and returns a Future; `flush` sends queued reads in one
    system call, demand before prefetch, up to `window` bytes in flight; the Future
    completes (in `poll` / `wait`, on the caller's thread) once every piece has arrived and
    the job's `complete` has run. A prefetch can be hurried (`hurry`: its reads not yet sent
    go with the demand ones) or given up (`cancel`: its reads not yet sent are dropped)."""

    def __init__(self, depth: int = 1024, window: int = 8 << 20):
        # bytes in flight at most (one read always goes). Measured here on Qwen3's expert
        # dims (5 MB Q8_0 experts, three 1.7 MB pieces): 1-2 MiB 28.4 ms a token, 4 MiB
        # 26.5, 8-16 MiB 24.1, unbounded 30.0 (a layer's first miss arrived with its last)
        self.window = window
        self._ctx = C.c_ulong(0)
        if _syscall("setup", C.c_long(depth), C.byref(self._ctx)) != 0:
            e = C.get_errno()
            raise OSError(e, f"io_setup: {os.strerror(e)}")
        self._cbs = (_IOCB * depth)()  # control blocks, reused: index = the event's data
        self._addr = [C.addressof(cb) for cb in self._cbs]
        self._free = list(range(depth - 1, -1, -1))
        self._job: list[_Job | None] = [None] * depth
        self._demand: deque = deque()  # (job, fd, offset, nbytes, address) not yet sent
        self._prefetch: deque = deque()
        self._events = (_Event * 256)()
        self.in_flight = 0  # reads submitted, not yet reaped
        self.bytes_in_flight = 0

    # -- submit ------------------------------------------------------------------------------
    def submit(
        self,
        pieces: list[Piece],
        complete: Callable[[], object],
        name: str = "",
        demand: bool = True,
    ) -> Future:
        """Queue reads of every piece (aligned for O_DIRECT by the caller); `complete()` runs
        once all have arrived, its result the Future's. Sent by the next `flush`."""
        future: Future = Future()
        future.set_running_or_notify_cancel()  # ours from now on: Future.cancel cannot stop it
        future.batched = True  # reaped by `poll` / `wait` here, not by a thread
        reads = [
            (fd, offset + at, min(CHUNK, nbytes - at), addr + at)
            for fd, offset, nbytes, addr in pieces
            for at in range(0, nbytes, CHUNK)
        ]
        job = _Job(future, complete, len(reads), name, demand)
        future.job = job
        if not reads:
            self._finish(job)
        (self._demand if demand else self._prefetch).extend((job, *r) for r in reads)
        return future

    def hurry(self, future: Future) -> None:
        """A prefetch the model now waits for: its reads not yet sent go with the demand."""
        job = future.job
        if job.demand:
            return
        job.demand = True
        mine = [r for r in self._prefetch if r[0] is job]
        self._prefetch = deque(r for r in self._prefetch if r[0] is not job)
        self._demand.extend(mine)

    def cancel(self, future: Future) -> None:
        """Give a job up: its reads not yet sent are dropped; it ends (ReadStopped) once those
        in flight are back."""
        job = future.job
        if future.done() or job.error is not None:
            return
        job.error = ReadStopped(job.name)
        for q in (self._demand, self._prefetch):
            kept = deque(r for r in q if r[0] is not job)
            job.left -= len(q) - len(kept)
            q.clear()
            q.extend(kept)
        if job.left == 0:
            self._finish(job)

    def flush(self) -> None:
        """Send queued reads to the device in one system call, demand first, in order, up
        to `window` bytes in flight: small reads all go at once (their latency overlaps),
        large ones stream, so that a layer's first miss arrives early, not with its last."""
        while self._demand or self._prefetch:
            room = self.window - self.bytes_in_flight
            batch = []
            for q in (self._demand, self._prefetch):
                while q and len(batch) < len(self._free) and q[0][3] <= room:
                    room -= q[0][3]
                    batch.append(q.popleft())
            if not batch:
                if self.in_flight:
                    return  # the window is full: more go as these complete (`_reap`)
                batch.append((self._demand or self._prefetch).popleft())
            ids = []
            for job, fd, offset, nbytes, addr in batch:
                i = self._free.pop()
                cb = self._cbs[i]
                cb.data, cb.opcode, cb.fildes = i, _PREAD, fd
                cb.buf, cb.nbytes, cb.offset = addr, nbytes, offset
                self._job[i] = job
                ids.append(i)
            self._send(ids)

    def _send(self, ids: list[int]) -> None:
        """io_submit these control blocks (all of them, however many calls it takes)."""
        while ids:
            n = len(ids)
            got = _syscall(
                "submit", self._ctx, C.c_long(n), (C.c_void_p * n)(*(self._addr[i] for i in ids))
            )
            if got < 0:
                e = C.get_errno()
                if e == errno.EAGAIN and self.in_flight:
                    self._reap(1, refill=False)
                    continue
                for i in ids:  # refused: those loads fail, with the reason
                    self._done(i, OSError(e, f"io_submit: {os.strerror(e)}"))
                return
            self.in_flight += got
            self.bytes_in_flight += sum(self._cbs[i].nbytes for i in ids[:got])
            ids = ids[got:]

    # -- reap --------------------------------------------------------------------------------
    def poll(self) -> None:
        """Send what is queued, reap whatever has completed, without waiting."""
        self.flush()
        if self.in_flight:
            self._reap(0)

    def wait(self, futures) -> None:
        """Block until at least one of `futures` (this context's) is done."""
        self.flush()
        while not any(f.done() for f in futures):
            if not self.in_flight:
                raise RuntimeError("waiting on reads that are not in flight")
            self._reap(1)

    def drain(self) -> None:
        """Reap until nothing is in flight (errors, close): no read writes memory after."""
        self.flush()
        while self.in_flight:
            self._reap(1)

    def _reap(self, at_least: int, refill: bool = True) -> None:
        n = len(self._events)
        while True:
            got = _syscall(
                "getevents", self._ctx, C.c_long(at_least), C.c_long(n), self._events, None
            )
            if got >= 0:
                break
            if C.get_errno() != errno.EINTR:
                e = C.get_errno()
                raise OSError(e, f"io_getevents: {os.strerror(e)}")
        self.in_flight -= got
        for ev in self._events[:got]:
            i, res = ev.data, ev.res
            want = self._cbs[i].nbytes
            self.bytes_in_flight -= want
            error = None
            if res != want:
                name = self._job[i].name
                error = (
                    OSError(-res, f"{name}: {os.strerror(-res)}")
                    if res < 0
                    else HobbitError(f"short read from {name}: {res} of {want} bytes")
                )
            self._done(i, error)
        if refill:
            self.flush()  # the window has room again

    def _done(self, i: int, error: BaseException | None) -> None:
        """Control block i has completed (or been refused): free it; the job finishes with
        its last piece."""
        job, self._job[i] = self._job[i], None
        self._free.append(i)
        if error is not None and job.error is None:
            job.error = error
        job.left -= 1
        if job.left == 0:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        if job.error is not None:
            job.future.set_exception(job.error)
            return
        try:
            job.future.set_result(job.complete())
        except BaseException as e:  # delivered to whoever takes the result
            job.future.set_exception(e)

    def close(self) -> None:
        if self._ctx.value:
            self.drain()
            _syscall("destroy", self._ctx)
            self._ctx = C.c_ulong(0)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

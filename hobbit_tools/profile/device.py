"""Measuring this machine for the offloading runtime: disk reads, RAM and host-to-GPU copies,
and the expert kernels. Mechanism only: every function returns numbers, none decides.

* Disk: expert shards are read with `os.preadv` into page-aligned (mmap) buffers, with
  O_DIRECT so the page cache does not hide the disk's cost (without it, a second run is
  served from RAM). Several threads issue reads at once (preadv releases the GIL), as the
  runtime's IO pool does, because SSDs only reach their bandwidth with requests in flight.
* Buffered reads are measured on a warm page cache: what a read costs when the kernel
  already holds the bytes, the best case of running without O_DIRECT.
* RAM: a large memcpy, the cost of moving an expert within memory.
* Host-to-GPU: pinned-memory copies, where a GPU is present.
* Kernels: one expert's FFN with the project's own compute paths (`QLinear`), per tensor
  type and token count, and the `from_raw` conversion that follows every read.
"""

from __future__ import annotations

import mmap
import os
import platform
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

BLOCK = 4096  # O_DIRECT alignment for offsets, lengths and buffers


@dataclass(frozen=True)
class ReadProbe:
    """One read measurement: `mode` "direct" (O_DIRECT, disk speed) or "buffered" (second
    pass over a range already in the page cache), `queue_depth` threads each with one
    request of `request_bytes` in flight, `gbps` in GB/s (1e9 bytes)."""

    mode: str
    request_bytes: int
    queue_depth: int
    gbps: float


# --------------------------------------------------------------------------- fingerprint


def _proc_field(name: str, *keys: str) -> str | None:
    """The value of the first line of /proc/<name> whose key is one of `keys` (lowercase)."""
    try:
        with open(f"/proc/{name}") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in keys:
                    return value.strip()
    except OSError:
        pass
    return None


def _octal(m: re.Match) -> str:  # /proc/mounts writes " " as \040
    return chr(int(m.group(1), 8))


def _mount_of(path: Path) -> dict:
    """The /proc/mounts entry with the longest mount point containing `path`."""
    best = {"mount_point": None, "fs_type": None, "source": None}
    try:
        with open("/proc/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return best
    p = str(path)
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        src, mnt, fs = (re.sub(r"\\([0-7]{3})", _octal, x) for x in fields[:3])
        inside = p == mnt or p.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best["mount_point"] or ""):
            best = {"mount_point": mnt, "fs_type": fs, "source": src}
    return best


def _storage(path: str | Path) -> dict:
    path = Path(path).resolve()
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    sysfs = Path(f"/sys/dev/block/{major}:{minor}")
    block = sysfs.resolve().name if sysfs.exists() else None
    return {"device": f"{major}:{minor}", "block_device": block, **_mount_of(path)}


def fingerprint(path: str | Path | None = None) -> dict:
    """What identifies this machine (no timings, no pids: the same machine gives the same
    dict), so a saved profile can be matched to where it was measured. With `path`, also
    the block device and filesystem holding it (st_dev major:minor and /proc/mounts)."""
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    ram = _proc_field("meminfo", "memtotal")  # "24684096 kB"
    return {
        "cpu": _proc_field("cpuinfo", "model name", "hardware", "cpu model")
        or platform.processor(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "ram_bytes": int(ram.split()[0]) * 1024 if ram else None,
        "kernel": platform.release(),
        "torch": torch.__version__,
        "cuda_device": cuda,
        "storage": None if path is None else _storage(path),
    }


# --------------------------------------------------------------------------- disk reads


def _aligned(nbytes: int) -> memoryview:
    """Page-aligned anonymous memory (mmap), as O_DIRECT requires of the buffer, faulted in
    beforehand so the reads are not charged the first touch of fresh pages."""
    m = mmap.mmap(-1, max(BLOCK, -(-nbytes // BLOCK) * BLOCK))
    np.frombuffer(m, dtype=np.uint8)[::BLOCK] = 0
    return memoryview(m)


def _open_direct(path: str) -> tuple[int | None, str | None]:
    """An O_DIRECT fd for `path` on which a read works, or None and why not."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return None, "this OS has no O_DIRECT"
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError as e:
        return None, f"O_DIRECT refused by open ({e.strerror})"
    try:
        os.preadv(fd, [_aligned(BLOCK)], 0)
    except OSError as e:
        os.close(fd)
        return None, f"O_DIRECT read refused ({e.strerror})"
    return fd, None


def _timed_reads(fd, req, qd, first_slot, slots, total_bytes, max_s) -> float:
    """qd threads read `total_bytes` in `req`-byte requests; thread k takes requests k,
    k+qd, ... at slot (first_slot + i) % slots. Stops early after max_s. Returns GB/s."""
    n_req = max(qd, round(total_bytes / req))
    done, errors = [0] * qd, []
    start = threading.Barrier(qd + 1)
    deadline = [0.0]

    def worker(k: int) -> None:
        buf = _aligned(req)
        start.wait()
        try:
            for i in range(k, n_req, qd):
                if time.perf_counter() > deadline[0]:
                    break
                off = (first_slot + i) % slots * req
                got = 0
                while got < req and (n := os.preadv(fd, [buf[got:]], off + got)) > 0:
                    got += n
                done[k] += got
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(qd)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + max_s
    start.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(done) / max(time.perf_counter() - t0, 1e-9) / 1e9


def probe_reads(
    path: str | Path,
    *,
    request_sizes=(1 << 20, 8 << 20, 32 << 20),
    queue_depths=(1, 2, 4),
    total_bytes: int = 256 << 20,
    direct: bool = True,
    max_seconds_per_point: float = 3.0,
) -> tuple[list[ReadProbe], str | None]:
    """Read bandwidth of `path` per request size and queue depth.

    Direct: O_DIRECT reads of `total_bytes` per point, each point continuing where the last
    stopped (wrapping round the file), so neither the page cache nor a small device cache
    serves the bytes; a file smaller than `total_bytes` is re-read, which a large device
    cache (e.g. a VM host's page cache) may then serve. Buffered: the first
    min(total_bytes, file) bytes are read once to warm the page cache, then each point reads
    that range again: the cached pass is what is reported.

    Request sizes are rounded down to 4096 and clamped to the file (smaller files get
    smaller requests). Each point stops after `max_seconds_per_point` (slow disks).
    Returns (probes, None), or ([], reason) when O_DIRECT is refused or the file is smaller
    than one 4096-byte block; the caller may then fall back to direct=False.
    """
    path = str(path)
    usable = os.stat(path).st_size // BLOCK * BLOCK
    if usable == 0:
        return [], f"{path} is smaller than one {BLOCK}-byte block"
    if direct:
        fd, reason = _open_direct(path)
        if fd is None:
            return [], reason
    else:
        fd = os.open(path, os.O_RDONLY)
        usable = min(usable, max(BLOCK, total_bytes // BLOCK * BLOCK))
    sizes = sorted({max(BLOCK, min(int(r), usable) // BLOCK * BLOCK) for r in request_sizes})
    probes, cursor = [], 0  # direct: each point starts where the last one stopped
    try:
        if not direct:  # the first pass: bring the range into the page cache
            buf = _aligned(8 << 20)
            for off in range(0, usable, len(buf)):
                os.preadv(fd, [buf[: min(len(buf), usable - off)]], off)
        for req in sizes:
            slots = usable // req
            for qd in queue_depths:
                first = cursor // req % slots if direct else 0
                gbps = _timed_reads(
                    fd, req, int(qd), first, slots, total_bytes, max_seconds_per_point
                )
                probes.append(ReadProbe("direct" if direct else "buffered", req, int(qd), gbps))
                cursor = (first * req + max(int(qd), round(total_bytes / req)) * req) % usable
    finally:
        os.close(fd)
    return probes, None


# --------------------------------------------------------------------------- memory


def _median_time(fn, repeats: int = 5, budget_s: float = 2.0, stat=statistics.median) -> float:
    """Median (or `stat`) seconds of fn() over up to `repeats` runs after one warm-up; stops
    early (at least one timed run) once the timed runs exceed budget_s."""
    fn()
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return stat(times)


def probe_ram_bandwidth(nbytes: int = 256 << 20) -> float:
    """GB/s (bytes copied per second, not read + written) of a `nbytes` memcpy between
    two arrays already faulted in: the cost of moving expert bytes within RAM."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    return nbytes / _median_time(lambda: np.copyto(dst, src)) / 1e9


def probe_h2d(nbytes: int = 256 << 20) -> float | None:
    """Host-to-GPU GB/s from pinned memory (what a GPU-side expert cache pays per load);
    None where torch sees no CUDA device."""
    if not torch.cuda.is_available():
        return None
    host = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def copy() -> None:
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()

    return nbytes / _median_time(copy) / 1e9


# --------------------------------------------------------------------------- kernels


def probe_kernels(
    shapes: list[tuple[int, int]],
    qtypes: list[str],
    tokens=(1, 64),
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Seconds of one expert FFN, down(silu(gate(x)) * up(x)), per tensor type and token
    count, with the runtime's own `QLinear` paths on random Gaussian weights; `shapes` is
    [(F, D), (F, D), (D, F)] for gate, up, down. Also the seconds of `from_raw` for the three
    matrices (the conversion paid after every read) and their raw bytes (what is read).
    Returns {qtype: {"T1_s": .., "T64_s": .., "convert_s": .., "bytes": ..}}."""

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(tuple(s), dtype=np.float32) * 0.02 for s in shapes]
    d_in = shapes[0][1]
    out: dict[str, dict] = {}
    # One thread and the fastest of the repeats: on a shared machine a parallel region
    # waits for any descheduled thread, which inflates multi-threaded timings many-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _probe_kernels(shapes, qtypes, tokens, dtype, weights, d_in, out)
    finally:
        torch.set_num_threads(threads)


def _probe_kernels(shapes, qtypes, tokens, dtype, weights, d_in, out) -> dict:
    from ..quantize.qtypes import quantize
    from ..runtime.kernels import QLinear

    for qt in qtypes:
        raws = [torch.from_numpy(quantize(w, qt)) for w in weights]

        def convert(raws=raws, qt=qt):
            return [QLinear.from_raw(r, qt, s, dtype) for r, s in zip(raws, shapes, strict=True)]

        gate, up, down = convert()
        res = {}
        for t in tokens:
            x = torch.randn(int(t), d_in).to(dtype)

            def ffn(x=x, gate=gate, up=up, down=down):
                return down(torch.nn.functional.silu(gate(x)) * up(x))

            res[f"T{t}_s"] = _median_time(ffn, stat=min)
        res["convert_s"] = _median_time(convert, repeats=3, stat=min)
        res["bytes"] = int(sum(r.numel() for r in raws))
        ggml_times = _probe_ggml(raws, qt, shapes, tokens, d_in)
        if ggml_times:
            res["ggml"] = ggml_times
        out[qt] = res
    return out


def _probe_ggml(raws, qt: str, shapes, tokens, d_in: int) -> dict | None:
    """The same expert computed by ggml on its GGUF bytes (no conversion: the bytes read are
    the bytes computed on, repacked in place where ggml has a layout for them):
    {"T1_s": .., "T64_s": ..}, or None where ggml cannot."""
    from ..runtime import ggml
    from ..runtime.pack import UNPACKED_TYPES

    if not ggml.available() or qt not in ggml.TYPES or qt in UNPACKED_TYPES:
        return None
    # as the store holds them: repacked where ggml has an interleaved layout here (a copy)
    raws = [r.clone() for r in raws]
    mats = [
        ggml.repack(ggml.Weight(r.data_ptr(), qt, tuple(int(v) for v in s)))
        for r, s in zip(raws, shapes, strict=True)
    ]
    threads = ggml.threads()
    ggml.set_threads(1)
    try:
        one = ggml.ExpertFFN(*mats)
        res = {}
        for t in tokens:
            x = torch.randn(int(t), d_in)
            run = (lambda x=x: one(x)) if t == 1 else (lambda x=x: ggml.ffn(x, *mats))
            res[f"T{t}_s"] = _median_time(run, stat=min)
        return res
    finally:
        ggml.set_threads(threads)


# --------------------------------------------------------------------------- all of it


def _qtype_of(path: Path) -> str:
    """ "experts-high-Q4_K.gguf" -> "Q4_K"."""
    return Path(path).name.removesuffix(".gguf").rsplit("-", 1)[-1]


def profile_device(
    shard_paths: dict[str, Path],
    expert_shapes,
    *,
    quick: bool = False,
    max_bytes: int | None = None,
) -> dict:
    """Every probe above as one JSON-serialisable dict. `shard_paths` maps precision name ->
    expert shard ("experts-<precision>-<TYPE>.gguf"); reads use the "high" one (else the
    largest), kernels every TYPE named. quick=True: fewer points and bytes (tests, CI).
    max_bytes: what the probes' buffers may take together (under a memory limit)."""
    paths = {k: Path(v) for k, v in shard_paths.items()}
    read_path = paths.get("high") or max(paths.values(), key=lambda p: p.stat().st_size)
    qtypes = list(dict.fromkeys(_qtype_of(p) for p in paths.values()))
    if quick:
        kw = dict(request_sizes=(1 << 20, 4 << 20), queue_depths=(1, 2), total_bytes=16 << 20)
        ram_bytes = 32 << 20
    else:
        kw, ram_bytes = {}, 256 << 20
    if max_bytes is not None:
        # the RAM copy holds two buffers; a read point one request per thread (up to 4)
        ram_bytes = max(min(ram_bytes, max_bytes // 4), 1 << 20)
        sizes = kw.get("request_sizes", (1 << 20, 8 << 20, 32 << 20))
        kw["request_sizes"] = tuple(r for r in sizes if 4 * r <= max_bytes // 2) or (1 << 20,)
    direct, refused = probe_reads(read_path, direct=True, **kw)
    buffered, _ = probe_reads(read_path, direct=False, **kw)
    return {
        "fingerprint": fingerprint(read_path),
        # the conditions of this run (not of the machine): noisy neighbours slow every probe
        "torch_threads": torch.get_num_threads(),
        "load_avg": list(os.getloadavg()),
        "reads": {
            "file": str(read_path),
            "direct": [asdict(p) for p in direct],
            "buffered": [asdict(p) for p in buffered],
            "buffered_pass": "second (page cache warm)",
            "direct_refused": refused,
        },
        "best_direct_gbps": max((p.gbps for p in direct), default=None),
        "buffered_gbps": max((p.gbps for p in buffered), default=None),
        "ram_gbps": probe_ram_bandwidth(ram_bytes),
        "h2d_gbps": probe_h2d(ram_bytes),
        "kernels": probe_kernels([tuple(s) for s in expert_shapes], qtypes),
    }

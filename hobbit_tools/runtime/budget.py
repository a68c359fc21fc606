"""Memory budgets: parsing "6GiB", "1.5 GB", "30%" (of the high-precision expert bytes) or
bytes, and the default budget from what this process may really use.

What a process may use is the smaller of the host's MemAvailable and what its cgroup still
allows (v1: memory.limit_in_bytes less usage, v2: memory.max less memory.current, each less
the reclaimable file cache, over every ancestor cgroup), read before anything large is
loaded. The expert budget is that, less the dense weights, the KV cache and the runtime's
own working floor. `root` parametrises "/" so tests can fake /proc and /sys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import HobbitError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}  # fmt: skip

# Beyond the dense weights, KV and the expert cache, what a running model allocates: prefill
# activations and routing buffers, staging buffers for direct reads, allocator slack. The
# interpreter and torch themselves are already counted in the usage read at start.
RUNTIME_FLOOR = 48 << 20
UNKNOWN_AVAILABLE = 4 << 30  # neither /proc/meminfo nor a cgroup says: assume a small machine
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2^63-1


def parse_memory(spec: int | float | str, expert_bytes: int) -> int:
    """A budget in bytes from bytes, a size ("1.5GiB", "800MB") or a share ("30%") of
    `expert_bytes`."""
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return int(spec)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*", str(spec))
    if not m or (m.group(2) != "%" and m.group(2).lower() not in _UNITS):
        raise HobbitError(
            f"memory budget {spec!r} is not understood: use bytes, a size like '1.5GiB' or "
            "'800MB', or a share of the expert bytes like '30%'"
        )
    value, unit = float(m.group(1)), m.group(2)
    if unit == "%":
        return int(expert_bytes * value / 100)
    return int(value * _UNITS[unit.lower()])


@dataclass(frozen=True)
class Available:
    """Bytes this process may still allocate, and what set that number."""

    bytes: int
    source: str  # "MemAvailable", "cgroup v1 memory limit (/path)", ...


def available_memory(root: str | Path = "/") -> Available:
    """The smaller of MemAvailable and every cgroup limit above this process, less usage."""
    root = Path(root)
    found = []
    mem = _meminfo_available(root)
    if mem is not None:
        found.append(Available(mem, "MemAvailable"))
    found += _cgroup_v1(root) + _cgroup_v2(root)
    if not found:
        return Available(UNKNOWN_AVAILABLE, "unknown (assumed 4 GiB)")
    return min(found, key=lambda a: a.bytes)


@dataclass(frozen=True)
class DefaultBudget:
    """The expert budget when none is given: `budget` bytes, `fits` when every expert at
    high precision (`experts` bytes) fits in it (then they are simply loaded)."""

    budget: int
    experts: int
    available: Available
    dense: int
    kv: int
    floor: int = RUNTIME_FLOOR

    @property
    def fits(self) -> bool:
        return self.budget >= self.experts

    def describe(self) -> str:
        mib = 1 << 20
        return (
            f"{self.available.bytes / mib:,.0f} MiB may be used ({self.available.source}), "
            f"less dense {self.dense / mib:,.0f} MiB, KV {self.kv / mib:,.0f} MiB and "
            f"runtime floor {self.floor / mib:,.0f} MiB = expert budget "
            f"{max(self.budget, 0) / mib:,.0f} MiB for {self.experts / mib:,.0f} MiB of experts"
        )


def default_budget(
    experts: int, dense: int, kv: int, available: Available | None = None
) -> DefaultBudget:
    """What is left for experts of `experts` bytes once dense, KV and the floor are held."""
    available = available or available_memory()
    budget = available.bytes - dense - kv - RUNTIME_FLOOR
    return DefaultBudget(min(budget, experts), experts, available, dense, kv)


def _meminfo_available(root: Path) -> int | None:
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def own_cgroups(root: Path) -> dict[str, str]:
    """/proc/self/cgroup as {controller or "" for v2: path}."""
    out = {}
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                out[controller] = parts[2]
    return out


def cgroup_ancestors(mount: Path, path: str) -> list[Path]:
    """The cgroup dir of `path` under `mount` and every parent up to the mount, where they
    exist (in a container the mount often shows only the process's own subtree)."""
    rel = [p for p in path.strip("/").split("/") if p]
    dirs = [mount.joinpath(*rel[:i]) for i in range(len(rel), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_v1(root: Path) -> list[Available]:
    path = own_cgroups(root).get("memory")
    mount = root / "sys/fs/cgroup/memory"
    if path is None or not mount.is_dir():
        return []
    out = []
    for d in cgroup_ancestors(mount, path):
        limit = read_int(d / "memory.limit_in_bytes")
        usage = read_int(d / "memory.usage_in_bytes")
        if limit is None or usage is None or limit >= _NO_LIMIT:
            continue
        used = usage - _stat(d / "memory.stat", "total_inactive_file")
        out.append(Available(max(limit - used, 0), f"cgroup v1 memory limit ({d})"))
    return out


def _cgroup_v2(root: Path) -> list[Available]:
    path = own_cgroups(root).get("")
    mount = root / "sys/fs/cgroup"
    if path is None or not (mount / "cgroup.controllers").is_file():
        return []
    out = []
    for d in cgroup_ancestors(mount, path):
        limit = read_int(d / "memory.max")
        usage = read_int(d / "memory.current")
        if limit is None or usage is None:
            continue
        used = usage - _stat(d / "memory.stat", "inactive_file")
        out.append(Available(max(limit - used, 0), f"cgroup v2 memory.max ({d})"))
    return out


# glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB),
# after which big temporaries (prefill activations, the profile's calibration batches) come
# from the heap and stay in the process after they are freed: measured, `hobbit profile`
# kept ~90 MiB it no longer used, and was killed under a memory limit it fitted. A fixed
# threshold returns every large block to the system when it is freed.
# Each thread that allocates gets a glibc arena of its own, and what it frees stays there
# (measured: a prefill's helper thread kept ~20 MiB, and a 380 MiB-limited run then decoded
# at 2.8 tok/s against 12.4): one arena for all.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_LARGE = 1 << 20


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def return_large_blocks() -> None:
    """Make freed large blocks go back to the system, and every thread allocate from one
    arena (glibc; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _LARGE)
        libc.mallopt(_M_TRIM_THRESHOLD, _LARGE)
        libc.mallopt(_M_ARENA_MAX, 1)


def trim() -> None:
    """Give the heap's free memory back to the system now (between phases of a profile)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)

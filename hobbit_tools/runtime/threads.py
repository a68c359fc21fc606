"""How many compute threads: the CPUs this process may use that nothing else keeps busy.

ggml's kernels scale with threads (a Q8_0 decode on 2 cores: 33 -> 50 tok/s), but a worker
that waits for a CPU another process holds stalls every call of every layer (the same decode
beside one busy process: 15 tok/s on 2 threads, 32 on one). So the default is measured, not
assumed: the CPUs of this process's affinity mask, capped by its cgroup's CPU quota, less
those another process kept busy over a short look at /proc/stat when the model loads.
`root` parametrises "/" so tests can fake /proc and /sys.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from .budget import cgroup_ancestors, own_cgroups, read_int

BUSY = 0.5  # a CPU another process used for more than this share of the look is taken
LOOK_S = 0.05


def usable_cpus(root: str | Path = "/") -> list[int]:
    """The CPUs this process may run on, at most as many as its cgroup's quota allows."""
    root = Path(root)
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    quota = _cpu_quota(root)
    return cpus[: max(1, math.ceil(quota))] if quota else cpus


def busy_cpus(cpus: list[int], root: str | Path = "/", look_s: float = LOOK_S) -> int:
    """How many of `cpus` something else kept busy (more than BUSY of their time) while this
    process slept for `look_s`."""
    root = Path(root)
    before = cpu_times(root)
    time.sleep(look_s)
    return busy_between(before, cpu_times(root), cpus)


def busy_between(before: dict, after: dict, cpus: list[int]) -> int:
    """Of `cpus`, how many were busy more than BUSY between two `cpu_times` readings."""
    busy = 0
    for c in cpus:
        if c in before and c in after:
            (b0, t0), (b1, t1) = before[c], after[c]
            if t1 > t0 and (b1 - b0) / (t1 - t0) > BUSY:
                busy += 1
    return busy


def default_threads(root: str | Path = "/") -> int:
    """Usable CPUs less the busy ones, at least one."""
    cpus = usable_cpus(root)
    return max(1, len(cpus) - busy_cpus(cpus, root))


def cpu_times(root: Path) -> dict[int, tuple[int, int]]:
    """/proc/stat per CPU: {cpu: (busy jiffies, all jiffies)} (idle and iowait are not busy)."""
    out = {}
    try:
        lines = (root / "proc/stat").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            v = [int(f) for f in fields[:8]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            out[int(name[3:])] = (sum(v) - idle, sum(v))
    return out


def _cpu_quota(root: Path) -> float | None:
    """CPUs' worth of time the cgroups above this process allow (None: no quota)."""
    quotas = []
    for controller, path in own_cgroups(root).items():
        if controller == "":  # v2: cpu.max is "QUOTA PERIOD" or "max PERIOD"
            for d in cgroup_ancestors(root / "sys/fs/cgroup", path):
                try:
                    q, p = (d / "cpu.max").read_text().split()
                    if q != "max":
                        quotas.append(int(q) / int(p))
                except (OSError, ValueError):
                    pass
        elif "cpu" in controller.split(","):
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                for d in cgroup_ancestors(root / "sys/fs/cgroup" / mount, path):
                    q = read_int(d / "cpu.cfs_quota_us")
                    p = read_int(d / "cpu.cfs_period_us")
                    if q and p and q > 0:
                        quotas.append(q / p)
    return min(quotas) if quotas else None

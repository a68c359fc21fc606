"""Default budgets from what the process may really use: MemAvailable and cgroup v1/v2
limits, read from a faked /proc and /sys root; and `load` choosing resident or offloading."""

from pathlib import Path

import pytest
from tiny_models import prepared_pair, quantizable

import hobbit_tools
from hobbit_tools.errors import HobbitError
from hobbit_tools.runtime import budget
from hobbit_tools.runtime.budget import Available, available_memory, default_budget

MiB = 1 << 20


def fake_root(
    root: Path, *, meminfo_mib=20_000, cgroup: str = "", v1=None, v2=None, inactive_file=0
):
    """A root with /proc/meminfo, /proc/self/cgroup and cgroup files: v1/v2 are
    {relative cgroup dir: (limit, usage)} with limit None for "no limit"."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/meminfo").write_text(
        f"MemTotal:       32000000 kB\nMemAvailable:   {meminfo_mib * 1024} kB\n"
    )
    lines = []
    if v1 is not None:
        lines.append(f"4:memory:{cgroup}")
        for rel, (limit, usage) in v1.items():
            d = root / "sys/fs/cgroup/memory" / rel
            d.mkdir(parents=True, exist_ok=True)
            (d / "memory.limit_in_bytes").write_text(
                str(limit if limit is not None else 9223372036854771712)
            )
            (d / "memory.usage_in_bytes").write_text(str(usage))
            (d / "memory.stat").write_text(f"cache 0\ntotal_inactive_file {inactive_file}\n")
    if v2 is not None:
        lines.append(f"0::{cgroup}")
        (root / "sys/fs/cgroup").mkdir(parents=True, exist_ok=True)
        (root / "sys/fs/cgroup/cgroup.controllers").write_text("cpu memory\n")
        for rel, (limit, usage) in v2.items():
            d = root / "sys/fs/cgroup" / rel
            d.mkdir(parents=True, exist_ok=True)
            (d / "memory.max").write_text("max" if limit is None else str(limit))
            (d / "memory.current").write_text(str(usage))
            (d / "memory.stat").write_text(f"anon 0\ninactive_file {inactive_file}\n")
    (root / "proc/self/cgroup").write_text("\n".join(lines) + "\n")
    return root


def test_meminfo_alone(tmp_path):
    a = available_memory(fake_root(tmp_path, meminfo_mib=1000))
    assert a == Available(1000 * MiB, "MemAvailable")


def test_cgroup_v1_limit_less_usage_wins(tmp_path):
    root = fake_root(tmp_path, cgroup="/box", v1={"box": (700 * MiB, 250 * MiB)})
    a = available_memory(root)
    assert a.bytes == 450 * MiB and "cgroup v1" in a.source


def test_cgroup_v1_reclaimable_file_cache_is_not_used(tmp_path):
    root = fake_root(
        tmp_path, cgroup="/box", v1={"box": (700 * MiB, 600 * MiB)}, inactive_file=300 * MiB
    )
    assert available_memory(root).bytes == 400 * MiB


def test_cgroup_v1_unlimited_and_parent_limits(tmp_path):
    """No limit on the process's own cgroup, a tighter one on its parent: the parent's."""
    root = fake_root(
        tmp_path,
        cgroup="/svc/job",
        v1={"": (None, 0), "svc": (500 * MiB, 100 * MiB), "svc/job": (None, 90 * MiB)},
    )
    a = available_memory(root)
    assert a.bytes == 400 * MiB and a.source.endswith("svc)")


def test_cgroup_v1_without_limit_falls_back_to_meminfo(tmp_path):
    root = fake_root(tmp_path, meminfo_mib=3000, cgroup="/box", v1={"box": (None, 5)})
    assert available_memory(root) == Available(3000 * MiB, "MemAvailable")


def test_cgroup_v2_max_less_current(tmp_path):
    root = fake_root(
        tmp_path, cgroup="/user.slice/app", v2={"": (None, 0), "user.slice/app": (4 << 30, 1 << 30)}
    )
    a = available_memory(root)
    assert a.bytes == 3 << 30 and "cgroup v2" in a.source


def test_cgroup_v2_max_is_max(tmp_path):
    root = fake_root(tmp_path, meminfo_mib=2000, cgroup="/app", v2={"app": (None, 1 << 30)})
    assert available_memory(root).source == "MemAvailable"


def test_nothing_readable_assumes_a_small_machine(tmp_path):
    assert available_memory(tmp_path).bytes == budget.UNKNOWN_AVAILABLE


def test_default_budget_subtracts_dense_kv_and_floor():
    b = default_budget(
        experts=2000 * MiB, dense=100 * MiB, kv=20 * MiB, available=Available(700 * MiB, "x")
    )
    assert b.budget == 700 * MiB - 120 * MiB - budget.RUNTIME_FLOOR and not b.fits
    assert "expert budget" in b.describe()
    roomy = default_budget(100 * MiB, 10 * MiB, 1 * MiB, Available(8 << 30, "x"))
    assert roomy.fits and roomy.budget == 100 * MiB


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir):
    return prepared_pair(tmp_path_factory.mktemp("budget"), tokenizer_dir, **quantizable())


def test_load_without_memory_offloads_when_experts_do_not_fit(model, monkeypatch):
    full = hobbit_tools.load(model, config=False).info
    experts = full["full_cache_bytes"]
    extra = full["dense_bytes"] + full["kv_bytes"] + budget.RUNTIME_FLOOR
    tight = Available(extra + experts // 2, "cgroup v1 memory limit (/fake)")
    monkeypatch.setattr(budget, "available_memory", lambda: tight)
    rt = hobbit_tools.load(model, config=False)
    assert rt.info["policy"] == "lru"
    assert 0 < rt.info["cache_bytes"] <= experts // 2
    assert "cgroup v1" in rt.info["memory_source"]
    rt.generate("hello", max_new_tokens=4)
    assert rt.model.experts.stats()["bytes_read"] > 0


def test_load_without_memory_keeps_experts_resident_when_they_fit(model, monkeypatch):
    monkeypatch.setattr(budget, "available_memory", lambda: Available(8 << 30, "MemAvailable"))
    info = hobbit_tools.load(model, config=False).info
    assert info["policy"] == "resident" and "MemAvailable" in info["memory_source"]


def test_load_refuses_when_not_even_dense_fits(model, monkeypatch):
    monkeypatch.setattr(budget, "available_memory", lambda: Available(1 * MiB, "cgroup v2 (x)"))
    with pytest.raises(HobbitError, match="does not fit here"):
        hobbit_tools.load(model, config=False)

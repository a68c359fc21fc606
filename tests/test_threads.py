"""Compute threads: the default counts the CPUs this process may use (affinity, cgroup CPU
quota) less those another process keeps busy; torch keeps one thread unless it computes
experts; torch's OpenMP workers wait passively beside ggml's; llama.cpp's child loads
neither hobbit nor torch."""

import os
import subprocess
import sys
import time

import pytest
import torch
from tiny_models import prepared_pair, quantizable

import hobbit_tools
from hobbit_tools import llamacpp
from hobbit_tools.runtime import ggml, threads

STAT = """cpu  300 0 300 400 0 0 0 0 0 0
cpu0 100 0 100 200 0 0 0 0 0 0
cpu1 {busy} 0 0 {idle} 0 0 0 0 0 0
intr 12345
"""


def _fake_root(tmp_path, stat, cgroup=None, files=None):
    (tmp_path / "proc").mkdir(exist_ok=True)
    (tmp_path / "proc/stat").write_text(stat)
    (tmp_path / "proc/self").mkdir(exist_ok=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup or "0::/\n")
    for name, text in (files or {}).items():
        path = tmp_path / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_a_cpu_another_process_keeps_busy_is_counted(tmp_path):
    before = threads.cpu_times(_fake_root(tmp_path, STAT.format(busy=100, idle=100)))
    after = threads.cpu_times(_fake_root(tmp_path, STAT.format(busy=190, idle=110)))
    assert before[1] == (100, 200) and after[0] == before[0]
    assert threads.busy_between(before, after, [0, 1]) == 1  # cpu1: 90 of 100 jiffies busy
    assert threads.busy_between(before, after, [0]) == 0  # cpu0 did nothing in between


@pytest.mark.parametrize(
    "cgroup, files, cap",
    [
        ("0::/job\n", {"job/cpu.max": "50000 100000\n"}, 1),  # v2: half a CPU -> one thread
        ("0::/job\n", {"job/cpu.max": "max 100000\n"}, None),
        ("4:cpu,cpuacct:/job\n", {"cpu,cpuacct/job/cpu.cfs_quota_us": "100000\n",
                                  "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"}, 1),
        ("4:cpu,cpuacct:/job\n", {"cpu,cpuacct/job/cpu.cfs_quota_us": "-1\n",
                                  "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"}, None),
    ],
)  # fmt: skip
def test_the_cgroup_cpu_quota_caps_the_usable_cpus(tmp_path, cgroup, files, cap):
    root = _fake_root(tmp_path, STAT.format(busy=0, idle=0), cgroup, files)
    mine = sorted(os.sched_getaffinity(0))
    assert threads.usable_cpus(root) == (mine[:cap] if cap else mine)


def _in_child(code: str, **env) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_default_uses_only_the_cpus_of_the_affinity_mask():
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " \
           "from hobbit_tools.runtime import ggml; print(ggml.threads())"  # fmt: skip
    assert _in_child(code) == "1"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPUs")
def test_the_default_leaves_out_a_cpu_another_process_keeps_busy():
    cpu = max(os.sched_getaffinity(0))
    hog = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, time\nos.sched_setaffinity(0, {{{cpu}}})\n"
            "end = time.time() + 5\nwhile time.time() < end: pass",
        ]  # fmt: skip
    )
    try:
        time.sleep(0.3)
        assert threads.busy_cpus([cpu]) == 1
        assert threads.default_threads() <= len(threads.usable_cpus()) - 1
    finally:
        hog.kill()
        hog.wait()


def test_torchs_openmp_workers_wait_passively_unless_the_user_says_otherwise():
    code = "import hobbit_tools, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "PASSIVE"
    assert _in_child(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_llamacpps_child_runs_without_hobbit_torch_or_hobbits_openmp_setting():
    if hobbit_tools.OMP_SET_BY_HOBBIT:
        assert "OMP_WAIT_POLICY" not in llamacpp.child_env()
    out = subprocess.run(
        [sys.executable, "-P", "-X", "importtime", str(llamacpp.CHILD), "--help"],
        capture_output=True, text=True, env=llamacpp.child_env(),
    )  # fmt: skip
    assert out.returncode == 0 and "decode speed" in out.stdout
    loaded = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert not {m.split(".")[0] for m in loaded} & {"torch", "hobbit_tools", "numpy"}


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir):
    return prepared_pair(tmp_path_factory.mktemp("threads"), tokenizer_dir, **quantizable())


@pytest.mark.skipif(not ggml.available(), reason="ggml's library does not load here")
def test_torch_keeps_one_thread_unless_it_computes_experts(model):
    before = torch.get_num_threads(), ggml.set_threads(2)
    try:
        rt = hobbit_tools.load(model)
        assert rt.info["kernels"] == {"high": "ggml"}
        assert rt.info["threads"] == {"ggml": 2, "torch": 1} and torch.get_num_threads() == 1
        rt = hobbit_tools.load(model, kernels="torch", memory="50%")
        assert rt.info["threads"] == {"ggml": 2, "torch": 2}
    finally:
        torch.set_num_threads(before[0])
        ggml.set_threads(before[1])


def test_profile_keeps_the_callers_thread_setting_unless_told(monkeypatch):
    from hobbit_tools.profile import profiler

    seen = []
    monkeypatch.setattr(profiler, "_profile", lambda *a: seen.append(ggml.threads()) or {})
    before = ggml.set_threads(1)
    try:
        profiler.profile("unused")  # no threads given: runs on the caller's setting
        profiler.profile("unused", threads=2)
        assert seen == [1, 2]
        assert ggml.threads() == 1  # restored after the explicit one
    finally:
        ggml.set_threads(before)

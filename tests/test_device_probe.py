"""Device probes: each gives sane positive numbers on a small file, quickly."""

import errno
import json
import os

import numpy as np
import pytest
import torch

from hobbit_tools.profile import device
from hobbit_tools.profile.device import ReadProbe
from hobbit_tools.runtime import ggml

QUICK = dict(request_sizes=(1 << 20, 4 << 20), queue_depths=(1, 2), total_bytes=8 << 20)


@pytest.fixture
def shard(tmp_path):
    p = tmp_path / "experts-high-BF16.gguf"
    p.write_bytes(np.random.default_rng(0).bytes(4 << 20))
    return p


def test_fingerprint_is_stable_and_complete(shard):
    a, b = device.fingerprint(shard), device.fingerprint(shard)
    assert a == b
    assert a["cpu"] and a["cores"] >= 1 and a["ram_bytes"] > 0
    assert a["torch"] == torch.__version__
    assert a["storage"]["device"].count(":") == 1
    assert device.fingerprint()["storage"] is None
    json.dumps(a)


@pytest.mark.parametrize("direct", [True, False])
def test_probe_reads(shard, direct):
    probes, reason = device.probe_reads(shard, direct=direct, **QUICK)
    if direct and reason is not None:  # a filesystem without O_DIRECT: fine, but say why
        assert probes == [] and isinstance(reason, str)
        return
    assert reason is None
    assert len(probes) == 4
    mode = "direct" if direct else "buffered"
    for p in probes:
        assert isinstance(p, ReadProbe) and p.mode == mode
        assert p.gbps > 0 and p.request_bytes % 4096 == 0
    assert {(p.request_bytes, p.queue_depth) for p in probes} == {
        (r, q) for r in QUICK["request_sizes"] for q in QUICK["queue_depths"]
    }


def test_small_file_gets_smaller_requests(tmp_path):
    p = tmp_path / "small.bin"
    p.write_bytes(os.urandom(100_000))
    for direct in (True, False):
        probes, reason = device.probe_reads(
            p, direct=direct, queue_depths=(1,), total_bytes=1 << 20
        )
        if reason is None:
            assert probes and all(0 < q.request_bytes <= 100_000 for q in probes)
            assert all(q.gbps > 0 for q in probes)
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"x" * 100)
    assert device.probe_reads(tiny, direct=False)[0] == []
    assert "smaller" in device.probe_reads(tiny, direct=False)[1]


def test_direct_refused_without_o_direct(shard, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    probes, reason = device.probe_reads(shard, **QUICK)
    assert probes == [] and "O_DIRECT" in reason


def test_direct_refused_by_filesystem(shard, monkeypatch):
    flag = getattr(os, "O_DIRECT", 0)
    real_open = os.open

    def refusing_open(path, flags, *a, **k):
        if flag and flags & flag:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "O_DIRECT", flag or 0x4000, raising=False)
    monkeypatch.setattr(os, "open", refusing_open)
    probes, reason = device.probe_reads(shard, **QUICK)
    assert probes == [] and "O_DIRECT" in reason and "Invalid argument" in reason
    # the caller's fallback still works
    probes, reason = device.probe_reads(shard, direct=False, **QUICK)
    assert reason is None and probes and all(p.gbps > 0 for p in probes)


def test_ram_and_h2d(monkeypatch):
    assert device.probe_ram_bandwidth(8 << 20) > 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.probe_h2d(1 << 20) is None


def test_probe_kernels():
    shapes = [(256, 256), (256, 256), (256, 256)]
    res = device.probe_kernels(shapes, ["BF16", "Q8_0", "Q4_K"])
    assert set(res) == {"BF16", "Q8_0", "Q4_K"}
    for q, r in res.items():
        ggml_times = r.pop("ggml", None)
        assert set(r) == {"T1_s", "T64_s", "convert_s", "bytes"}
        assert all(r[k] > 0 for k in r)
        # quantized types are also timed on ggml's kernels (where the library loads)
        if q != "BF16" and ggml.available():
            assert set(ggml_times) == {"T1_s", "T64_s"} and all(v > 0 for v in ggml_times.values())
        else:
            assert ggml_times is None
    assert res["BF16"]["bytes"] == 3 * 256 * 256 * 2
    assert res["Q4_K"]["bytes"] < res["Q8_0"]["bytes"] < res["BF16"]["bytes"]
    assert set(device.probe_kernels(shapes[:1] * 3, ["BF16"], tokens=(2,))["BF16"]) >= {"T2_s"}


def test_profile_device_quick(shard, tmp_path):
    low = tmp_path / "experts-low-Q4_K.gguf"
    low.write_bytes(b"\0" * 8192)
    shapes = [(512, 256), (512, 256), (256, 512)]
    prof = device.profile_device({"high": shard, "low": low}, shapes, quick=True)
    json.dumps(prof)
    assert prof["fingerprint"]["cores"] >= 1
    assert set(prof["kernels"]) == {"BF16", "Q4_K"}
    assert prof["ram_gbps"] > 0 and prof["buffered_gbps"] > 0
    if prof["reads"]["direct_refused"] is None:
        assert prof["best_direct_gbps"] > 0 and prof["reads"]["direct"]
    else:
        assert prof["best_direct_gbps"] is None and prof["reads"]["direct"] == []
    assert all(p["mode"] == "buffered" for p in prof["reads"]["buffered"])

"""hobbit bench and the benchmark-model makers."""

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import make_checkpoint, quantizable

import hobbit_tools
from hobbit_tools.cli import main
from hobbit_tools.errors import HobbitError
from hobbit_tools.synth import SynthShape, make_random_checkpoint, widen_checkpoint

SHAPE = quantizable()


@pytest.fixture(scope="module")
def hf(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("bench")
    make_checkpoint("mixtral", d / "hf", tokenizer_dir, **SHAPE)
    return d


def test_widening_preserves_the_function(hf):
    widen_checkpoint(hf / "hf", hf / "wide", expert_ffn=768)
    hobbit_tools.prepare(hf / "hf", hf / "m1", high="F32")
    hobbit_tools.prepare(hf / "wide", hf / "m2", high="F32")
    a, b = hobbit_tools.load(hf / "m1"), hobbit_tools.load(hf / "m2")
    ids = a.encode("Friends, Romans, countrymen, lend me your ears")
    assert torch.allclose(a.logits(ids), b.logits(ids), atol=1e-5)
    m1 = json.loads((hf / "m1" / "manifest.json").read_text())
    m2 = json.loads((hf / "m2" / "manifest.json").read_text())
    assert m2["expert_bytes"]["high"] == 3 * m1["expert_bytes"]["high"]


def test_random_checkpoint_prepares(tmp_path):
    shape = SynthShape(hidden=256, ffn=512, layers=2, experts=4, heads=4, kv_heads=2, vocab=512)
    make_random_checkpoint(tmp_path / "hf", shape, shard_bytes=1 << 20)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    m = hobbit_tools.prepare(tmp_path / "hf", tmp_path / "m")
    assert m["num_experts"] == 4 and m["types"] == {"dense": "BF16", "high": "Q8_0", "low": "Q4_K"}


def test_bench_runs_strategies_side_by_side(hf, tmp_path):
    hobbit_tools.prepare(hf / "hf", hf / "paired", high="Q8_0", low="Q4_K")
    plot = tmp_path / "bench.png"
    r = CliRunner().invoke(
        main,
        ["bench", str(hf / "paired"), "--memory", "45%,70%", "--policies", "resident,lru,hobbit",
         "-n", "6", "--json", "--plot", str(plot)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    runs = {(x["policy"], x["memory"]): x for x in out["runs"]}
    assert set(runs) == {
        ("resident", "all"),
        ("lru", "45%"),
        ("hobbit", "45%"),
        ("lru", "70%"),
        ("hobbit", "70%"),
    }
    assert runs[("lru", "45%")]["speedup_vs_lru"] == 1.0
    assert runs[("resident", "all")]["bytes_read_per_token"] == 0
    assert (
        runs[("lru", "45%")]["bytes_read_per_token"]
        >= runs[("lru", "70%")]["bytes_read_per_token"]
        > 0
    )
    assert runs[("hobbit", "45%")]["share"]["low"] > 0
    assert out["bound_tokens_per_s"] > 0 and out["direct_read_gbps"] > 0
    # every run against its own bound, and its time outside I/O waits against resident's
    res = out["resident_compute_s_per_token"]
    assert res == runs[("resident", "all")]["compute_s_per_token"] > 0
    for x in runs.values():
        b = x["bound_tokens_per_s"]
        assert x["share_of_bound"] == pytest.approx(x["decode_tokens_per_s"] / b)
        assert x["outside_io_vs_resident"] == pytest.approx(x["compute_s_per_token"] / res)
        # bound by its reads or by compute: resident's, or its own where less (low, skips)
        compute = min(res, x["compute_s_per_token"])
        reads = x["bytes_read_per_token"] / (out["direct_read_gbps"] * 1e9)
        assert b == pytest.approx(1 / max(reads, compute))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no run reads faster than the bandwidth its bound assumes
    for x in runs.values():
        rate = x["bytes_read_per_token"] * x["decode_tokens_per_s"] / 1e9
        assert rate <= out["direct_read_gbps"] * (1 + 1e-9)
    assert out["direct_read_gbps"] >= out["direct_read_gbps_probed"]


def test_the_bound_never_assumes_less_bandwidth_than_a_run_reached():
    """A short probe on a shared disk can read low: the bound then takes the fastest rate a
    run read at (the device did at least that), so no run is faster than its bound for
    want of bandwidth."""
    from hobbit_tools.bench import _bandwidth

    runs = [
        {"bytes_read_per_token": 300e6, "decode_tokens_per_s": 5.0},  # 1.5 GB/s
        {"bytes_read_per_token": 150e6, "decode_tokens_per_s": 8.0},  # 1.2 GB/s
        {"bytes_read_per_token": 0.0, "decode_tokens_per_s": 150.0},  # resident
    ]
    assert _bandwidth(1.1, runs) == pytest.approx(1.5)
    assert _bandwidth(2.0, runs) == 2.0
    assert _bandwidth(None, runs) == pytest.approx(1.5)
    assert _bandwidth(None, runs[2:]) is None


def test_synth_presets_are_all_offered_by_the_cli():
    from hobbit_tools.cli import synth
    from hobbit_tools.synth import PRESETS

    choices = next(p for p in synth.params if p.name == "preset").type.choices
    assert sorted(choices) == sorted(PRESETS)
    q = PRESETS["qwen3-routing"]
    assert (q.layers, q.experts, q.top_k) == (48, 128, 8)  # Qwen3-30B-A3B's routing


def test_policy_switches_parse_and_bad_ones_are_named():
    from hobbit_tools.bench import parse_policy

    o = parse_policy("hobbit:t1=0.5:t2=0.85:cache=lfu:prefetch=1:skip=renormalize")
    assert o["cache_policy"] == "lfu" and o["prefetch_depth"] == 1
    assert o["overrides"] == {"t1": 0.5, "t2": 0.85, "skip": "renormalize"}
    with pytest.raises(HobbitError, match="unknown switch 'fast'"):
        parse_policy("lru:fast")


def test_repeats_are_interleaved_and_summarised_by_the_median(hf):
    from hobbit_tools.bench import bench

    model = hf / "paired"
    if not model.exists():
        hobbit_tools.prepare(hf / "hf", model, high="Q8_0", low="Q4_K")
    out = bench(str(model), ["45%"], ["lru", "hobbit:t1=0.3:t2=0.5"], max_new_tokens=4, repeat=2)
    lru, hob = out["runs"]
    assert len(lru["decode_tokens_per_s_runs"]) == 2 and out["repeat"] == 2
    tps = sorted(hob["decode_tokens_per_s_runs"])
    assert hob["decode_tokens_per_s"] == pytest.approx(sum(tps) / 2)
    assert lru["speedup_vs_lru"] == 1.0
    assert hob["share"]["skip"] > 0  # T2 = 0.5: a last-ranked expert has s >= 0.5

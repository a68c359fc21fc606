"""hobbit profile: fitting recovers known answers; the tuned config is used, and checked."""

import json
import shutil

import pytest
import torch
from tiny_models import prepared_pair, quantizable

import hobbit_tools
from hobbit_tools.errors import HobbitError
from hobbit_tools.profile.fit import (
    T_GRID,
    expected_cost,
    fit_prefetch_depth,
    fit_thresholds,
    weight_grid,
)
from hobbit_tools.profile.profiler import profile

SHAPE = quantizable(num_experts_per_tok=3)


def synthetic_weights(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, 3, generator=g) ** 3
    return {0: w / w.sum(-1, keepdim=True)}


def test_fit_recovers_known_thresholds():
    """A synthetic model whose perplexity breaks when T1 < 0.4 or T2 < 0.7: the fit must
    land exactly on that corner, the cheapest admissible point."""

    def evaluate(t1, t2):
        return 10.0 * (1.2 if t1 < 0.4 or t2 < 0.7 else 1.0)

    def proxy(t1, t2):  # an error estimate that rises as the thresholds fall, as ppl does
        return (1 - t1) + 2 * (1 - t2)

    cost = expected_cost(synthetic_weights(), {"high": 1.0, "low": 0.3, "skip": 0.0})
    fit = fit_thresholds(evaluate, cost, proxy, base_ppl=10.0, budget=0.01)
    assert (fit["t1"], fit["t2"]) == (0.4, 0.7)
    assert fit["cost"] < cost(1.0, 1.0)
    # bisection over the front: a handful of end-to-end runs instead of one per candidate
    assert len(fit["tried"]) <= 8 < fit["candidates"]


def test_fit_bisection_finds_the_cheapest_pair_the_sequential_scan_finds():
    """On a model whose perplexity is a function of the error estimate, bisecting the front
    lands where trying every candidate from the cheapest up would."""
    cost = expected_cost(synthetic_weights(), {"high": 1.0, "low": 0.3, "skip": 0.0})
    err = expected_cost(synthetic_weights(seed=1), {"high": 0.0, "low": 0.2, "skip": 1.0})
    for limit in (0.05, 0.2, 0.5, 1.0):

        def evaluate(t1, t2, limit=limit):
            return 10.0 * (1.0 + 0.01 * err(t1, t2) / limit)

        fit = fit_thresholds(evaluate, cost, err, base_ppl=10.0, budget=0.01)
        pairs = [(a, b) for a in T_GRID for b in T_GRID if b >= a]
        scan = min(
            (p for p in pairs if evaluate(*p) <= 10.0 * 1.01),
            key=lambda t: (cost(*t), -t[0], -t[1]),
        )
        assert (fit["t1"], fit["t2"]) == scan


def test_fit_keeps_all_high_when_nothing_meets_the_budget():
    cost = expected_cost(synthetic_weights(), {"high": 1.0, "low": 0.3})
    fit = fit_thresholds(
        lambda a, b: 11.0 if (a, b) != (1.0, 1.0) else 10.0,
        cost,
        lambda a, b: 2 - a - b,
        10.0,
        max_evals=100,
    )
    assert (fit["t1"], fit["t2"]) == (1.0, 1.0)


def test_expected_cost_falls_with_lower_thresholds():
    cost = expected_cost(synthetic_weights(), {"high": 1.0, "low": 0.25, "skip": 0.0})
    assert cost(1.0, 1.0) == pytest.approx(3.0)  # three experts a token, all high
    assert cost(0.0, 0.0) == pytest.approx(1.0)  # only the top-1 (s = 0) is kept
    assert cost(1.0, 1.0) > cost(0.6, 1.0) > cost(0.6, 0.9)


def test_prefetch_depth_from_recall():
    assert fit_prefetch_depth({1: 0.9, 2: 0.7, 3: 0.5}) == 2
    assert fit_prefetch_depth({1: 0.4, 2: 0.9}) == 0


def test_weight_grid_is_the_simplex():
    grid = weight_grid(0.25)
    assert len(grid) == 35 and all(abs(sum(w) - 1) < 1e-9 for w in grid)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("profiled")
    prepared_pair(d, tokenizer_dir, **SHAPE)
    result = profile(
        d / "model", memory="50%", max_tokens=600, window=128, trace_tokens=48, quick=True
    )
    return d, result


def test_profile_writes_config_and_report(profiled):
    d, result = profiled
    cfg = json.loads((d / "model" / "hobbit-config.json").read_text())
    assert cfg["kind"] == "hobbit-tuned-config" and cfg["version"] == 1
    assert set(cfg["runtime"]) >= {
        "memory",
        "t1",
        "t2",
        "prefetch_depth",
        "cache_policy",
        "low_share",
    }
    assert (
        cfg["made_for"]["device"]["cpu_count"]
        if "cpu_count" in cfg["made_for"]["device"]
        else cfg["made_for"]["device"]
    )
    report = (d / "model" / "profile-report.md").read_text()
    assert "## Chosen settings" in report and "## Why" in report
    assert result["device"]["ram_gbps"] > 0


def test_fitted_thresholds_meet_the_perplexity_budget(profiled):
    _, result = profiled
    f = result["fitted"]
    th = f["thresholds"]
    assert th["ppl"] <= f["base_ppl"] * 1.01 + 1e-9
    chosen = [t for t in th["tried"] if (t["t1"], t["t2"]) == (th["t1"], th["t2"])]
    assert chosen or (th["t1"], th["t2"]) == (1.0, 1.0)


@pytest.mark.parametrize("faster", [True, False])
def test_prefetch_is_kept_only_where_it_is_measured_faster(profiled, tmp_path, monkeypatch, faster):
    import hobbit_tools.profile.profiler as prof

    d, _ = profiled

    def timed(files, dtype, budget, chosen, depth, ids):
        assert chosen.prefetch_depth == 0 and depth >= 1  # the fitted strategy, both ways
        return {"depth": depth, "tokens": len(ids), "with_s": 1.0 if faster else 1.2,
                "without_s": 1.1}  # fmt: skip

    monkeypatch.setattr(prof, "_prefetch_timing", timed)
    monkeypatch.setattr(prof, "fit_prefetch_depth", lambda recall: 1)
    out = tmp_path / "cfg.json"
    result = profile(
        d / "model", memory="50%", max_tokens=300, window=128, trace_tokens=16, quick=True, out=out
    )
    assert result["runtime"]["prefetch_depth"] == (1 if faster else 0)
    report = out.with_name("profile-report.md").read_text()
    assert ("kept" if faster else "switched off") in report


def test_run_uses_the_tuned_config_by_default(profiled):
    d, result = profiled
    rt = hobbit_tools.load(d / "model")
    assert rt.info["config"].endswith("hobbit-config.json")
    assert rt.info["policy"] == "tuned"
    assert rt.info["strategy"]["cache"] == result["runtime"]["cache_policy"]
    assert hobbit_tools.load(d / "model", config=False).info["policy"] == "resident"
    assert hobbit_tools.load(d / "model", policy="lru", memory="50%").info["config"] is None


def test_config_for_other_shards_is_refused(profiled, tmp_path):
    d, _ = profiled
    other = tmp_path / "other"
    shutil.copytree(d / "model", other, symlinks=True)
    m = json.loads((other / "manifest.json").read_text())
    m["shards"][1]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(HobbitError, match="made for other shards"):
        hobbit_tools.load(other)


def test_config_from_another_device_warns(profiled, tmp_path):
    d, _ = profiled
    other = tmp_path / "other"
    shutil.copytree(d / "model", other, symlinks=True)
    cfg = json.loads((other / "hobbit-config.json").read_text())
    cfg["made_for"]["device"]["cpu"] = "a different processor"
    (other / "hobbit-config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="profiled on another device"):
        hobbit_tools.load(other)


def test_config_of_another_version_is_refused(profiled, tmp_path):
    d, _ = profiled
    other = tmp_path / "other"
    shutil.copytree(d / "model", other, symlinks=True)
    cfg = json.loads((other / "hobbit-config.json").read_text())
    (other / "hobbit-config.json").write_text(json.dumps({**cfg, "version": 7}))
    with pytest.raises(HobbitError, match="not a version-1 hobbit tuned config"):
        hobbit_tools.load(other)


def test_layer_by_layer_pass_gives_the_resident_model_logits(profiled):
    """walk() (one layer at a time, one expert per precision in memory) computes what the
    whole model with every expert resident computes."""
    from hobbit_tools.profile.calibrate import LayerExperts, Windows, walk
    from hobbit_tools.runtime.loader import ModelFiles, build_model
    from hobbit_tools.runtime.store import ExpertStore

    d, _ = profiled
    rt = hobbit_tools.load(d / "model", policy="resident", config=False, dtype="float32")
    files = ModelFiles(d / "model")
    model = build_model(files, None, torch.float32, 65)
    store = ExpertStore(files, ["high", "low"], torch.float32)
    windows = Windows.of(list(range(5, 70)), list(range(100, 230)), 64)
    backend = LayerExperts(store, None)
    assert all(slots.n == 1 for slots in backend.slots.values())
    hs = walk(model, windows, backend)
    for ids, h in zip(windows.inputs, hs, strict=True):
        rt.model.reset()
        want = rt.model.forward(torch.tensor(ids), all_logits=True)
        torch.testing.assert_close(model.logits(h), want, atol=2e-3, rtol=1e-3)
    store.close()

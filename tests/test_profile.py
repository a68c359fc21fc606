"""hobbit profile: fitting recovers known answers; the tuned config is used, and checked."""

import json
import shutil

import pytest
import torch
from tiny_models import prepared_pair, quantizable

import hobbit_tools
from hobbit_tools.errors import HobbitError
from hobbit_tools.profile.fit import (
    bisect_front,
    expert_choice,
    expert_front,
    expert_tables,
    fit_prefetch_depth,
    weight_grid,
)
from hobbit_tools.profile.profiler import calibration_parts, profile

SHAPE = quantizable(num_experts_per_tok=3)
COST = {"high": 1.0, "low": 0.4}


def synthetic_stats(sensitive=(0, 1), n=3000, experts=4, seed=0):
    """One MoE layer (index 1 of 2), top-2 over `experts`; skipping or taking the low copy
    of a `sensitive` expert costs 100x the error it costs the others."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(n)])
    w = torch.rand(n, 2, generator=g) + 0.05
    w = w / w.sum(-1, keepdim=True)
    big = torch.zeros(experts)
    big[list(sensitive)] = 1.0
    scale = 0.01 + big[ids]  # [n, 2]
    return {1: (ids, w, 0.3 * scale * w, scale * w)}


def tables_of(stats, **kw):
    return expert_tables(stats, COST, (2, 4), **kw)


def test_sensitive_experts_stay_high_and_insensitive_ones_go_first():
    tables = tables_of(synthetic_stats())
    front = expert_front(tables)
    assert len(front) > 3
    # somewhere along the front the insensitive experts are skipped or low while the
    # sensitive ones are still all high: the fit spends error where it costs least
    split = [
        p
        for p in front
        if bool((p["t2"][1, 2:] < 1).all()) and bool((p["t1"][1, :2] >= 1).all())
        and bool((p["t2"][1, :2] >= 1).all())
    ]  # fmt: skip
    assert split, [(p["t1"][1].tolist(), p["t2"][1].tolist()) for p in front]
    assert bool((front[0]["t1"][0] == 1).all())  # the dense layer's row is untouched


def test_per_expert_choice_is_never_worse_than_any_global_pair():
    """At every price of error, the per-expert choice's cost + lam * error is at most that of
    every single (T1, T2) applied to all experts (each is one of its options)."""
    tables = tables_of(synthetic_stats(sensitive=(2,)))
    for lam in (1e-2, 1.0, 30.0, 1e3, 1e5):
        p = expert_choice(tables, lam)
        mine = p["cost"] + lam * p["proxy"]
        for i in range(len(tables.pairs)):
            c = float(tables.cost[1][i].sum()) / tables.tokens
            r = float(tables.err[1][i].sum()) / tables.tokens
            assert mine <= c + lam * r + 1e-9


def test_front_trades_cost_for_error():
    front = expert_front(tables_of(synthetic_stats()))
    costs = [p["cost"] for p in front]
    errs = [p["proxy"] for p in front]
    assert costs == sorted(costs)
    assert all(a >= b - 1e-12 for a, b in zip(errs, errs[1:], strict=False))
    all_high = 2.0  # two experts a token, each a high miss of cost 1
    assert costs[-1] < all_high and costs[0] < costs[-1]


def test_an_expert_whose_low_copy_is_exact_goes_low_even_as_top1():
    """Expert 3's low copy adds no error: at a price of error that keeps the others' top-1
    selections high, its own go low (T1 = 0); without a paying low copy, nothing does."""
    ids, w, lo, sk = synthetic_stats(sensitive=(0, 1, 2, 3))[1]
    lo = lo.clone()
    lo[ids == 3] = 0.0
    tables = tables_of({1: (ids, w, lo, sk)})
    assert (0.0, 1.0) in tables.pairs
    front = expert_front(tables)
    assert any(float(p["t1"][1, 3]) == 0.0 and bool((p["t1"][1, :3] > 0).all()) for p in front), [
        p["t1"][1].tolist() for p in front
    ]
    assert all(a > 0 for a, _ in tables_of({1: (ids, w, lo, sk)}, low=False).pairs)


def test_without_a_paying_low_copy_only_skipping_is_fitted():
    front = expert_front(tables_of(synthetic_stats(), low=False))
    assert all(bool((p["t1"] == p["t2"]).all()) for p in front)


def test_a_rarely_selected_expert_is_judged_by_its_layer():
    """An expert seen twice with a huge error: its error per selection is pulled towards the
    layer's, not taken at face value."""
    ids, w, lo, sk = synthetic_stats(sensitive=())[1]
    ids = ids.clone() % 3  # experts 0..2 only
    ids[:2, 1] = 3  # expert 3: selected twice, second slot
    sk = sk.clone()
    sk[:2, 1] = 100.0
    tables = expert_tables({1: (ids, w, lo, sk)}, COST, (2, 4), shrink=16.0)
    skip_all = tables.pairs.index((0.5, 0.5))
    per_sel = tables.err[1][skip_all] / tables.n[1].clamp_min(1)
    assert per_sel[3] < 100.0**2 * 2 / 18 + 1e-6 < 100.0**2


def test_bisection_finds_the_first_point_that_meets_in_few_runs():
    front = list(range(40))
    for first in (0, 7, 23, 39, 40):
        best, tried = bisect_front(front, lambda p, f=first: (p >= f, {}), max_evals=8)
        assert best == (first if first < 40 else None)
        assert len(tried) <= 6


def test_calibration_parts(tmp_path):
    class Chars:  # a tokenizer of one token a character
        def encode(self, text):
            return [ord(c) for c in text]

    default = calibration_parts(None, Chars(), 4000)
    assert [n for n, _ in default] == ["dialogue", "encyclopaedic", "prose", "verse"]
    assert all(len(ids) == 1000 for _, ids in default)
    one = tmp_path / "mine.txt"
    one.write_text("word " * 400)
    parts = calibration_parts(one, Chars(), 1000)
    assert [len(ids) for _, ids in parts] == [250] * 4 and parts[0][0] == "mine[1/4]"
    one.write_text("too short")
    with pytest.raises(HobbitError, match="gives 2 tokens"):
        calibration_parts(one, Chars(), 1000)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HobbitError, match="holds no .txt files"):
        calibration_parts(empty, Chars(), 1000)


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
        d / "model", memory="50%", max_tokens=600, window=128, trace_tokens=48, quick=True,
        threads=1,
    )  # fmt: skip
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


def test_fitted_thresholds_are_per_expert_and_validated(profiled):
    d, result = profiled
    f, r = result["fitted"], result["runtime"]
    val = f["validation"]
    assert set(val["parts"]) == {"dialogue", "encyclopaedic", "prose", "verse"}
    assert val["worst_ratio"] == max(p["ratio"] for p in val["parts"].values())
    if r["dynamic_precision"]:
        # held within the budget less the margin on every held-out piece, decoded
        assert val["worst_ratio"] <= 1 + 0.01 * 0.75 + 1e-9
        cfg = hobbit_tools.runtime.loader.ModelFiles(d / "model").config
        shape = (cfg.num_layers, cfg.num_experts)
        assert (len(r["t1"]), len(r["t1"][0])) == (len(r["t2"]), len(r["t2"][0])) == shape
        rt = hobbit_tools.load(d / "model")
        assert rt.info["policy"] == "tuned"
        out = rt.generate("Once upon a time", max_new_tokens=6, seed=0)
        assert sum(out.stats["share"].values()) > 0.99  # served under per-expert thresholds
    else:  # no fit was found, or the held-out pieces rejected every one
        assert all(
            t["index"] is None or t["worst_held_ratio"] > 1 + 0.01 * 0.75
            for t in f["threshold_rounds"]
        ), f["threshold_rounds"]
    s = val["speed"]
    assert s["tuned_tok_s"] > 0 and s["lru_tok_s"] > 0 and s["lru_bytes_per_token"] > 0
    report = (d / "model" / "profile-report.md").read_text()
    assert "## What the budget bought" in report and "(worst)" in report


@pytest.mark.slow
def test_a_fit_the_held_out_pieces_reject_is_redone_with_less_allowance(
    profiled, tmp_path, monkeypatch
):
    """Validation is what decides: held-out pieces that rise past the budget less the margin
    make the profile fit again with a smaller allowance, and fall back to all-high when no
    fit holds."""
    import hobbit_tools.profile.profiler as prof

    d, _ = profiled
    real = prof._validate
    calls = []

    def failing(model, files, dtype, budget, chosen, *rest):
        out = real(model, files, dtype, budget, chosen, *rest)
        calls.append(chosen.dynamic_precision)
        if chosen.dynamic_precision:
            out["worst_ratio"] = 1.5  # past 1 + 0.2 * (1 - margin)
        return out

    monkeypatch.setattr(prof, "_validate", failing)
    monkeypatch.setattr(prof, "fit_prefetch_depth", lambda recall: 0)
    result = profile(
        d / "model", memory="50%", max_tokens=400, window=64, trace_tokens=16, quick=True,
        ppl_budget=0.2, threads=1, out=tmp_path / "cfg.json",
    )  # fmt: skip
    rounds = result["fitted"]["threshold_rounds"]
    assert result["runtime"]["dynamic_precision"] is False
    assert result["runtime"]["t1"] == result["runtime"]["t2"] == 1.0
    fitted = [r for r in rounds if r["index"] is not None]
    assert fitted, rounds  # a 20% budget admits some fit on the first round
    shares = [r["share"] for r in rounds]
    assert shares == sorted(shares, reverse=True) and shares[-1] < shares[0]
    assert calls[-1] is False  # the all-high fallback is what was validated last


@pytest.mark.parametrize("faster", [True, False])
def test_prefetch_is_kept_only_where_it_is_measured_faster(profiled, tmp_path, monkeypatch, faster):
    import hobbit_tools.profile.profiler as prof

    d, _ = profiled

    def timed(model, files, dtype, budget, chosen, depth, ids):
        assert chosen.name == "tuned" and depth >= 1  # the fitted strategy, timed both ways
        return {"depth": depth, "tokens": len(ids), "with_s": 1.0 if faster else 1.2,
                "without_s": 1.1}  # fmt: skip

    monkeypatch.setattr(prof, "_prefetch_timing", timed)
    monkeypatch.setattr(prof, "fit_prefetch_depth", lambda recall: 1)
    out = tmp_path / "cfg.json"
    result = profile(
        d / "model",
        memory="50%",
        max_tokens=300,
        window=128,
        trace_tokens=16,
        quick=True,
        out=out,
        threads=1,
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


def test_layer_by_layer_pass_gives_the_resident_model_logits(profiled, monkeypatch):
    """walk() (one layer at a time, one expert per precision in memory) computes what the
    whole model with every expert resident computes."""
    from hobbit_tools.profile.calibrate import LayerExperts, Windows, walk
    from hobbit_tools.runtime import prefill
    from hobbit_tools.runtime.loader import ModelFiles, build_model
    from hobbit_tools.runtime.store import ExpertStore

    d, _ = profiled
    rt = hobbit_tools.load(d / "model", policy="resident", config=False, dtype="float32")
    # walk() batches every window's tokens, the model one window's: ggml's kernel on both
    # sides, rather than a route chosen by the token count (tests/test_prefill.py)
    monkeypatch.setattr(prefill, "ROUTE", {})
    files = ModelFiles(d / "model")
    model = build_model(files, None, torch.float32, 65)
    store = ExpertStore(files, ["high", "low"], torch.float32)
    windows = Windows.cut([list(range(5, 70)), list(range(100, 230))], 64)
    backend = LayerExperts(store, None)
    hs = walk(model, windows, backend)
    for ids, h in zip(windows.inputs, hs, strict=True):
        rt.model.reset()
        want = rt.model.forward(torch.tensor(ids), all_logits=True)
        torch.testing.assert_close(model.logits(h), want, atol=2e-3, rtol=1e-3)
    store.close()


@pytest.mark.parametrize("winner", ["torch", "ggml", "ggml-plain"])
def test_kernels_are_chosen_by_timed_decode(profiled, tmp_path, monkeypatch, winner):
    """Which kernels compute a quantized type is decided by decoding under the chosen
    strategy both ways, and the run takes the winner from the config."""
    import hobbit_tools.profile.profiler as prof

    if not hobbit_tools.runtime.ggml.available():
        pytest.skip("ggml's kernels do not load here: there is nothing to choose between")
    d, _ = profiled
    real = prof._decode
    timed = []

    def decode(model, files, dtype, budget, s, ids, trace=False, kernels=None, reserve=0):
        if kernels is None:
            return real(model, files, dtype, budget, s, ids, trace)
        (path,) = set(kernels.values())
        timed.append(path)
        return (1.0 if path == winner else 2.0), None, None

    monkeypatch.setattr(prof, "_decode", decode)
    out = tmp_path / "cfg.json"
    result = profile(
        d / "model", memory="50%", max_tokens=300, window=128, trace_tokens=16, quick=True,
        out=out, threads=1,
    )  # fmt: skip
    # interleaved, twice each; ggml-plain where some type would be rewritten after reads
    assert sorted(timed) == sorted(2 * sorted(set(timed)))
    assert {"ggml", "torch"} <= set(timed) <= {"ggml", "ggml-plain", "torch"}
    if winner not in timed:
        pytest.skip(f"{winner} was not a candidate here")
    kernels = result["runtime"]["kernels"]
    assert kernels and set(kernels.values()) == {winner}
    assert f"-> kernels {kernels}" in out.with_name("profile-report.md").read_text()
    rt = hobbit_tools.load(d / "model", config=out)
    types = hobbit_tools.runtime.loader.ModelFiles(d / "model").manifest["types"]
    chosen = {k for n, k in rt.info["kernels"].items() if types[n] in kernels}
    assert chosen == {winner}


def test_a_decode_just_short_of_the_working_minimum_takes_it_from_the_floor(profiled, monkeypatch):
    """Inside a tight limit a profile's decode sizes its cache to what is free now; where
    that falls a few KB short of one layer's experts (a clean clone's memory-limit test
    stopped 36 KB short) it takes the minimum out of the floor's margin, up to half of it,
    and stops with the error only past that."""
    from hobbit_tools.errors import BudgetBelowMinimum
    from hobbit_tools.profile import profiler as prof
    from hobbit_tools.runtime.budget import RUNTIME_FLOOR, Available
    from hobbit_tools.runtime.loader import ModelFiles, build_model, compute_dtype
    from hobbit_tools.runtime.strategy import Strategy, build_backend

    d, _ = profiled
    files = ModelFiles(d / "model")
    dtype = compute_dtype(files, None)
    model = build_model(files, None, dtype, 16)
    with pytest.raises(BudgetBelowMinimum) as e:
        build_backend(files, Strategy("lru"), "high", 1 << 16, dtype, model)
    minimum = e.value.minimum

    def free(nbytes):
        monkeypatch.setattr(prof, "available_memory", lambda: Available(nbytes, "test"))

    free(RUNTIME_FLOOR + minimum - 36_000)
    backend = prof._backend(files, Strategy("lru"), 10 * minimum, dtype, model)
    assert backend.cache.nbytes == minimum
    backend.close()
    free(RUNTIME_FLOOR // 2 + minimum - 4096)
    with pytest.raises(BudgetBelowMinimum):
        prof._backend(files, Strategy("lru"), 10 * minimum, dtype, model)


def test_layer_by_layer_pass_lets_its_working_memory_go(profiled):
    """After walk() nothing of the pass stays: not its expert slots, not the store's read
    buffers, not ggml's many-token scratch. Kept, they were ~45 MiB on m742, and a profile
    inside 380 MiB then had 9 MiB left for its decodes' cache, below one layer's experts."""
    from hobbit_tools.profile.calibrate import LayerExperts, Windows, walk
    from hobbit_tools.runtime import ggml
    from hobbit_tools.runtime.loader import ModelFiles, build_model
    from hobbit_tools.runtime.store import ExpertStore

    d, _ = profiled
    files = ModelFiles(d / "model")
    model = build_model(files, None, torch.float32, 65)
    store = ExpertStore(files, ["high", "low"], torch.float32)
    backend = LayerExperts(store, None)
    walk(model, Windows.cut([list(range(5, 70)), list(range(100, 230))], 64), backend)
    assert model.experts is None
    assert backend.slots == {} and store.staging._free == []
    assert ggml._scratch.data.size == 0 and ggml._scratch.work.size == 0
    walk(model, Windows.cut([list(range(5, 40))], 64), backend)  # a second pass still reads
    store.close()


def test_a_tight_budget_is_raised_to_the_working_minimum_and_turns_low_off():
    """Inside a tight limit the planned budget can fall a little short of top-k experts at
    high precision (m742 inside 380 MiB: 15 MiB planned, 22 MiB needed): the profile tunes
    for that minimum where half the floor covers it, as a run does, and fits without
    dynamic precision where top-k experts at both precisions do not fit."""
    from types import SimpleNamespace as NS

    from hobbit_tools.profile.profiler import _working_budget
    from hobbit_tools.runtime.budget import RUNTIME_FLOOR

    cfg = NS(top_k=2)
    store = NS(p={"high": NS(slot_bytes=10 << 20), "low": NS(slot_bytes=5 << 20)})
    budget, off = _working_budget(cfg, store, 15 << 20, planned=True)
    assert budget == 20 << 20 and "dynamic precision is off" in off
    assert _working_budget(cfg, store, 15 << 20, planned=False)[0] == 15 << 20  # given
    far = (20 << 20) - RUNTIME_FLOOR // 2 - 1
    assert _working_budget(cfg, store, far, planned=True)[0] == far  # the floor cannot cover
    assert _working_budget(cfg, store, 30 << 20, planned=True) == (30 << 20, None)
    store.p.pop("low")
    assert _working_budget(cfg, store, 15 << 20, planned=True) == (20 << 20, None)

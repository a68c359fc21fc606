"""Replay on routing traces: CSV traces read alike, Belady as the bound, the held-out split,
the fitted policy never below lru and lfu, the cliff, and the real Qwen3 trace."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hobbit_tools.cli import main
from hobbit_tools.errors import HobbitError
from hobbit_tools.profile.fit import cache_runs, choose_cache, fit_cache, fitted_replay
from hobbit_tools.runtime.policies import LFU, LRU, Forecast, cliff, make_policy
from hobbit_tools.runtime.replay import read_trace, replay, replay_ids, requests, write_trace

QWEN = Path(__file__).resolve().parents[1].parent / "shared/data/traces/qwen3-30b-a3b.route.csv"


def csv_text(layer_sizes: bool = True) -> str:
    """Two layers, four experts, top-2: a prompt of two tokens, then two generated ones."""
    lines = ["# route_trace v1", "# model=m.gguf arch=x n_layer=2 n_expert=4 n_expert_used=2"]
    if layer_sizes:
        lines += [
            "# layer=0 expert_bytes=100 dense_bytes=9",
            "# layer=1 expert_bytes=300 dense_bytes=9",
        ]
    lines.append("turn,phase,step,layer,slot,expert,weight,residency,expert_bytes")
    rows = [  # (phase, step, layer, [(expert, weight), ...])
        (0, 0, 0, [(1, 0.7), (2, 0.3)]),
        (0, 1, 0, [(3, 0.6), (1, 0.4)]),
        (0, 1, 1, [(0, 0.5), (2, 0.5)]),  # the engine ran the last layer for the last token only
        (1, 2, 0, [(1, 0.9), (0, 0.1)]),
        (1, 2, 1, [(2, 0.8), (3, 0.2)]),
        (1, 3, 0, [(1, 0.6), (2, 0.4)]),
        (1, 3, 1, [(2, 0.5), (0, 0.5)]),
    ]
    for phase, step, layer, picks in rows:
        for slot, (e, w) in enumerate(picks):
            lines.append(f"0,{phase},{step},{layer},{slot},{e},{w},0,{100 + 200 * layer}")
    return "\n".join(lines) + "\n"


def test_csv_trace_becomes_records_per_layer_call(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(csv_text())
    header, records = read_trace(path)
    assert (header["num_layers"], header["num_experts"], header["top_k"]) == (2, 4, 2)
    assert header["layer_bytes"]["high"] == [100, 300]
    assert header["sizes_from"].startswith("the trace's per-layer expert_bytes")
    # the prompt: one batched call per layer, all one token; then a call per layer and token
    assert [(r["token"], r["layer"], r["tokens"]) for r in records] == [
        (1, 0, 2),
        (1, 1, 1),
        (2, 0, 1),
        (2, 1, 1),
        (3, 0, 1),
        (3, 1, 1),
    ]
    assert records[0]["ids"] == [[1, 2], [3, 1]] and records[0]["weights"][1] == [0.6, 0.4]


def test_csv_expert_sizes_given_from_a_mean_or_asked_for(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(csv_text(layer_sizes=False))
    header, _ = read_trace(path)
    mean = round((100 * 8 + 300 * 6) / 14)
    assert header["layer_bytes"]["high"] == [mean, mean] and "mean" in header["sizes_from"]
    header, _ = read_trace(path, expert_bytes=1000)
    assert header["layer_bytes"] == {"high": [1000, 1000], "low": [500, 500]}
    path.write_text(csv_text(layer_sizes=False).replace(",100\n", ",0\n").replace(",300\n", ",0\n"))
    with pytest.raises(HobbitError, match="--expert-bytes"):
        read_trace(path)


def test_per_layer_sizes_share_the_budget(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(csv_text())
    header, records = read_trace(path)
    everything = replay(header, records, memory="100%", cache_policy="lru")  # 4 x (100 + 300)
    assert everything["hits"] + everything["misses"] == 13
    assert everything["misses"] == 7  # 4 experts of layer 0 + 3 of layer 1, read once each
    assert everything["bytes_read"] == 4 * 100 + 3 * 300
    # 400 bytes: one layer-1 expert and one of layer 0, or four of layer 0
    small = replay(header, records, memory=400, cache_policy="lru")
    assert small["misses"] > 7 and small["slots"] == {"high": 2}


def random_trace(seed=0, layers=4, experts=16, k=2, tokens=60):
    rng = random.Random(seed)
    popular = [rng.sample(range(experts), 5) for _ in range(layers)]
    trace = []
    for _ in range(tokens):
        for layer in range(layers):
            pool = popular[layer] if rng.random() < 0.7 else range(experts)
            trace.append((layer, rng.sample(list(pool), k)))
    return trace


def as_hobbit_trace(trace, layers=4, experts=16, k=2):
    header = {
        "kind": "hobbit-trace",
        "num_layers": layers,
        "num_experts": experts,
        "top_k": k,
        "expert_bytes": {"high": 10},
        "slot_bytes": {"high": 10},
    }
    records = [
        {
            "token": 1 + i // layers,
            "layer": layer,
            "tokens": 1,
            "ids": [ids],
            "weights": [[0.5] * k],
        }
        for i, (layer, ids) in enumerate(trace)
    ]
    return header, records


@pytest.mark.parametrize("slots", [6, 12, 24])
def test_belady_bounds_every_policy(slots):
    header, records = as_hobbit_trace(random_trace())
    rates = {
        p: replay(header, records, memory=10 * slots, cache_policy=p)["hit_rate"]
        for p in ("belady", "lru", "lfu", "hobbit", "lcu", "decay", "forecast", "layer-lfu")
    }
    assert all(rates["belady"] >= v for v in rates.values()), rates
    assert rates["belady"] > rates["lru"]


def test_belady_is_the_optimum_on_a_hand_trace():
    # one layer, two slots: 1 2 3 1 2 -> at 3, MIN evicts 2 (used after 1): hits 1 only...
    # keeping 1 (next at tick 4) over 2 (next at 5): 3 misses then hit 1, miss 2 = 1 hit
    header, records = as_hobbit_trace([(0, [e]) for e in (1, 2, 3, 1, 1, 2)], layers=1, k=1)
    r = replay(header, records, memory=20, cache_policy="belady")
    assert (r["hits"], r["misses"]) == (2, 4)
    assert replay(header, records, memory=20, cache_policy="lru")["hits"] == 1


def test_split_scores_only_the_tail():
    header, records = as_hobbit_trace(random_trace())
    whole = replay(header, records, memory=80, cache_policy="lru")
    tail = replay(header, records, memory=80, cache_policy="lru", split=0.5)
    assert tail["scored_from_tick"] == 4 * 30
    assert tail["hits"] + tail["misses"] == 30 * 4 * 2
    # the cache ran over the head too: the tail's hits are those of the whole run's tail
    head = replay(header, records[:120], memory=80, cache_policy="lru")
    assert tail["hits"] == whole["hits"] - head["hits"]


@pytest.mark.parametrize("slots", [5, 12])
def test_fitted_never_loses_to_lru_or_lfu_where_it_was_fitted(slots):
    header, records = as_hobbit_trace(random_trace(seed=3))
    fit = fit_cache(header, records, 10 * slots, None, step=0.5)
    for p in ("lru", "lfu"):
        assert (
            fit["best"]["miss_penalty"]
            <= replay(header, records, memory=10 * slots, cache_policy=p)["miss_penalty"]
        )
    held = fitted_replay(header, records, 10 * slots, None, split=0.5)
    assert held["cache_policy"] == "fitted" and held["fit"]["cache_policy"]
    assert held["scored_from_tick"] == 120


def test_cliff_warns_with_numbers_and_lru_never_hits_there():
    message = cliff(48, 6, 183)
    assert "183" in message and "288" in message and "48 MoE layers x top-6" in message
    assert cliff(48, 6, 288) is None
    # 4 layers x 2 = 8 per token, 6 slots: LRU evicts each expert just before its layer
    header, records = as_hobbit_trace(random_trace())
    assert replay(header, records, memory=60, cache_policy="lru")["hits"] == 0
    assert replay(header, records, memory=60, cache_policy="forecast")["hit_rate"] > 0.1
    assert replay(header, records, memory=60, cache_policy="lru")["cliff"] == cliff(4, 2, 6)


def test_vectorised_victim_matches_the_rule_written_out():
    """LFU: least count, then least recent, then the smallest key, as min() over tuples."""
    rng = random.Random(1)
    p, count, last = LFU(), {}, {}
    keys = [(layer, e, prec) for layer in range(3) for e in range(5) for prec in ("high", "low")]
    for clock in range(1, 200):
        k = rng.choice(keys[: rng.randint(1, len(keys))])
        p.touch(k, clock // 3)  # clocks repeat: ties on recency too
        count[k], last[k] = count.get(k, 0) + 1, clock // 3
        cands = rng.sample(list(count), min(len(count), 7))
        assert p.victim(cands, 0) == min(cands, key=lambda k: (count[k], last[k], k))


def test_forecast_keeps_what_a_sticky_layer_chose_last_over_what_it_chose_often():
    """A layer that has chosen again what it chose the token before 96% of the time: the
    expert it has just chosen for the first time outlives one chosen 39 times that it
    dropped a token ago (frequency alone says the opposite)."""
    f = Forecast(num_layers=1)
    for token in range(1, 40):
        for e in ("a", "x"):
            f.touch((0, ord(e), "high"), token, token)
    for e in ("a", "y"):
        f.touch((0, ord(e), "high"), 40, 40)
    assert f.victim([(0, ord("x"), "high"), (0, ord("y"), "high")], 0) == (0, ord("x"), "high")
    # a layer that never repeats itself: frequency decides
    f = Forecast(num_layers=1)
    for token in range(1, 40):
        f.touch((0, ord("x"), "high"), token, token)
        f.touch((0, 1000 + token, "high"), token, token)
    f.touch((0, ord("y"), "high"), 40, 40)
    assert f.victim([(0, ord("x"), "high"), (0, ord("y"), "high")], 0) == (0, ord("y"), "high")


def test_forecast_ranks_a_candidate_whose_layer_has_not_run_yet():
    """A prefetched copy can be a candidate before its layer was ever used."""
    f = Forecast(num_layers=3)
    f.touch((0, 1, "high"), 1, 1)
    f.t.id((5, 2, "high"))  # a layer past num_layers too
    assert f.victim([(0, 1, "high"), (2, 5, "high"), (5, 2, "high")], 0) in {
        (2, 5, "high"),
        (5, 2, "high"),
    }


def test_the_fit_keeps_forecast_unless_a_candidate_beats_it_by_its_noise():
    """Forecast is one of the baselines: on the part it was fitted on, the choice is never
    worse than lru, lfu or forecast."""
    header, records = as_hobbit_trace(random_trace(seed=5))
    reqs = requests(header, records, None)
    runs = cache_runs(header, reqs, 60, None, step=0.5)
    best, base, _ = choose_cache(runs, reqs, len(reqs.ticks))
    total = {(r["cache_policy"], r["weights"]): r["run"]["miss_penalty"] for r in runs}
    assert runs[base]["cache_policy"] in ("lru", "lfu", "forecast")
    chosen = runs[best]["run"]["miss_penalty"]
    assert chosen <= min(total[("lru", None)], total[("lfu", None)], total[("forecast", (8.0,))])


def test_policies_grow_past_their_first_arrays():
    p = LRU()
    for e in range(500):
        p.touch((e % 7, e, "low"), e)
    assert p.victim([(3, 3, "low"), (0, 7, "low")], 0) == (3, 3, "low")
    f = make_policy("forecast", num_layers=7)
    assert isinstance(f, Forecast)
    assert replay_ids([(0, [1, 2]), (1, [3, 4])] * 10, f, slots=3)["hits"] > 0


def test_replay_cli_reads_csv_and_reports_the_held_out_fit(tmp_path):
    header, records = as_hobbit_trace(random_trace())
    write_trace(tmp_path / "t.jsonl", header, records)
    csv = tmp_path / "t.csv"
    csv.write_text(csv_text())
    r = CliRunner().invoke(main, ["replay", str(csv), "--memory", "60%", "--json"])
    assert r.exit_code == 0, r.output
    assert {x["cache_policy"] for x in json.loads(r.output)} >= {"belady", "lru", "lfu"}
    r = CliRunner().invoke(
        main, ["replay", str(tmp_path / "t.jsonl"), "--memory", "40,90", "--split", "0.5", "--json"]
    )
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    for row in rows:
        assert {"memory", "cache_policy", "hit_rate", "bytes_read", "miss_penalty"} <= set(row)
    fitted = [x for x in rows if x["cache_policy"] == "fitted"]
    assert len(fitted) == 2 and all("gap_closed" in x for x in fitted)
    r = CliRunner().invoke(main, ["replay", str(csv), "--cache-policy", "fitted"])
    assert r.exit_code == 1 and "--split" in r.output


@pytest.fixture(scope="module")
def qwen():
    if not QWEN.is_file():
        pytest.skip(f"the real routing trace is not here ({QWEN})")
    header, records = read_trace(QWEN)
    return header, requests(header, records, None)


def test_qwen_trace_replays_to_the_publishers_figures(qwen):
    """Scored on the generated tokens (after the 28-token prompt) as its publisher did:
    LRU 70.6%, Belady 87.8% at 3000 MiB."""
    header, reqs = qwen
    split = 0.17  # the prompt's share of the trace's rows (its last layer ran one token)
    assert reqs.cut(split) == 48  # the prompt is one batched call per layer
    lru = replay(header, reqs, memory="3000MiB", cache_policy="lru", split=split)
    assert lru["hit_rate"] == pytest.approx(0.706, abs=0.01)
    assert lru["cliff"] is None
    assert replay(header, reqs, memory="500MiB", cache_policy="lru")["hits"] == 0


@pytest.mark.slow
def test_qwen_fitted_beats_lru_and_lfu_on_the_held_out_half(qwen):
    header, reqs = qwen
    closed = []
    for memory in ("500MiB", "3000MiB", "4000MiB"):
        rate = {
            p: replay(header, reqs, memory=memory, cache_policy=p, split=0.5)["hit_rate"]
            for p in ("belady", "lru", "lfu")
        }
        fitted = fitted_replay(header, reqs, memory, None, split=0.5)["hit_rate"]
        assert fitted >= max(rate["lru"], rate["lfu"])
        closed.append((fitted - rate["lru"]) / (rate["belady"] - rate["lru"]))
    assert np.mean(closed) >= 0.3

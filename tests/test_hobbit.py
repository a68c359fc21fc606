"""HOBBIT's techniques: the precision rule, prefetch, the multidimensional policies, traces."""

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import make_checkpoint, prepared_pair, quantizable

import hobbit_tools
from hobbit_tools.cli import main
from hobbit_tools.errors import HobbitError
from hobbit_tools.runtime.policies import LCU, Hobbit
from hobbit_tools.runtime.precision import HIGH, LOW, SKIP, PrecisionRule, serve_from, unimportance
from hobbit_tools.runtime.replay import read_trace, replay

SHAPE = quantizable(num_hidden_layers=4)
PROMPT = "Now is the winter of our discontent made glorious summer by this sun of York"


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("hobbit")
    return prepared_pair(d, tokenizer_dir, **SHAPE)


def test_unimportance_is_the_mass_ranked_above():
    w = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    s = unimportance(w)
    assert torch.allclose(s, torch.tensor([[0.9, 0.0, 0.6], [0.0, 0.5, 0.75]]))


def test_rule_levels_global_per_layer_and_per_expert():
    ids = torch.tensor([[3, 1, 2]])
    w = torch.tensor([[0.6, 0.3, 0.1]])  # s = 0, 0.6, 0.9
    assert PrecisionRule(0.5, 0.8).levels(0, ids, w).tolist() == [[HIGH, LOW, SKIP]]
    assert PrecisionRule(0.7, 0.95).levels(0, ids, w).tolist() == [[HIGH, HIGH, LOW]]
    per_layer = PrecisionRule(torch.tensor([0.5, 0.7]), torch.tensor([0.8, 0.95]))
    assert per_layer.levels(1, ids, w).tolist() == [[HIGH, HIGH, LOW]]
    t1 = torch.full((1, 4), 0.5)
    t1[0, 1] = 0.65  # expert 1 is sensitive: keep it high a little longer
    per_expert = PrecisionRule(t1, torch.full((1, 4), 0.8))
    assert per_expert.levels(0, ids, w).tolist() == [[HIGH, HIGH, SKIP]]


def test_t1_zero_sends_even_the_top1_expert_low():
    ids = torch.tensor([[3, 1, 2]])
    w = torch.tensor([[0.6, 0.3, 0.1]])  # s = 0, 0.6, 0.9
    t1 = torch.full((1, 4), 0.5)
    t1[0, 3] = 0.0  # expert 3's low copy is as good as its high one
    rule = PrecisionRule(t1, torch.full((1, 4), 0.8))
    assert rule.levels(0, ids, w).tolist() == [[LOW, LOW, SKIP]]
    assert rule.row(0, [3, 1, 2], [0.6, 0.3, 0.1]) == ([LOW, LOW, SKIP], [True, False, False])
    assert PrecisionRule(0.5, 0.8).levels(0, ids, w).tolist() == [[HIGH, LOW, SKIP]]
    assert serve_from(False, True, LOW, True) == "low"  # its cached low copy serves it too


def test_serving_rule():
    assert serve_from(True, True, LOW, False) == "high"
    assert serve_from(False, True, LOW, False) == "low"
    assert serve_from(False, True, HIGH, False) == "low"  # a low copy serves a non-top-1 want
    assert serve_from(False, True, HIGH, True) is None  # but never a token's top-1 expert
    assert serve_from(False, False, HIGH, False) is None


def test_hobbit_priority_prefers_soon_frequent_high_precision_experts():
    p = Hobbit(num_layers=4, low_over_high=0.5, weights=(0.25, 0.25, 0.25, 0.25))
    for token in range(1, 5):
        p.touch((1, 0, "high"), token, token)
    p.touch((3, 0, "low"), 5, 5)
    # at layer 0: layer 1 is next (distance 1), layer 3 far (distance 3); expert (1, 0) was
    # used four times at high precision, (3, 0) once at low but more recently.
    assert p.victim([(1, 0, "high"), (3, 0, "low")], layer=0) == (3, 0, "low")
    p.new_sequence()
    assert not p.uses.any() and not p.high.any()


def test_lcu_gives_the_last_pass_a_bonus_by_layer_distance():
    p = LCU(num_layers=4, low_over_high=0.25)
    p.touch((0, 5, "high"), 1, 1)  # used once, a pass ago: no bonus
    for key in [(1, 5, "low"), (2, 5, "high"), (3, 5, "high")]:
        p.touch(key, 3, 3)
    # used in the last pass, the bonus 1/(distance + 0.1) decides: layer 3 is furthest
    assert p.victim([(1, 5, "low"), (2, 5, "high"), (3, 5, "high")], layer=0) == (3, 5, "high")
    assert p.victim([(0, 5, "high"), (3, 5, "high")], layer=0) == (0, 5, "high")


def test_all_high_thresholds_match_lru_exactly(model):
    ref = hobbit_tools.load(model, memory="40%", policy="lru")
    ids = ref.encode(PROMPT)
    want = ref.generate(ids, max_new_tokens=16, stop_at_eos=False).token_ids
    rt = hobbit_tools.load(model, memory="40%", policy="hobbit")
    backend = rt.model.experts
    backend.o.rule = PrecisionRule(float("inf"), float("inf"))
    got = rt.generate(ids, max_new_tokens=16, stop_at_eos=False)
    assert got.token_ids == want
    assert got.stats["served"]["low"] == 0 and got.stats["served"]["skip"] == 0


def test_hobbit_loads_low_and_skips(model):
    rt = hobbit_tools.load(model, memory="40%", policy="hobbit")
    g = rt.generate(PROMPT, max_new_tokens=24, stop_at_eos=False)
    s = g.stats
    assert s["served"]["high"] > s["served"]["low"] > 0
    assert s["loads"]["low"] > 0 and s["prefetch_loads"] > 0
    assert set(s["prefetch_recall"]) == {1, 2}
    assert all(0.0 <= r <= 1.0 for r in s["prefetch_recall"].values())
    assert rt.info["cache_bytes"] <= hobbit_tools.runtime.budget.parse_memory(
        "40%", rt.info["full_cache_bytes"]
    )


def test_misses_wait_for_slots_the_layers_hits_held(model):
    """Every expert low (T1 = 0) and a low cache of one layer's top-k: a layer's hits hold
    every low slot while its misses wait; once the hits are computed the misses take their
    slots (this raised "no free slot" before)."""
    import dataclasses

    from hobbit_tools.runtime.strategy import strategy

    s = dataclasses.replace(strategy("hobbit", prefetch_depth=0), t1=0.0, t2=1.0, low_share=0.0)
    rt = hobbit_tools.load(model, memory="40%", policy=s)
    experts, k = rt.model.experts, rt.config.top_k
    assert experts.cache.arenas["low"].n == k
    x = torch.randn(2, rt.config.hidden_size)
    w = torch.full((2, k), 1.0 / k)
    experts.forward(1, x[:1], torch.arange(k)[None], w[:1])  # fills the low cache
    both = torch.stack([torch.arange(k), torch.arange(k, 2 * k)])  # k hits, k misses
    experts.forward(1, x, both, w)
    s = experts.stats()
    assert s["hits"] == k and s["loads"]["low"] == 2 * k and s["loads"]["high"] == 0


def test_skip_modes_change_the_output(model):
    outs = {}
    for mode in ("drop", "renormalize"):
        rt = hobbit_tools.load(model, memory="100%", policy="hobbit", prefetch_depth=0)
        rt.model.experts.o.rule = PrecisionRule(0.3, 0.3)  # skip every non-top-1 expert
        rt.model.experts.o.skip = mode
        outs[mode] = rt.logits(rt.encode(PROMPT))
    assert not torch.equal(outs["drop"], outs["renormalize"])


def test_each_technique_switches_off(model):
    rt = hobbit_tools.load(
        model,
        memory="40%",
        policy="hobbit",
        dynamic_precision=False,
        prefetch_depth=0,
        cache_policy="lcu",
    )
    s = rt.generate(PROMPT, max_new_tokens=8, stop_at_eos=False).stats
    assert s["served"]["low"] == 0 and s["prefetch_loads"] == 0
    assert rt.info["strategy"]["cache"] == "lcu"


def test_hobbit_needs_a_low_shard(tmp_path, tokenizer_dir):
    make_checkpoint("mixtral", tmp_path / "hf", tokenizer_dir, **SHAPE)
    hobbit_tools.prepare(tmp_path / "hf", tmp_path / "model", high="Q8_0", low="none")
    with pytest.raises(HobbitError, match="no low-precision shard"):
        hobbit_tools.load(tmp_path / "model", memory="40%", policy="hobbit")


@pytest.mark.parametrize(
    "cache_policy", ["lru", "lfu", "hobbit", "lcu", "decay", "forecast", "layer-lfu", "layer-lru"]
)
def test_trace_replays_what_the_run_did(model, tmp_path, cache_policy):
    """One policy code for replay and the runtime: the replayed hits, misses and bytes are
    the run's, for every eviction policy."""
    trace = tmp_path / "t.jsonl"
    r = CliRunner().invoke(
        main,
        [
            "run",
            str(model),
            "-p",
            PROMPT,
            "-n",
            "12",
            "--memory",
            "40%",
            "--policy",
            "lru",
            "--cache-policy",
            cache_policy,
            "--trace",
            str(trace),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    run = json.loads(r.output.splitlines()[-1])["stats"]
    header, records = read_trace(trace)
    assert header["num_layers"] == 4 and len(records) == 4 * 12  # prefill + 11 decode steps
    sim = replay(header, records, memory="40%", cache_policy=cache_policy)
    # the simulation makes the same decisions as the real cache
    assert (sim["hits"], sim["misses"], sim["bytes_read"]) == (
        run["hits"],
        run["misses"],
        run["bytes_read"],
    )


def test_replay_cli_compares_policies(model, tmp_path):
    trace = tmp_path / "t.jsonl"
    rt = hobbit_tools.load(model, memory="40%", policy="hobbit")
    rt.start_trace()
    rt.generate(PROMPT, max_new_tokens=12, stop_at_eos=False)
    rt.write_trace(trace)
    r = CliRunner().invoke(
        main, ["replay", str(trace), "--memory", "20%,60%", "--json", "--dynamic-precision"]
    )
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert {(x["memory"], x["cache_policy"]) for x in rows} == {
        (m, p) for m in ("20%", "60%") for p in ("belady", "lru", "lfu", "hobbit", "lcu")
    }
    by = {(x["memory"], x["cache_policy"]): x for x in rows}
    assert by[("60%", "lru")]["bytes_read"] <= by[("20%", "lru")]["bytes_read"]
    assert by[("20%", "lru")]["prefetch_recall"]  # predictions were recorded
    assert by[("20%", "lru")]["share"]["low"] > 0

"""Hostile input, as one table: every case exits with a one-line error (no traceback) that
names the problem, changes nothing outside its output path and leaves nothing half-written.

Each case runs in a sandbox holding a tiny checkpoint (hf/), its prepared model dir with
slot packs (model/) and a file the user made (notes.txt); one tiny model per session.
"""

import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny_models import prepared_pair, quantizable

import hobbit_tools
from hobbit_tools.cli import main
from hobbit_tools.profile.config import KIND, VERSION, shard_digests
from hobbit_tools.profile.device import fingerprint
from hobbit_tools.shards import ShardReader

SHAPE = quantizable(num_local_experts=4, num_hidden_layers=2)
HALF_WRITTEN = re.compile(r"\.partial-\d+$|\.old-\d+$|\.tmp$")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def base(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("bad_input")
    prepared_pair(d, tokenizer_dir, pack=True, **SHAPE)
    return d


@pytest.fixture
def box(base, tmp_path):
    shutil.copytree(base / "hf", tmp_path / "hf")
    shutil.copytree(base / "model", tmp_path / "model", symlinks=True)
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path


# --- sandbox mutations -------------------------------------------------------------------


def config(**changes):
    def edit(box):
        path = box / "hf" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def tensor(name, value):
    def edit(box):
        path = box / "hf" / "model.safetensors"
        tensors = load_file(path)
        tensors[name].view(-1)[3] = value
        save_file(tensors, path, metadata={"format": "pt"})

    return edit


def flip(rel, offset_of):
    """Flip one byte of box/rel at offset_of(path)."""

    def edit(box):
        path = box / rel
        offset = offset_of(path)
        with open(path, "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0x55]))

    return edit


def in_tensor(name):
    return lambda path: ShardReader(path).tensors[name].offset + 5


def write(rel, data: bytes):
    def edit(box):
        (box / rel).parent.mkdir(parents=True, exist_ok=True)
        (box / rel).write_bytes(data)

    return edit


def truncate(rel, keep: float):
    def edit(box):
        path = box / rel
        os.truncate(path, int(path.stat().st_size * keep))

    return edit


def manifest(**changes):
    def edit(box):
        path = box / "model" / "manifest.json"
        m = json.loads(path.read_text())
        for key, value in changes.items():
            value(m) if callable(value) else m.__setitem__(key, value)
        path.write_text(json.dumps(m))

    return edit


def shard_path(to):
    def edit(m):
        m["shards"][1]["file"] = to

    return edit


def tuned(**runtime):
    def edit(box):
        r = {"policy": "hobbit", "memory": 1 << 20, "dynamic_precision": True, "t1": 0.6,
             "t2": 0.9, "skip": "drop", "prefetch_depth": 1, "cache_policy": "lru",
             "cache_weights": None, "low_share": 0.25}  # fmt: skip
        cfg = {"kind": KIND, "version": VERSION, "runtime": {**r, **runtime},
               "made_for": {"device": fingerprint(box / "model"), "shards": shard_digests(box / "model")}, "fitted": {}}  # fmt: skip
        (box / "model" / "hobbit-config.json").write_text(json.dumps(cfg))

    return edit


def user_dir(rel):
    return write(f"{rel}/precious.txt", b"the user's")


def both(*edits):
    def edit(box):
        for e in edits:
            e(box)

    return edit


def trace(box):
    r = CliRunner().invoke(main, ["run", str(box / "model"), "-p", "Hi", "-n", "3", "--memory",
                                  "60%", "--trace", str(box / "t.jsonl")])  # fmt: skip
    assert r.exit_code == 0, r.output


# --- the table ---------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    argv: str  # {box} is the sandbox
    message: str  # a regex the one error line matches
    setup: object = None
    out: str | None = None  # the only path (relative to the sandbox) allowed to change
    code: int = 1


RUN = "run {box}/model -p Hello -n 2"
PREP = "prepare {box}/hf -o {box}/out"
CASES = [
    # nothing the user made is lost
    Case("force-parent-of-src", "prepare {box}/hf -o {box} --force", "overlaps the source"),
    Case("force-src-itself", "prepare {box}/hf -o {box}/hf --force", "overlaps the source"),
    Case("force-inside-src", "prepare {box}/hf -o {box}/hf/gguf --force", "overlaps the source"),
    Case(
        "force-user-dir",
        PREP + " --force",
        "no readable hobbit manifest.json.*remove it yourself",
        user_dir("out"),
    ),
    Case("force-user-file", "prepare {box}/hf -o {box}/notes.txt --force", "is a file"),
    Case(
        "force-foreign-manifest",
        PREP + " --force",
        "not written by hobbit",
        write("out/manifest.json", b'{"tool": "other", "shards": []}'),
    ),  # fmt: skip
    Case(
        "force-model-dir-with-user-file",
        "prepare {box}/hf -o {box}/model --force",
        "did not write \\(precious.txt\\)",
        user_dir("model"),
    ),  # fmt: skip
    Case("widen-into-parent", "widen {box}/hf -o {box} --expert-ffn 512 --force", "overlaps"),
    Case(
        "synth-user-dir",
        "synth {box}/out --layers 1 --force",
        "remove it yourself",
        user_dir("out"),
    ),  # fmt: skip
    Case("out-under-a-file", "prepare {box}/hf -o {box}/notes.txt/out", "is a file, not a dir"),
    # corrupt input never gives output
    Case(
        "flipped-dense-byte",
        RUN,
        "dense-F32.gguf: tensor output_norm.weight fails its checksum",
        flip("model/dense-F32.gguf", in_tensor("output_norm.weight")),
    ),  # fmt: skip
    Case(
        "flipped-dense-header",
        RUN,
        "dense-F32.gguf: its header fails its checksum",
        flip("model/dense-F32.gguf", lambda p: p.read_bytes().index(b'"rope_theta": ') + 15),
    ),  # fmt: skip
    Case(
        "manifest-path-escapes", RUN, "leaves the model dir", manifest(_=shard_path("../../x.gguf"))
    ),  # fmt: skip
    Case("manifest-absolute-path", RUN, "leaves the model dir", manifest(_=shard_path("/etc/x"))),
    Case("manifest-not-utf8", RUN, "not valid UTF-8 JSON", write("model/manifest.json", b"\xff{")),
    Case(
        "manifest-bad-count",
        RUN,
        "num_experts = 1000000000 is out of range",
        manifest(num_experts=10**9),
    ),  # fmt: skip
    Case(
        "check-corrupt-pack",
        "prepare {box}/model --check",
        None,
        flip("model/packs/experts-high.slots", lambda p: 100),
    ),  # fmt: skip
    Case(
        "pack-over-corrupt-shard",
        "pack {box}/model",
        "shard is corrupt.*hobbit prepare",
        flip("model/experts-low-Q4_K.gguf", lambda p: p.stat().st_size - 5000),
    ),  # fmt: skip
    Case(
        "truncated-safetensors",
        PREP,
        "model.safetensors is truncated",
        truncate("hf/model.safetensors", 0.5),
    ),  # fmt: skip
    Case(
        "malformed-config",
        PREP,
        "config.json is not valid UTF-8 JSON",
        write("hf/config.json", b'{"model_type": '),
    ),  # fmt: skip
    Case(
        "config-not-utf8",
        PREP,
        "config.json is not valid UTF-8 JSON",
        write("hf/config.json", b'{"model_type": "\xff"}'),
    ),  # fmt: skip
    Case(
        "nan-weight",
        PREP,
        "tensor model.layers.1.self_attn.q_proj.weight holds NaN",
        tensor("model.layers.1.self_attn.q_proj.weight", math.nan),
    ),  # fmt: skip
    Case(
        "inf-expert-weight",
        PREP,
        "experts.3.w2.weight holds NaN or Inf",
        tensor("model.layers.0.block_sparse_moe.experts.3.w2.weight", math.inf),
    ),  # fmt: skip
    # numbers: the model's
    Case(
        "layers-1e9",
        PREP,
        "num_hidden_layers = 1000000000 is out of range",
        config(num_hidden_layers=10**9),
    ),  # fmt: skip
    Case(
        "experts-1e9",
        PREP,
        "routed experts = 1000000000 is out of range",
        config(num_local_experts=10**9),
    ),  # fmt: skip
    Case(
        "layers-vs-tensors",
        PREP,
        "num_hidden_layers = 5, but the checkpoint holds layers 0..1",
        config(num_hidden_layers=5),
    ),  # fmt: skip
    Case(
        "experts-vs-tensors",
        PREP,
        "3 routed experts, but the checkpoint holds experts 0..3",
        config(num_local_experts=3),
    ),  # fmt: skip
    Case(
        "top-k-above-experts",
        PREP,
        r"num_experts_per_tok = 9 .*allowed: 1\.\.4",
        config(num_experts_per_tok=9),
    ),  # fmt: skip
    Case("top-k-0", PREP, "num_experts_per_tok = 0", config(num_experts_per_tok=0)),
    Case("heads-0", PREP, "num_attention_heads = 0", config(num_attention_heads=0)),
    Case(
        "rope-theta-negative",
        PREP,
        "rope_theta = -1.0",
        config(rope_parameters={"rope_type": "default", "rope_theta": -1.0}),
    ),
    # numbers: flags and the tuned config
    Case(
        "prefetch-depth-1e9",
        RUN + " --memory 60% --policy lru+prefetch --prefetch-depth 1000000000",
        r"prefetch depth = 1000000000 is out of range \(allowed: 0\.\.2\)",
    ),  # fmt: skip
    Case("memory-1000TB", RUN + " --memory 1000TB", "more than this machine's RAM"),
    Case("memory-negative", RUN + " --memory -5", "not understood"),
    Case(
        "tuned-memory-1e15", RUN, "memory = 1000000000000000 is out of range", tuned(memory=10**15)
    ),  # fmt: skip
    Case("tuned-policy-bogus", RUN, "policy 'bogus' is unknown", tuned(policy="bogus")),
    Case(
        "tuned-depth-1e9",
        RUN,
        "tuned config.*prefetch depth = 1000000000",
        tuned(prefetch_depth=10**9),
    ),  # fmt: skip
    Case("tuned-not-utf8", RUN, "is not readable", write("model/hobbit-config.json", b"\xfe\xff")),
    Case("temperature-nan", RUN + " --temperature nan", "temperature = nan is out of range"),
    Case("temperature-negative", RUN + " --temperature -1", "temperature = -1.0 is out of range"),
    Case(
        "top-p-negative", RUN + " --top-p -1", r"top_p = -1.0 is out of range \(allowed: \(0, 1\]"
    ),
    Case("top-p-2", RUN + " --top-p 2", "top_p = 2.0 is out of range"),
    Case("top-k-negative", RUN + " --top-k -1", "top_k = -1 is out of range"),
    Case("seed-huge", RUN + f" --seed {2**70}", "seed = 1180591620717411303424 is out of range"),
    Case("max-context-negative", RUN + " --max-context -1", "max_context = -1 is out of range"),
    Case(
        "max-context-above-model",
        RUN + " --max-context 100000",
        r"above this model's context of 512 \(its max_position_embeddings\)",
    ),  # fmt: skip
    Case(
        "prompt-not-utf8", "run {box}/model -p \udcff -n 2", "prompt holds bytes that are not UTF-8"
    ),
    Case(
        "eval-window-0",
        "eval ppl {box}/model --text {box}/notes.txt --window 0",
        "window = 0 is out of range",
    ),  # fmt: skip
    Case(
        "eval-binary-text",
        "eval ppl {box}/model --text {box}/model/dense-F32.gguf",
        "is not UTF-8 text|binary file",
    ),  # fmt: skip
    Case(
        "eval-not-utf8",
        "eval ppl {box}/model --text {box}/t.txt",
        "is not UTF-8 text",
        write("t.txt", b"caf\xe9 au lait"),
    ),  # fmt: skip
    Case("bench-repeat-0", "bench {box}/model --repeat 0 --policies lru", "--repeat = 0"),
    Case(
        "profile-calibration-missing",
        "profile {box}/model --calibration /missing",
        "calibration text /missing does not exist",
    ),  # fmt: skip
    Case(
        "recipe-not-utf8",
        PREP + " --recipe {box}/r.toml",
        "not valid TOML",
        write("r.toml", b"[prepare]\nhigh = '\xff'\n"),
    ),  # fmt: skip
    Case(
        "trace-truncated",
        "replay {box}/t.jsonl",
        "not a readable trace",
        both(trace, truncate("t.jsonl", 0.7)),
    ),  # fmt: skip
    Case(
        "trace-not-utf8",
        "replay {box}/t.jsonl",
        "not a readable trace",
        write("t.jsonl", b'{"kind": "hobbit-trace\xff"}\n'),
    ),  # fmt: skip
]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root -> what it is (a file's sha256, a link's target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def outside(snap: dict, out: str | None) -> dict:
    return {
        k: v for k, v in snap.items() if out is None or not (k == out or k.startswith(out + "/"))
    }


def half_written(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if HALF_WRITTEN.search(p.name)]


def invoke(argv: list[str]):
    return CliRunner().invoke(main, argv)


def assert_one_line_error(r, code: int, message: str | None) -> None:
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    if message is None:
        return
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    assert re.search(message, errors[0]), errors[0]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, box):
    if case.setup:
        case.setup(box)
    before = snapshot(box)
    argv = [a.replace("{box}", str(box)) for a in case.argv.split(" ")]
    r = invoke(argv)
    assert_one_line_error(r, case.code, case.message)
    assert outside(snapshot(box), case.out) == outside(before, case.out), "changed outside OUT"
    assert not half_written(box)


def test_check_names_the_corrupt_pack_and_pack_rebuilds_it(box):
    model = box / "model"
    flip("model/packs/experts-high.slots", lambda p: 100)(box)
    r = invoke(["prepare", str(model), "--check"])
    assert r.exit_code == 1 and "packs/experts-high.slots: layer 0 expert 0 fails" in r.output
    r = invoke(["pack", str(model)])
    assert r.exit_code == 0 and "experts-high: rebuilt" in r.output, r.output
    assert invoke(["prepare", str(model), "--check"]).exit_code == 0
    r = invoke(["run", str(model), "-p", "Hi", "-n", "2", "--memory", "60%"])
    assert r.exit_code == 0, r.output


def test_force_replaces_a_model_dir_and_an_empty_dir(box):
    (box / "empty").mkdir()
    for out in ("empty", "model"):
        r = invoke(["prepare", str(box / "hf"), "-o", str(box / out), "--force"])
        assert r.exit_code == 0, r.output
        assert (box / out / "manifest.json").is_file()
    assert (box / "notes.txt").read_text() == "mine" and (box / "hf" / "config.json").is_file()


def test_memory_above_the_experts_is_clamped(box):
    rt = hobbit_tools.load(box / "model", memory="1.5GiB")
    assert rt.info["cache_bytes"] <= rt.info["full_cache_bytes"] < 2**30


def test_sliding_window_cap_is_named(box):
    config(sliding_window=128)(box)
    r = invoke(["prepare", str(box / "hf"), "-o", str(box / "sw")])
    assert r.exit_code == 0, r.output
    r = invoke(["run", str(box / "sw"), "-p", "Hi", "-n", "2", "--max-context", "256"])
    assert_one_line_error(r, 1, "above this model's context of 128 .*sliding_window caps it")


def test_full_disk_before_and_during_prepare(box, monkeypatch):
    from hobbit_tools import shards, staging

    before = snapshot(box)
    usage = shutil.disk_usage(box)._replace(free=1000)
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda p: usage)
    r = invoke(["prepare", str(box / "hf"), "-o", str(box / "out")])
    assert_one_line_error(r, 1, r"needs about [\d.]+ (KiB|MiB), its filesystem has 1000 B free")
    monkeypatch.undo()

    def full(self, chunk):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(shards.ShardWriter, "write", full)
    r = invoke(["prepare", str(box / "hf"), "-o", str(box / "out")])
    assert_one_line_error(r, 1, "No space left on device.*the disk is full")
    assert snapshot(box) == before and not half_written(box)


def test_read_only_output(box, monkeypatch):
    from hobbit_tools import staging

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(staging.Path, "mkdir", read_only)
    r = invoke(["prepare", str(box / "hf"), "-o", str(box / "ro" / "out")])
    assert_one_line_error(r, 1, "Read-only file system.*choose a writable output path")


def test_stale_partial_dirs_of_dead_processes_are_swept(box):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = box / f".old-model.partial-{dead.pid}"
    live = box / f".other.partial-{os.getppid()}"  # a running process: kept
    for d in (stale, live):
        d.mkdir()
        (d / "big.gguf").write_bytes(b"x" * 100)
    r = invoke(["prepare", str(box / "hf"), "-o", str(box / "out")])
    assert r.exit_code == 0, r.output
    assert not stale.exists() and live.exists()


SLOW_PREPARE = (
    "import sys, time; from hobbit_tools import shards; w = shards.ShardWriter.write; "
    "shards.ShardWriter.write = lambda self, c: (time.sleep(0.02), w(self, c))[1]; "
    "from hobbit_tools.cli import main; sys.argv[0] = 'hobbit'; main()"
)


@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)],
    ids=["term", "kill"],
)
def test_killed_prepare_leaves_nothing_after_the_next_run(box, sig):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = ["prepare", str(box / "hf"), "-o", str(box / "out")]
    child = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, *argv], env=env)
    deadline = time.monotonic() + 60
    while not list(box.glob(".out.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert child.poll() is None, "prepare finished before it could be killed"
    child.send_signal(sig)
    assert child.wait(timeout=60) != 0
    assert not (box / "out").exists()
    if sig == signal.SIGTERM:
        assert not half_written(box), "SIGTERM must clean up like Ctrl-C"
    r = invoke(argv)
    assert r.exit_code == 0, r.output
    assert not half_written(box)


@pytest.mark.slow
def test_demo_cache_is_checked_and_rebuilt(tmp_path, monkeypatch):
    from hobbit_tools import demo
    from hobbit_tools.inspect import check
    from hobbit_tools.profile import profiler

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(profiler, "profile", lambda *a, **k: None)  # only the cache here
    said = []
    out = demo.prepared_demo(say=said.append)
    dense = next(out.glob("dense-*.gguf"))
    flip(dense.name, in_tensor("output_norm.weight"))(out)
    (out / "notes").mkdir()  # the cache is hobbit's own: rebuilt whole
    assert demo.prepared_demo(say=said.append) == out
    assert any("fails its check" in m and "sha256" in m for m in said), said
    assert check(out) == []  # (no packs: ggml computes on the shards; packs are checked above)

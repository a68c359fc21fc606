"""hobbit and llama.cpp on the same prepared model dir, at equal total memory, in one command.

llama.cpp (llama-cpp-python: a measurement tool, never a dependency of hobbit) maps the
dense + high split that `hobbit prepare` writes (MODEL_DIR/llamacpp/high-00001-of-00002.gguf)
as it always does; hobbit runs the same shards. Each run is a fresh process; under a limit
each runs in a cgroup-v1 memory cgroup of its own with `memory.limit_in_bytes` = the limit
(the page cache it causes is charged to it too), after the page cache is dropped, so both
start cold. Rounds interleave hobbit and llama.cpp; the table shows medians and the ratio.

    python scripts/vs_llamacpp.py MODEL_DIR [--limits none,450MiB,380MiB] [-n 64]
        [--rounds 3] [--threads N] [--profile] [--hobbit "--policy lru"]

--profile runs `hobbit profile` inside each limit first (its tuned config is written to
MODEL_DIR/hobbit-config-LIMIT.json, reused by later runs unless --reprofile, and used by that
limit's hobbit runs): what a user does on that machine.
Without a limit and without --profile hobbit runs its default (resident where the experts
fit). Needs root for the cgroups and for dropping the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hobbit_tools.llamacpp import measure  # noqa: E402
from hobbit_tools.runtime.budget import parse_memory  # noqa: E402
from hobbit_tools.runtime.threads import default_threads  # noqa: E402

PROMPT = (
    "It was a dark and stormy night, and the wind howled around the old house on the hill. "
    "Inside, by the light of a single candle, the girl and her little dog sat and listened "
    "to the rain, and the Scarecrow told them of the road of yellow brick that led far away "
    "to the great city, where the Wizard lived in a palace of green glass and gold."
)
CGROUPS = Path("/sys/fs/cgroup/memory")


class Limit:
    """A fresh memory cgroup per run: a shell prefix that joins it, and its peak after."""

    def __init__(self, spec: str, tag: str):
        self.spec = spec
        self.bytes = None if spec == "none" else parse_memory(spec, 0)
        self.dir = CGROUPS / f"hobbit-vs-{os.getpid()}-{tag}"

    def __enter__(self):
        if self.bytes is None:
            return self
        if not CGROUPS.is_dir():
            sys.exit(f"no cgroup-v1 memory controller at {CGROUPS}: cannot impose {self.spec}")
        self.dir.mkdir()
        (self.dir / "memory.limit_in_bytes").write_text(str(self.bytes))
        return self

    def prefix(self) -> list[str]:
        if self.bytes is None:
            return []
        return ["sh", "-c", f'echo $$ > {self.dir}/cgroup.procs && exec "$@"', "sh"]

    def peak(self) -> int | None:
        if self.bytes is None:
            return None
        return int((self.dir / "memory.max_usage_in_bytes").read_text())

    def __exit__(self, *exc):
        if self.bytes is not None:
            self.dir.rmdir()


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root: runs start warm, both alike


def run_hobbit(model_dir, limit: Limit, args, config: str | None) -> dict:
    cmd = [sys.executable, "-m", "hobbit_tools", "run", model_dir, "-p", PROMPT,
           "-n", str(args.n), "--threads", str(args.threads), "--json"]  # fmt: skip
    cmd += ["--config", config] if config else []
    cmd += shlex.split(args.hobbit)
    done = subprocess.run(limit.prefix() + cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    s = json.loads(done.stdout)["stats"]
    return {
        "decode_tokens_per_s": s["decode_tokens_per_s"],
        "prefill_tokens_per_s": s["prefill_tokens_per_s"],
        "hit_rate": s.get("hit_rate"),
        "read_per_token": s.get("bytes_read", 0) / max(s.get("new_tokens", 1), 1),
        "peak_rss_bytes": s.get("peak_rss_bytes"),
        "policy": s["load"]["policy"],
        "cache": s["load"]["cache_bytes"],
        "share": s.get("share"),
    }


def run_llama(model_dir, limit: Limit, args) -> dict:
    try:
        return measure(model_dir, [PROMPT], args.n, args.threads, prefix=limit.prefix())
    except Exception as e:  # noqa: BLE001 - a crash or OOM kill is a result here
        return {"error": [str(e)]}


def profile_in(model_dir, spec: str, args) -> str:
    out = Path(model_dir) / f"hobbit-config-{spec}.json"
    if out.is_file() and not args.reprofile:
        print(f"  reusing {out} (--reprofile to profile again)", flush=True)
        return str(out)
    with Limit(spec, "profile") as limit:
        cmd = [sys.executable, "-m", "hobbit_tools", "profile", model_dir, "-o", out]
        cmd += shlex.split(args.profile_args)
        done = subprocess.run(limit.prefix() + cmd, capture_output=True, text=True)
        peak = limit.peak()
    if done.returncode != 0:
        sys.exit(f"hobbit profile under {spec} failed: {(done.stderr or done.stdout)[-400:]}")
    print(f"  profiled under {spec} (peak {peak and peak >> 20} MiB) -> {out}", flush=True)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--limits", default="none", help="Total-memory limits, comma-separated.")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        help="Compute threads of both (default: hobbit's, the CPUs free here, looked at once).",
    )
    ap.add_argument(
        "--profile", action="store_true", help="hobbit profile inside each limit first."
    )
    ap.add_argument("--reprofile", action="store_true", help="Profile even where a config exists.")
    ap.add_argument("--profile-args", default="", help="Extra `hobbit profile` arguments.")
    ap.add_argument("--hobbit", default="", help="Extra `hobbit run` arguments.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.threads = args.threads or default_threads()
    print(f"  {args.threads} compute thread(s) each", flush=True)
    rows = []
    for spec in args.limits.split(","):
        config = profile_in(args.model_dir, spec, args) if args.profile else None
        ours, theirs = [], []
        for r in range(args.rounds):
            for who, runs in (("hobbit", ours), ("llama.cpp", theirs)):
                drop_page_cache()
                with Limit(spec, f"{who}-{r}") as limit:
                    if who == "hobbit":
                        res = run_hobbit(args.model_dir, limit, args, config)
                    else:
                        res = run_llama(args.model_dir, limit, args)
                    res["peak_bytes"] = limit.peak()
                runs.append(res)
                brief = res.get("error") or f"{res['decode_tokens_per_s']:.2f} tok/s"
                print(f"  {spec} round {r + 1}: {who} {brief}", flush=True)
        rows.append({"limit": spec, "hobbit": ours, "llama.cpp": theirs})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"\n{'limit':>8} | {'hobbit':>16} | {'llama.cpp':>16} | ratio | prefill hobbit / llama.cpp "
        "| peak RSS MiB hobbit / llama.cpp | hobbit run"
    )
    for row in rows:
        med, pre = {}, {}
        for who in ("hobbit", "llama.cpp"):
            ok = [x for x in row[who] if "decode_tokens_per_s" in x]
            med[who] = statistics.median(x["decode_tokens_per_s"] for x in ok) if ok else None
            pre[who] = statistics.median(x["prefill_tokens_per_s"] for x in ok) if ok else None
        h, l_ = med["hobbit"], med["llama.cpp"]
        prefill = (
            f"{pre['hobbit']:.0f} / {pre['llama.cpp']:.0f} tok/s"
            if pre["hobbit"] and pre["llama.cpp"]
            else "-"
        )
        ratio = f"{h / l_:.2f}x" if h and l_ else "-"
        last = next((x for x in reversed(row["hobbit"]) if "policy" in x), {})
        what = (
            f"{last['policy']}, cache {last['cache'] >> 20} MiB, hits {last['hit_rate'] or 0:.0%}, "
            f"read {last['read_per_token'] / 2**20:.0f} MiB/token"
            if last
            else (row["hobbit"][-1].get("error") or ["?"])[-1]
        )
        fmt = lambda v: f"{v:.2f} tok/s" if v else "failed"  # noqa: E731
        # RSS (the mapped file's resident pages included); the cgroup's own peak, which
        # counts the page cache too, sits at the limit for both whenever it binds
        peaks = [max((x.get("peak_rss_bytes") or 0 for x in row[w]), default=0) >> 20 for w in med]
        peak = " / ".join(str(v) if v else "-" for v in peaks)
        print(
            f"{row['limit']:>8} | {fmt(h):>16} | {fmt(l_):>16} | {ratio:>5} | {prefill:>26} "
            f"| {peak:>31} | {what}"
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The CI artifact pipeline: prepare -> prepare --check -> profile -> run --json smoke test.
#
#   scripts/pipeline.sh [--recipe NAME|FILE] [--quick] HF_CHECKPOINT OUT_DIR
#
# Leaves in OUT_DIR/model the shards, manifest.json, hobbit-config.json and
# profile-report.md, and in OUT_DIR the JSON each stage printed. Exits non-zero on the first
# failing stage, naming it.
set -euo pipefail

recipe=() quick=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --recipe) recipe=(--recipe "$2"); shift 2 ;;
    --quick) quick=(--quick); shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[[ $# -eq 2 ]] || { echo "usage: $0 [--recipe R] [--quick] HF_CHECKPOINT OUT_DIR" >&2; exit 2; }
src=$1 out=$2
mkdir -p "$out"

stage() {  # stage NAME OUTPUT_JSON COMMAND...
  local name=$1 file=$2; shift 2
  echo "== $name" >&2
  if ! "$@" > "$out/$file"; then
    echo "pipeline: stage '$name' failed" >&2
    exit 1
  fi
}

stage prepare prepare.json hobbit prepare "$src" -o "$out/model" --force "${recipe[@]}" --json
stage check check.json hobbit prepare "$out/model" --check --json
stage profile profile.json hobbit profile "$out/model" "${recipe[@]}" "${quick[@]}" --json
stage run run.json hobbit run "$out/model" -p "The quick brown fox" -n 16 --json
python3 - "$out/run.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["token_ids"], "the smoke run generated no tokens"
print(f"== ok: {len(r['token_ids'])} tokens, {r['stats']['decode_tokens_per_s']:.1f} tok/s, "
      f"policy {r['stats']['load']['policy']}", file=sys.stderr)
PY

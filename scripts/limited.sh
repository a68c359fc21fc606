#!/bin/sh
# Run a command under a cgroup v1 memory limit, then print the cgroup's peak usage.
#   scripts/limited.sh 700M hobbit run MODEL_DIR -p "..." --json
# Needs root and the v1 memory controller at /sys/fs/cgroup/memory. The peak counts page
# cache too (reclaimable: the kernel frees it before it would refuse memory); expert reads
# use O_DIRECT and add none.
set -eu
limit=$1
shift
root=/sys/fs/cgroup/memory
cg=$root/hobbit-limited-$$
mkdir "$cg"
trap 'rmdir "$cg"' EXIT
echo "$limit" > "$cg/memory.limit_in_bytes"
rc=0
sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' sh "$cg" "$@" || rc=$?
peak=$(cat "$cg/memory.max_usage_in_bytes")
echo "[limited.sh: limit $(cat "$cg/memory.limit_in_bytes") bytes, peak $peak bytes" \
     "($((peak / 1048576)) MiB), limit reached $(cat "$cg/memory.failcnt") times, rc $rc]" >&2
exit $rc

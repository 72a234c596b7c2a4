#!/usr/bin/env bash
# Instructions per message of two commits under callgrind: bench/callgrind_ab.sh OLD [NEW]
# (NEW defaults to HEAD; WORKTREE = the checkout as it is). Each ref is unpacked with
# git archive into a temporary directory; bench/callgrind_session.py (from the checkout, so
# both run the same workload) runs at two counts per mode and the difference is divided by
# the extra messages, so start-up and setup cancel out. Needs valgrind; ~15 minutes.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
old=$1 new=${2:-HEAD}
py=${PYTHON:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unpack() {  # ref dir
    mkdir -p "$2"
    if [ "$1" = WORKTREE ]; then cp -r "$here/src" "$2/"; else git -C "$here" archive "$1" src | tar -x -C "$2"; fi
}
unpack "$old" "$tmp/old"
unpack "$new" "$tmp/new"
instructions() {  # tree mode count [chunk]
    PYTHONPATH="$tmp/$1/src" valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        "$py" "$here/bench/callgrind_session.py" "$2" --count "$3" 2>&1 |
        sed -n 's/.*Collected : *\([0-9]*\).*/\1/p'
}
printf '%-6s %-4s %8s %8s %16s\n' mode tree low high 'instr/message'
specs=("ping 300 900" "bulk 200 600" "bulk8 200 600")
# CG_SPECS="bulk8 200 600,ping 100 300" runs only those (mode low high, comma-separated)
if [ -n "${CG_SPECS:-}" ]; then IFS=, read -ra specs <<< "$CG_SPECS"; fi
for spec in "${specs[@]}"; do
    set -- $spec
    mode=$1 low=$2 high=$3
    for tree in old new; do
        a=$(instructions $tree "$mode" "$low")
        b=$(instructions $tree "$mode" "$high")
        printf '%-6s %-4s %8s %8s %16s\n' "$mode" "$tree" "$a" "$b" $(( (b - a) / (high - low) ))
    done
done

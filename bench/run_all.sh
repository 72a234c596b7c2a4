#!/usr/bin/env bash
# Every measurement behind docs/performance.md, in order; raw output goes to bench/results/.
# Takes about 15 minutes on the 2-core benchmark machine (longer while other work runs: each
# sample waits up to --quiet-wait seconds for the CPUs to go idle). Each command has a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
# the interpreter of the active virtual environment unless PYTHON names another
PY=${PYTHON:-python}
OUT=bench/results
mkdir -p "$OUT"
run() {
    local name=$1
    shift
    echo "== $name: $*"
    timeout 1500 "$PY" "$@" --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1
    grep -v '^  \[' "$OUT/$name.txt" | tail -n 25
}
{
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "kernel: $(uname -r)"
    "$PY" -c 'import sys, trio, msgpack, attrs, importlib.metadata as m
print("python", sys.version.split()[0], "| trio", trio.__version__,
      "| msgpack", ".".join(map(str, msgpack.version)), "| attrs", attrs.__version__,
      "| cattrs", m.version("cattrs"))'
    echo "git: $(git rev-parse --short HEAD) $(git status --porcelain src | wc -l) files modified in src/"
} | tee "$OUT/machine.txt"

run frames bench/bench_frames.py
run session_a bench/bench_session.py --repeat 5 --plain8 --tls --quiet-wait 3
run session_b bench/bench_session.py --repeat 5 --plain8 --quiet-wait 3
run latency bench/bench_session.py --latency --repeat 5 --pings 3000 --quiet-wait 3
run window bench/bench_session.py --window-sweep --windows 64K,256K,1M,2M,4M,16M --repeat 5 --quiet-wait 3
run window_rtt10 bench/bench_session.py --window-sweep --rtt-ms 10 --repeat 3 --quiet-wait 3
run wbh_recv bench/bench_session.py --wbh-sweep --receive-size-sweep --repeat 5 --quiet-wait 3
run chunk bench/bench_session.py --chunk-sweep --chunk 256K --recv-size 256K --repeat 5 --quiet-wait 3

#!/usr/bin/env python3
"""A node's own CPU per claim when many claims are in flight at once (what a surviving node
does when a dead node's clients restore their forwards on it), against a real etcd.

One ``EtcdRegistry`` (lease, renewals) in this process; for each burst size, that many
claims of distinct keys are started together, then released together. The figure is this
process's CPU time (``time.process_time``: etcd runs in its own process) per request, so it
does not depend on how busy the machine is; the wall time is shown too. Each ``--code``
tree is run in a fresh interpreter of its own, in turn, repeated ``--rounds`` times, so two
versions are compared under the same load:

    python bench/bench_cluster_claims.py --code /tmp/base/src src --bursts 1 64 512
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

_CHILD = """
import json, sys, time, trio
from pytunnel.cluster import EtcdRegistry

async def main(endpoint, bursts):
    registry = EtcdRegistry(endpoint, "bench", lease_ttl=10)
    rows = []
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        for burst in bursts:
            for phase in ("claim", "release"):
                cpu, wall = time.process_time(), time.perf_counter()
                failed = [0]
                async def one(i):
                    key, owner = f"tcp/{10000 + i}", f"bench/s{i}"
                    try:
                        if phase == "claim":
                            await registry.claim(key, owner)
                        else:
                            await registry.release(key, owner)
                    except Exception:
                        failed[0] += 1
                async with trio.open_nursery() as burst_nursery:
                    for i in range(burst):
                        burst_nursery.start_soon(one, i)
                rows.append({
                    "burst": burst, "phase": phase, "failed": failed[0],
                    "cpu_us": (time.process_time() - cpu) / burst * 1e6,
                    "wall_ms": (time.perf_counter() - wall) * 1e3,
                })
        nursery.cancel_scope.cancel()
    print(json.dumps(rows))

trio.run(main, sys.argv[1], [int(b) for b in sys.argv[2:]])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", nargs="+", default=["src"], help="PYTHONPATH trees to compare")
    parser.add_argument("--bursts", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_cluster import start_etcd

    print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as work:
        etcd, endpoint = start_etcd(os.path.join(work, "etcd"))
        try:
            results: dict[str, list[list[dict[str, float]]]] = {c: [] for c in args.code}
            for _ in range(args.rounds):
                for code in args.code:
                    out = subprocess.run(
                        [sys.executable, "-c", _CHILD, endpoint, *map(str, args.bursts)],
                        env={**os.environ, "PYTHONPATH": os.path.abspath(code)},
                        capture_output=True,
                        text=True,
                        timeout=600,
                        check=True,
                    )
                    results[code].append(json.loads(out.stdout))
        finally:
            etcd.send_signal(signal.SIGKILL)  # ours, by its handle
            etcd.wait()
    for code, runs in results.items():
        print(f"== {code}")
        for index, row in enumerate(runs[0]):
            cpu = sorted(run[index]["cpu_us"] for run in runs)
            wall = sorted(run[index]["wall_ms"] for run in runs)
            failed = sum(run[index]["failed"] for run in runs)
            print(
                f"  {row['phase']:>7} burst {row['burst']:>4}: CPU per request "
                f"{cpu[len(cpu) // 2]:7.0f} us (min {cpu[0]:.0f}, max {cpu[-1]:.0f}), "
                f"wall {wall[len(wall) // 2]:7.1f} ms, failed {failed}",
                flush=True,
            )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    time.sleep(0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Instructions per ``math.add`` request of the task server (and of uvicorn + Starlette doing
the same work), counted by ``valgrind --tool=callgrind`` in the server process alone.

wrk's figures move with the machine's load; the instructions a server executes for a request
do not. For each server, a fresh process runs twice under callgrind, once answering ``--low``
and once ``--high`` requests of ``bench/bench_tasks.py``'s body over ``--connections``
kept-alive connections (one thread each, requests in turn, the client not under callgrind),
and ``(I(high) - I(low)) / (high - low)`` is one request's cost: start-up, imports, the
warm-up and the shutdown cancel out. ``python`` runs once per source tree given (a directory
holding ``src/pytunnel``), ``starlette`` once. The server ends with SIGINT (a clean exit, so
callgrind writes its totals) and, failing that, by its pid.

    git archive OLD src | tar -x -C /tmp/old    # likewise NEW into /tmp/new
    python bench/callgrind_tasks.py /tmp/old /tmp/new --servers python,starlette

Slow (callgrind runs Python 30-60 times slower): about a minute per server and count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tasks import BODY, TOKEN
from bench_tunnel import (
    HOST,
    BenchError,
    Processes,
    callgrind_total,
    listening,
    reported_port,
    run_dir,
    wait_for,
)

BENCH_TASKS = Path(__file__).resolve().parent / "bench_tasks.py"
HEADERS = {"content-type": "application/json; charset=utf-8", "x-runner-token": TOKEN}
WARM_UP = 20


def _calls(port: int, count: int) -> None:
    """``count`` requests in turn on one kept-alive connection, each answer checked."""
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    try:
        for _ in range(count):
            conn.request("POST", "/__runner/task/math.add", body=BODY, headers=HEADERS)
            response = conn.getresponse()
            answer = json.loads(response.read())
            if response.status != 200 or answer != {"ok": True, "result": 3}:
                raise BenchError(f"answered {response.status} {answer!r}")
    finally:
        conn.close()


def _load(port: int, count: int, connections: int) -> None:
    errors: list[BaseException] = []

    def run(share: int) -> None:
        try:
            _calls(port, share)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    shares = [count // connections + (i < count % connections) for i in range(connections)]
    threads = [threading.Thread(target=run, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def measure(procs: Processes, server: str, tree: Path | None, count: int, connections: int) -> int:
    """Instructions of one server process over start-up, a warm-up, ``count`` requests and
    its shutdown."""
    env = {"PYTHONPATH": str(tree / "src")} if tree is not None else {}
    child = procs.start(
        server,
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            str(BENCH_TASKS),
            "--child",
            server,
            "--port",
            "0",  # the child binds and says which port: none chosen here can be taken first
        ],
        env=env,
    )
    port = reported_port(child, r"^listening on (\d+)$", f"{server}'s port")
    # a child may say its port once bound, before it listens (uvicorn listens later)
    wait_for(f"{server} to listen", lambda: listening(port), 300, child, step=0.5)
    _load(port, WARM_UP, connections)
    _load(port, count, connections)
    child.popen.send_signal(signal.SIGINT)
    try:
        child.popen.wait(timeout=120)
    finally:
        procs.stop(child)
    return callgrind_total(child, server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", type=Path, help="directories holding src/pytunnel")
    parser.add_argument("--servers", default="python,starlette", help="python, starlette")
    parser.add_argument("--low", type=int, default=200)
    parser.add_argument("--high", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=1)
    args = parser.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    if set(servers) - {"python", "starlette"}:
        parser.error("--servers: python and/or starlette")
    runs: list[tuple[str, Path | None]] = []
    for server in servers:
        if server == "python":
            runs.extend(("python", tree) for tree in (args.trees or [None]))
        else:
            runs.append((server, None))
    print(
        f"{args.connections} connection(s), {args.low} and {args.high} requests\n"
        f"{'server':<10} {'tree':<24} {'I(low)':>14} {'I(high)':>14} {'instr/request':>14}",
        flush=True,
    )
    with run_dir("pytunnel-callgrind-tasks-") as procs:
        for server, tree in runs:
            start = time.monotonic()
            low = measure(procs, server, tree, args.low, args.connections)
            high = measure(procs, server, tree, args.high, args.connections)
            per = (high - low) // (args.high - args.low)
            name = str(tree) if tree is not None else "-"
            print(
                f"{server:<10} {name:<24} {low:>14} {high:>14} {per:>14}"
                f"   ({time.monotonic() - start:.0f} s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

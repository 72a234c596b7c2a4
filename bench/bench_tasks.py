#!/usr/bin/env python3
"""Task server benchmark: wrk POSTing a small JSON task (``math.add``) at the same work served
four ways, side by side in one run:

1. ``python``: :class:`pytunnel.tasks.TaskServer` on a local port;
2. ``python-R``: the same server reached through a tunnel with no local port (``pytunnel
   serve`` + ``pytunnel tasks serve --tunnel``, the public port at the tunnel server);
3. ``node``: the real Runner server (``nodeExposure`` of ``@bluelibs/runner`` 5.5,
   ``tests/node/runner_server.mjs``);
4. ``starlette``: uvicorn + Starlette doing the same work (read the JSON body, check the
   token, add, answer the envelope), the ``bench`` extra.

Figures: requests/s and p50 / p99 latency (wrk ``--latency``), the median of ``--repeat``
samples; each server is checked with one real call before it is measured. Every server is a
child process on 127.0.0.1, ended by its pid however the benchmark ends. Needs wrk and node
(``bench/setup_tools.sh``); the Runner package is the tests' npm install
(``PYTUNNEL_NPM_RUNNER``, default /tmp/pytunnel-npm-runner). Not part of CI.

    python bench/bench_tasks.py                 # 3 repeats of 5 s
    python bench/bench_tasks.py --quick         # 1 repeat of 3 s
    python bench/bench_tasks.py --paths python,starlette --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _quiet import wait_quiet

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-task-token"
TUNNEL_TOKEN = "bench-tunnel-token"
BODY = '{"input":{"a":1,"b":2}}'
PATHS = ("python", "python-R", "node", "starlette")
RUNNER_DIR = Path(os.environ.get("PYTUNNEL_NPM_RUNNER", "/tmp/pytunnel-npm-runner"))


# --------------------------------------------------------------------------- the servers


def serve_python(port: int) -> None:
    import trio

    from pytunnel.tasks import TaskServer

    trio.run(_serve_main(build_python(TaskServer), port))


def build_python(task_server: Any) -> Any:
    server = task_server(token=TOKEN)

    @server.task("math.add")
    async def add(value: Any) -> Any:
        return value["a"] + value["b"]

    return server


def _serve_main(server: Any, port: int) -> Any:
    async def main() -> None:
        import trio

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, HOST, port)
            _bound(listeners[0].socket.getsockname()[1])

    return main


def _bound(port: int) -> None:
    """Say which port a ``--child`` server listens on: asked for port 0, it is the only one
    that knows (``callgrind_tasks.py`` reads this line; a port chosen before the child bound
    it could be taken in between by another process)."""
    print(f"listening on {port}", flush=True)


def serve_starlette(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def add(request: Request) -> JSONResponse:
        if request.headers.get("x-runner-token") != TOKEN:
            return JSONResponse(
                {"ok": False, "error": {"message": "Unauthorized", "code": "UNAUTHORIZED"}}, 401
            )
        body = await request.json()
        value = body["input"]
        return JSONResponse({"ok": True, "result": value["a"] + value["b"]})

    app = Starlette(routes=[Route("/__runner/task/math.add", add, methods=["POST"])])
    # bound here, not by uvicorn, so that the port it got is known at any log level
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    _bound(sock.getsockname()[1])
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


class Children:
    """Child processes, each ended by its pid at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            args,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def env_with_sources() -> dict[str, str]:
    src = str(ROOT / "src")
    return {"PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


@contextlib.contextmanager
def servers(paths: list[str]) -> Iterator[dict[str, int]]:
    children = Children()
    ports: dict[str, int] = {}
    env = env_with_sources()
    me = [sys.executable, str(Path(__file__).resolve())]
    try:
        if "python" in paths:
            ports["python"] = free_port()
            children.start([*me, "--child", "python", "--port", str(ports["python"])], env)
        if "python-R" in paths:
            tunnel_port = free_port()
            ports["python-R"] = free_port()
            children.start(
                [
                    sys.executable,
                    "-m",
                    "pytunnel",
                    "serve",
                    "--listen",
                    f"{HOST}:{tunnel_port}",
                    "--public-host",
                    HOST,
                ],
                {**env, "PYTUNNEL_TOKEN": TUNNEL_TOKEN},
            )
            wait_port(tunnel_port)
            children.start(
                [
                    sys.executable,
                    "-m",
                    "pytunnel",
                    "tasks",
                    "serve",
                    "bench_tasks:APP",
                    "--tunnel",
                    f"{HOST}:{tunnel_port}",
                    "--remote-port",
                    str(ports["python-R"]),
                ],
                {
                    **env,
                    "PYTUNNEL_TOKEN": TUNNEL_TOKEN,
                    "PYTHONPATH": str(ROOT / "bench") + os.pathsep + env["PYTHONPATH"],
                },
            )
        if "node" in paths:
            ports["node"] = free_port()
            children.start(
                ["node", str(ROOT / "tests" / "node" / "runner_server.mjs")],
                {
                    "RUNNER_DIR": str(RUNNER_DIR),
                    "RUNNER_TOKEN": TOKEN,
                    "RUNNER_PORT": str(ports["node"]),
                },
            )
        if "starlette" in paths:
            ports["starlette"] = free_port()
            children.start([*me, "--child", "starlette", "--port", str(ports["starlette"])], env)
        for name, port in ports.items():
            wait_port(port)
            check(name, port)
        yield ports
    finally:
        children.stop()


def check(name: str, port: int) -> None:
    """One real call: the server answers the envelope with the sum."""
    request = urllib.request.Request(
        f"http://{HOST}:{port}/__runner/task/math.add",
        data=BODY.encode(),
        headers={"x-runner-token": TOKEN, "content-type": "application/json"},
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.loads(response.read())
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    if answer != {"ok": True, "result": 3}:
        raise RuntimeError(f"{name} answered {answer!r}")


# --------------------------------------------------------------------------- wrk


def wrk_script(directory: str) -> str:
    path = os.path.join(directory, "post.lua")
    with open(path, "w") as fh:
        fh.write(
            'wrk.method = "POST"\n'
            f"wrk.body = '{BODY}'\n"
            'wrk.headers["content-type"] = "application/json; charset=utf-8"\n'
            f'wrk.headers["x-runner-token"] = "{TOKEN}"\n'
        )
    return path


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(port: int, script: str, seconds: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            script,
            f"http://{HOST}:{port}/__runner/task/math.add",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error answers")
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--paths", default=",".join(PATHS), help="comma-separated: " + ", ".join(PATHS)
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 3 s")
    parser.add_argument("--json", help="write every sample here")
    parser.add_argument(
        "--quiet-wait", type=float, default=20, help="longest wait for idle CPUs before a sample"
    )
    parser.add_argument("--child", choices=["python", "starlette"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        # a child started from a background job inherits SIGINT ignored; it is how the
        # callgrind count ends a server cleanly
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.child == "python":
        serve_python(args.port)
        return
    if args.child == "starlette":
        serve_starlette(args.port)
        return
    if args.quick:
        args.repeat, args.seconds = 1, 3
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    for tool in ["wrk", *(["node"] if "node" in paths else [])]:
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (bench/setup_tools.sh)")
    samples: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    with tempfile.TemporaryDirectory() as tmp, servers(paths) as ports:
        script = wrk_script(tmp)
        for name in paths:  # warm-up (JITs, caches, connection setup)
            run_wrk(ports[name], script, 1, args.connections)
        for repeat in range(args.repeat):
            order = paths[repeat % len(paths) :] + paths[: repeat % len(paths)]
            for name in order:
                busy = wait_quiet(args.quiet_wait)
                if busy >= 0.10:
                    print(f"note: {name} sample taken with others using {busy:.0%} of the CPUs")
                samples[name].append(run_wrk(ports[name], script, args.seconds, args.connections))
    print(f"wrk -t2 -c{args.connections} -d{args.seconds}s, POST math.add, median of {args.repeat}")
    print(
        f"{'path':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs node':>8} {'vs starlette':>13}"
    )
    medians = {
        name: {key: statistics.median(s[key] for s in runs) for key in ("rps", "p50_ms", "p99_ms")}
        for name, runs in samples.items()
    }
    for name, m in medians.items():
        vs_node = f"{m['rps'] / medians['node']['rps']:.2f}x" if "node" in medians else "-"
        vs_star = (
            f"{m['rps'] / medians['starlette']['rps']:.2f}x" if "starlette" in medians else "-"
        )
        figures = f"{m['rps']:>9.0f} {m['p50_ms']:>8.2f} {m['p99_ms']:>8.2f}"
        print(f"{name:<10} {figures} {vs_node:>8} {vs_star:>13}")
    paired = paired_ratios(samples)
    if paired:
        print("paired req/s ratio (median over repetitions of A/B in the same repetition):")
        for pair, (median, low, high) in paired.items():
            print(f"  {pair:<20} {median:.2f} ({low:.2f}..{high:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "samples": samples,
                    "medians": medians,
                    "paired": {k: list(v) for k, v in paired.items()},
                },
                fh,
                indent=2,
            )


def paired_ratios(
    samples: dict[str, list[dict[str, float]]],
) -> dict[str, tuple[float, float, float]]:
    """req/s of each Python path over each reference taken in the same repetition: samples
    of one repetition saw the same machine, so their ratio moves much less with the load than
    the ratio of the medians. Median, min and max over the repetitions."""
    found = {}
    for mine in ("python", "python-R"):
        for other in ("starlette", "node"):
            if mine in samples and other in samples:
                ratios = [
                    a["rps"] / b["rps"]
                    for a, b in zip(samples[mine], samples[other], strict=True)
                    if b["rps"] > 0
                ]
                if ratios:
                    found[f"{mine} / {other}"] = (
                        statistics.median(ratios),
                        min(ratios),
                        max(ratios),
                    )
    return found


#: the application ``pytunnel tasks serve bench_tasks:APP`` loads for the tunnelled path
def APP() -> Any:
    from pytunnel.tasks import TaskServer

    return build_python(TaskServer)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Throughput of one ``-L`` connection over each transport, in one run: raw TCP, TLS,
WebSocket, and WebSocket behind nginx (TLS at nginx, plain WebSocket to the server), with a
direct connection (no tunnel) as the reference.

Everything is real processes on 127.0.0.1: ``pytunnel serve`` and ``pytunnel connect`` (the
CLI of this checkout), nginx (``/usr/sbin/nginx``, a private prefix and config), and a sink in
this process that reads and discards. A sample pushes ``--mib`` MiB through the forward, half
closes, and waits for the sink's close: MB/s is bytes over that time. Samples of the cases run
back to back, in an order rotated per repeat; the median of ``--repeat`` is reported.

    python bench/bench_transports.py                 # 3 repeats of 256 MiB
    python bench/bench_transports.py --quick         # 1 repeat of 64 MiB
    python bench/bench_transports.py --cases raw,ws  # a subset

Processes are ended by pid when the run ends, however it ends; the temporary directory (the
self-signed certificate, nginx's prefix) is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

# the private nginx configuration frame the tests use too
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from nginx_conf import NGINX, nginx_conf

HOST = "127.0.0.1"
TOKEN = "bench-transports"
CASES = ["direct", "raw", "tls", "ws", "ws-nginx"]
SRC = str(Path(__file__).resolve().parent.parent / "src")
CHUNK = 256 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Sink:
    """A TCP server that reads and discards, closing each connection at its EOF."""

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        with conn:
            while conn.recv(1 << 20):
                pass


def push(port: int, mib: int) -> float:
    """MB/s of ``mib`` MiB sent to ``port`` until the far end closed after our EOF."""
    block = os.urandom(CHUNK)
    total = mib << 20
    with socket.create_connection((HOST, port), timeout=120) as s:
        start = time.perf_counter()
        sent = 0
        while sent < total:
            s.sendall(block)
            sent += len(block)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        elapsed = time.perf_counter() - start
    return total / elapsed / 1e6


class Processes:
    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": SRC}
        process = subprocess.Popen(
            list(args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
        )
        self.started.append(process)
        return process

    def pytunnel(self, *args: str) -> subprocess.Popen[bytes]:
        return self.start(sys.executable, "-m", "pytunnel", *args)

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _line(process: subprocess.Popen[bytes], pattern: str, timeout: float = 30) -> re.Match[str]:
    """The first stdout line of ``process`` matching ``pattern`` (bounded in time)."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"{process.args[3:5]} exited with {process.wait()}")
        match = re.search(pattern, line)
        if match:
            return match
    raise RuntimeError(f"no line matching {pattern!r}")


def _wait_listening(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _nginx_config(prefix: Path, port: int, upstream: int) -> str:
    return nginx_conf(
        prefix,
        f"""
    server {{
        listen {HOST}:{port} ssl;
        ssl_certificate {prefix}/tls/server.crt;
        ssl_certificate_key {prefix}/tls/server.key;
        location /tunnel {{
            proxy_pass http://{HOST}:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 1h;
        }}
    }}""",
        log_level="warn",
    )


def forward_port(procs: Processes, case: str, sink: int, tmp: Path) -> int:
    """Start what ``case`` needs; the local port whose connections reach the sink."""
    if case == "direct":
        return sink
    serve = ["serve", "--listen", f"{HOST}:0", "--token", TOKEN, "--log-level", "warning"]
    connect = ["--token", TOKEN, "--log-level", "warning", "-L", f"0:{HOST}:{sink}"]
    if case == "tls":
        server = procs.pytunnel(*serve, "--tls-self-signed", "--tls-dir", str(tmp / "tls"))
    elif case.startswith("ws"):
        server = procs.pytunnel(*serve, "--ws-path", "/tunnel")
    else:
        server = procs.pytunnel(*serve)
    port = int(_line(server, r"listening on [\d.]+:(\d+)").group(1))
    if case == "raw":
        client = procs.pytunnel("connect", f"{HOST}:{port}", *connect)
    elif case == "tls":
        pin = _line(server, r"fingerprint: (SHA256:\S+)").group(1)
        client = procs.pytunnel("connect", f"{HOST}:{port}", "--tls-fingerprint", pin, *connect)
    elif case == "ws":
        client = procs.pytunnel("connect", f"ws://{HOST}:{port}/tunnel", *connect)
    else:
        assert NGINX is not None
        sys.path.insert(0, SRC)
        import trio

        import pytunnel.tls

        _, _, pin = trio.run(pytunnel.tls.ensure_self_signed, tmp / "tls")
        nginx_port = _free_port()
        (tmp / "nginx.conf").write_text(_nginx_config(tmp, nginx_port, port))
        procs.start(NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"))
        _wait_listening(nginx_port)
        url = f"wss://{HOST}:{nginx_port}/tunnel"
        client = procs.pytunnel("connect", url, "--tls-fingerprint", pin, *connect)
    return int(_line(client, r"local forward [\d.]+:(\d+)").group(1))


@contextlib.contextmanager
def running(case: str, sink: int) -> Iterator[int]:
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="bench-transports-"))
    try:
        yield forward_port(procs, case, sink, tmp)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="samples per case")
    parser.add_argument("--mib", type=int, default=256, help="MiB per sample")
    parser.add_argument("--quick", action="store_true", help="1 repeat of 64 MiB")
    parser.add_argument("--cases", default=",".join(CASES), help=f"subset of {CASES}")
    args = parser.parse_args()
    repeat, mib = (1, 64) if args.quick else (args.repeat, args.mib)
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}")
    if "ws-nginx" in cases and NGINX is None:
        print("nginx is not installed: skipping ws-nginx", file=sys.stderr)
        cases.remove("ws-nginx")
    sink = Sink()
    samples: dict[str, list[float]] = {case: [] for case in cases}
    for r in range(repeat):
        order = cases[r % len(cases) :] + cases[: r % len(cases)]
        for case in order:
            with running(case, sink.port) as port:
                push(port, 8)  # warm up: connections set up, windows grown
                samples[case].append(push(port, mib))
            print(f"  {case:<9} {samples[case][-1]:8.1f} MB/s", file=sys.stderr)
    reference = statistics.median(samples["direct"]) if samples.get("direct") else None
    print(f"\none -L connection, {mib} MiB per sample, median of {repeat}\n")
    print("| transport | MB/s (median) | min..max | ratio to raw TCP tunnel |")
    print("|---|---|---|---|")
    raw = statistics.median(samples["raw"]) if samples.get("raw") else None
    for case in cases:
        values = samples[case]
        median = statistics.median(values)
        ratio = f"{median / raw:.2f}x" if raw else "-"
        print(f"| {case} | {median:.0f} | {min(values):.0f}..{max(values):.0f} | {ratio} |")
    if reference:
        print(f"\n(direct connection, no tunnel: {reference:.0f} MB/s)")


if __name__ == "__main__":
    main()

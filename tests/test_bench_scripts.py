"""The benchmark scripts still import and parse their options against today's API.

They are not run in CI (they take minutes and want a quiet machine), so without this an API
rename leaves them broken until the next person who measures something finds out.
"""

from __future__ import annotations

import pathlib
import re
import socket
import subprocess
import sys
import threading

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(path.name for path in BENCH.glob("*.py") if not path.name.startswith("_"))


def test_every_benchmark_script_is_checked() -> None:
    assert {"bench_frames.py", "bench_session.py", "bench_tunnel.py", "compare.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def _echo_until_eof() -> tuple[socket.socket, threading.Thread]:
    """A loopback target that echoes one connection's bytes and closes after its EOF."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("flag", ["--trio-relay", "--trio-raw-relay", "--asyncio-relay"])
def test_reference_relay_carries_bytes_and_eof_both_ways(flag: str) -> None:
    """The bench's reference relays are measured against pytunnel, so they must relay for
    real: every byte both ways, and a half-close passed on (a relay that dropped the EOF
    would leave iperf3 and wrk hanging, one that lost bytes would look faster)."""
    listener, thread = _echo_until_eof()
    target = listener.getsockname()[1]
    relay = subprocess.Popen(
        [sys.executable, str(BENCH / "bench_tunnel.py"), flag, str(target)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert relay.stdout is not None
        line = relay.stdout.readline()
        match = re.fullmatch(rf"relay (\d+) -> {target}\n", line)
        assert match, line
        payload = bytes(range(256)) * 1024
        with socket.create_connection(("127.0.0.1", int(match[1])), timeout=30) as conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            received = bytearray()
            while chunk := conn.recv(65536):
                received += chunk
        assert bytes(received) == payload
        thread.join(30)
        assert not thread.is_alive()
    finally:
        relay.kill()
        relay.wait(30)
        listener.close()

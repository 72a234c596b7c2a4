"""The real ``pytunnel`` command, run as subprocesses, with bytes pushed through it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main

pytestmark = pytest.mark.timeout(60)
PYTUNNEL = [sys.executable, "-m", "cli.main"]


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)


@pytest.fixture
def echo_address() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[0], server.server_address[1]
    server.shutdown()
    server.server_close()


class Proc:
    """A pytunnel subprocess whose stdout lines can be awaited with a deadline."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(
            [*PYTUNNEL, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self._pending = b""

    def readline(self, timeout: float = 15) -> str:
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.popen.stdout], [], [], max(0, remaining))
            if not ready:
                raise TimeoutError(f"no output line; stderr: {self.stderr_so_far()}")
            chunk = os.read(self.popen.stdout.fileno(), 4096)
            if not chunk:
                raise EOFError(f"process exited; stderr: {self.stderr_so_far()}")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def stderr_so_far(self) -> str:
        return "(see process stderr)"

    def stop(self, sig: int = signal.SIGINT, timeout: float = 5) -> tuple[int, str]:
        self.popen.send_signal(sig)
        try:
            _, err = self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.communicate()
            raise AssertionError("process did not exit after the signal") from None
        return self.popen.returncode, err.decode()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.communicate()


def _address(line: str) -> tuple[str, int]:
    match = re.search(r"(\d+\.\d+\.\d+\.\d+):(\d+)", line)
    assert match, line
    return match.group(1), int(match.group(2))


def _roundtrip(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while data := s.recv(65536):
            out += data
        return out


@pytest.fixture
def server() -> Iterator[tuple[Proc, tuple[str, int], str]]:
    proc = Proc("serve", "--listen", "127.0.0.1:0")
    try:
        listening = proc.readline()
        connect_line = proc.readline()
        assert listening.startswith("pytunnel server listening on ")
        token = connect_line.split("--token ")[1].strip()
        assert connect_line.startswith(f"connect with: pytunnel connect {_address(listening)[0]}:")
        yield proc, _address(listening), token
    finally:
        proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_and_connect_relay_bytes(
    server: tuple[Proc, tuple[str, int], str], echo_address: tuple[str, int], sig: int
) -> None:
    _, (host, port), token = server
    echo = f"{echo_address[0]}:{echo_address[1]}"
    client = Proc(
        "connect", f"{host}:{port}", "--token", token, "-R", f"0:{echo}", "-L", f"0:{echo}"
    )
    try:
        assert client.readline() == f"connected to {host}:{port}"
        remote_line, local_line = client.readline(), client.readline()
        assert remote_line.startswith("remote forward 127.0.0.1:")
        assert remote_line.endswith(echo)
        assert local_line.startswith("local forward 127.0.0.1:")
        assert local_line.endswith(echo)
        payload = os.urandom(300_000)
        assert _roundtrip(_address(remote_line), payload) == payload
        assert _roundtrip(_address(local_line), payload) == payload
        code, err = client.stop(sig)
        assert code == 0, err
        assert "Traceback" not in err
    finally:
        client.kill()
    code, err = server[0].stop(sig)
    assert code == 0, err


def test_token_from_environment(
    server: tuple[Proc, tuple[str, int], str], echo_address: tuple[str, int]
) -> None:
    _, (host, port), token = server
    client = Proc(
        "connect",
        f"{host}:{port}",
        "-L",
        f"0:{echo_address[0]}:{echo_address[1]}",
        env={"PYTUNNEL_TOKEN": token},
    )
    try:
        client.readline()
        assert _roundtrip(_address(client.readline()), b"env") == b"env"
    finally:
        client.kill()


def test_wrong_token_is_one_clear_line(server: tuple[Proc, tuple[str, int], str]) -> None:
    _, (host, port), _ = server
    out = subprocess.run(
        [*PYTUNNEL, "connect", f"{host}:{port}", "--token", "wrong"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "pytunnel: error: [AUTHENTICATION_FAILED]" in out.stderr
    assert "wrong" not in out.stderr.replace("--token wrong", "")


def test_unreachable_server_is_one_clear_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [*PYTUNNEL, "connect", f"127.0.0.1:{port}", "--token", "t"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "[CONNECT_FAILED] cannot reach tunnel server" in out.stderr


def test_server_killed_ends_client_with_error(
    server: tuple[Proc, tuple[str, int], str], echo_address: tuple[str, int]
) -> None:
    proc, (host, port), token = server
    client = Proc("connect", f"{host}:{port}", "--token", token, "--no-reconnect")
    try:
        client.readline()
        proc.popen.kill()
        _, err = client.popen.communicate(timeout=15)
        assert client.popen.returncode == 1
        assert "the connection to the server was lost" in err.decode()
    finally:
        client.kill()


def test_json_log_format(server: tuple[Proc, tuple[str, int], str]) -> None:
    _, (host, port), token = server
    client = Proc("connect", f"{host}:{port}", "--token", token, "--log-format", "json")
    try:
        client.readline()
        code, err = client.stop()
    finally:
        client.kill()
    assert code == 0
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert lines
    assert all({"time", "level", "logger", "message"} <= set(e) for e in lines)
    assert token not in err


@pytest.mark.parametrize(
    "args",
    [
        ["connect", "127.0.0.1:7000", "--token", "t", "-L", "nonsense"],
        ["connect", "127.0.0.1:7000", "--token", "t", "-R", "1:host:99999"],
        ["connect", "not-an-address", "--token", "t"],
        ["serve", "--listen", "127.0.0.1:x"],
        ["serve", "--allow-ports", "9-1"],
        ["connect", "127.0.0.1:7000"],
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.output


def test_help_shows_environment_variables() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    assert "PYTUNNEL_TOKEN" in result.output


def test_status_interval_prints_summaries(
    server: tuple[Proc, tuple[str, int], str], echo_address: tuple[str, int]
) -> None:
    _, (host, port), token = server
    echo = f"{echo_address[0]}:{echo_address[1]}"
    client = Proc(
        "connect", f"{host}:{port}", "--token", token, "-L", f"0:{echo}", "--status-interval", "0.2"
    )
    try:
        client.readline()
        local_line = client.readline()
        assert _roundtrip(_address(local_line), b"count me") == b"count me"
        lines = [client.readline() for _ in range(4)]
    finally:
        client.kill()
    forward_lines = [line for line in lines if line.startswith("status local forward")]
    link_lines = [line for line in lines if line.startswith("status link up")]
    assert forward_lines
    assert link_lines
    assert "active" in forward_lines[-1]
    assert "conns=0/1" in forward_lines[-1] or "conns=1/1" in forward_lines[-1]


def test_tls_self_signed_two_commands(tmp_path: Path, echo_address: tuple[str, int]) -> None:
    """A secure setup is still two commands: serve prints the pinned connect command."""
    tls_dir = tmp_path / "tls"
    server = Proc(
        "serve", "--listen", "127.0.0.1:0", "--tls-self-signed", "--tls-dir", str(tls_dir)
    )
    try:
        listening = server.readline()
        fingerprint_line = server.readline()
        connect_line = server.readline()
        assert listening.endswith("(TLS)")
        fingerprint = fingerprint_line.split(": ")[1]
        assert fingerprint.startswith("SHA256:")
        assert connect_line.endswith(f"--tls-fingerprint {fingerprint}")
        args = connect_line.removeprefix("connect with: pytunnel ").split()
        echo = f"{echo_address[0]}:{echo_address[1]}"
        client = Proc(*args, "-L", f"0:{echo}")
        try:
            client.readline()
            assert _roundtrip(_address(client.readline()), b"secure") == b"secure"
        finally:
            client.kill()
        assert oct(os.stat(tls_dir / "server.key").st_mode & 0o777) == "0o600"
    finally:
        server.kill()


def test_token_file_and_command_line_warning(
    tmp_path: Path, server: tuple[Proc, tuple[str, int], str]
) -> None:
    _, (host, port), token = server
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    client = Proc("connect", f"{host}:{port}", "--token-file", str(token_file))
    try:
        assert client.readline().startswith("connected to")
        code, err = client.stop()
    finally:
        client.kill()
    assert code == 0
    assert "visible to other users" not in err
    client = Proc("connect", f"{host}:{port}", "--token", token)
    try:
        client.readline()
        _, err = client.stop()
    finally:
        client.kill()
    assert "--token on the command line is visible to other users" in err


def test_dynamic_forward_cli(
    server: tuple[Proc, tuple[str, int], str], echo_address: tuple[str, int]
) -> None:
    import struct

    _, (host, port), token = server
    client = Proc("connect", f"{host}:{port}", "-D", "0", env={"PYTUNNEL_TOKEN": token})
    try:
        client.readline()
        line = client.readline()
        assert line.startswith("dynamic forward 127.0.0.1:")
        assert line.endswith("-> SOCKS")
        with socket.create_connection(_address(line), timeout=10) as s:
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\x00"
            s.sendall(
                b"\x05\x01\x00\x01"
                + socket.inet_aton(echo_address[0])
                + struct.pack("!H", echo_address[1])
            )
            assert s.recv(10)[:2] == b"\x05\x00"
            s.sendall(b"raw socks5")
            assert s.recv(100) == b"raw socks5"
    finally:
        client.kill()


# ------------------------------------------------------------- the fields of --status-interval


class _Greeter(socketserver.BaseRequestHandler):
    """Says one thing whatever it is told, so the bytes each way differ."""

    def handle(self) -> None:
        self.request.sendall(b"greetings")
        while self.request.recv(65536):
            pass


@pytest.fixture
def greeter_address() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Greeter)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[0], server.server_address[1]
    server.shutdown()
    server.server_close()


def test_status_interval_fields(
    server: tuple[Proc, tuple[str, int], str],
    greeter_address: tuple[str, int],
    echo_address: tuple[str, int],
) -> None:
    """Every field of the summary, with known values: one line per forward, sorted by kind
    then port, connections active/total, bytes each way, errors by category, UDP drops, then
    the link line with a measured round trip."""
    _, (host, port), token = server
    greeter = f"{greeter_address[0]}:{greeter_address[1]}"
    echo = f"{echo_address[0]}:{echo_address[1]}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    client = Proc(
        "connect",
        f"{host}:{port}",
        "--token",
        token,
        "-L",
        f"0:{greeter}",
        "-L",
        f"0:{closed}",
        "-L",
        f"0:{echo}/udp",
        "--status-interval",
        "0.2",
        "--heartbeat-interval",
        "0.2",
    )
    try:
        assert client.readline() == f"connected to {host}:{port}"
        declared = [client.readline() for _ in range(3)]
        greeter_port, closed_port, udp_port = (_address(line)[1] for line in declared)
        assert _roundtrip(("127.0.0.1", greeter_port), b"count me") == b"greetings"
        with (
            socket.create_connection(("127.0.0.1", closed_port), timeout=10) as refused,
            contextlib.suppress(ConnectionResetError),
        ):
            assert refused.recv(1) == b""  # the dial failed at the server: closed
        tcp_lines = {
            greeter_port: rf"status local forward 127\.0\.0\.1:{greeter_port} -> "
            rf"{re.escape(greeter)}: active conns=0/1 out=8 in=9 errors=-",
            # a failed dial is counted as an error, not as a relayed connection
            closed_port: rf"status local forward 127\.0\.0\.1:{closed_port} -> "
            rf"{re.escape(closed)}: active conns=0/0 out=0 in=0 errors=NODE_UNSTABLE=1",
        }
        wanted = [
            *(tcp_lines[p] for p in sorted(tcp_lines)),  # by kind, then by port
            rf"status local udp forward 127\.0\.0\.1:{udp_port} -> {re.escape(echo)}\S*: "
            r"active conns=0/0 out=0 in=0 errors=- dropped=0",
            r"status link up rtt=\d+\.\d ms reconnects=0",
        ]
        block: list[str] = []
        deadline = time.monotonic() + 30
        while True:
            line = client.readline()
            assert line.startswith("status "), line
            block.append(line)
            if not line.startswith("status link "):
                continue
            if len(block) == len(wanted) and all(
                re.fullmatch(pattern, got) for pattern, got in zip(wanted, block, strict=True)
            ):
                break
            assert time.monotonic() < deadline, "\n".join(block)
            block = []
    finally:
        client.kill()

"""The real ``pytunnel`` command, run as subprocesses, with bytes pushed through it."""

from __future__ import annotations

import contextlib
import json
import os
import re
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
from helpers import PYTUNNEL, CliProcess, address_in, closed_port, roundtrip, threaded_echo

from pytunnel.cli import main

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def echo_address() -> Iterator[tuple[str, int]]:
    with threaded_echo() as address:
        yield address


@pytest.fixture
def server() -> Iterator[tuple[CliProcess, tuple[str, int], str]]:
    proc = CliProcess("serve", "--listen", "127.0.0.1:0")
    try:
        listening = proc.readline()
        connect_line = proc.readline()
        assert listening.startswith("pytunnel server listening on ")
        token = connect_line.split("--token ")[1].strip()
        host, port = address_in(listening)
        assert connect_line.startswith(f"connect with: pytunnel connect {host}:")
        yield proc, (host, port), token
    finally:
        proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_and_connect_relay_bytes(
    server: tuple[CliProcess, tuple[str, int], str], echo_address: tuple[str, int], sig: int
) -> None:
    _, (host, port), token = server
    echo = f"{echo_address[0]}:{echo_address[1]}"
    client = CliProcess(
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
        assert roundtrip(address_in(remote_line), payload) == payload
        assert roundtrip(address_in(local_line), payload) == payload
        code, err = client.stop(sig), client.stderr
        assert code == 0, err
        assert "Traceback" not in err
    finally:
        client.kill()
    code, err = server[0].stop(sig), server[0].stderr
    assert code == 0, err


def test_token_from_environment(
    server: tuple[CliProcess, tuple[str, int], str], echo_address: tuple[str, int]
) -> None:
    _, (host, port), token = server
    client = CliProcess(
        "connect",
        f"{host}:{port}",
        "-L",
        f"0:{echo_address[0]}:{echo_address[1]}",
        env={"PYTUNNEL_TOKEN": token},
    )
    try:
        client.readline()
        assert roundtrip(address_in(client.readline()), b"env") == b"env"
    finally:
        client.kill()


def test_wrong_token_is_one_clear_line(server: tuple[CliProcess, tuple[str, int], str]) -> None:
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
    server: tuple[CliProcess, tuple[str, int], str], echo_address: tuple[str, int]
) -> None:
    proc, (host, port), token = server
    client = CliProcess("connect", f"{host}:{port}", "--token", token, "--no-reconnect")
    try:
        client.readline()
        proc.popen.kill()
        assert client.wait(15) == 1
        assert "the connection to the server was lost" in client.stderr
    finally:
        client.kill()


def test_json_log_format(server: tuple[CliProcess, tuple[str, int], str]) -> None:
    _, (host, port), token = server
    client = CliProcess("connect", f"{host}:{port}", "--token", token, "--log-format", "json")
    try:
        client.readline()
        code, err = client.stop(), client.stderr
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
        ["serve", "--permit-open", "no-port"],
        ["serve", "--permit-open", "db:0"],
        ["serve", "--permit-open", "10.0.0.0/33:80"],
        ["serve", "--max-handshakes-per-address", "0"],
        ["serve", "--first-frame-timeout", "0"],
        ["serve", "--auth-failure-burst", "0"],
        ["serve", "--auth-failure-interval", "-1"],
        ["connect", "127.0.0.1:7000"],
        ["connect", "127.0.0.1:7000", "--token", "t", "--client-id", "bad id"],
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
    server: tuple[CliProcess, tuple[str, int], str], echo_address: tuple[str, int]
) -> None:
    _, (host, port), token = server
    echo = f"{echo_address[0]}:{echo_address[1]}"
    client = CliProcess(
        "connect", f"{host}:{port}", "--token", token, "-L", f"0:{echo}", "--status-interval", "0.2"
    )
    try:
        client.readline()
        local_line = client.readline()
        assert roundtrip(address_in(local_line), b"count me") == b"count me"
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
    server = CliProcess(
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
        client = CliProcess(*args, "-L", f"0:{echo}")
        try:
            client.readline()
            assert roundtrip(address_in(client.readline()), b"secure") == b"secure"
        finally:
            client.kill()
        assert oct(os.stat(tls_dir / "server.key").st_mode & 0o777) == "0o600"
    finally:
        server.kill()


def test_token_file_and_command_line_warning(
    tmp_path: Path, server: tuple[CliProcess, tuple[str, int], str]
) -> None:
    _, (host, port), token = server
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    client = CliProcess("connect", f"{host}:{port}", "--token-file", str(token_file))
    try:
        assert client.readline().startswith("connected to")
        code, err = client.stop(), client.stderr
    finally:
        client.kill()
    assert code == 0
    assert "visible to other users" not in err
    client = CliProcess("connect", f"{host}:{port}", "--token", token)
    try:
        client.readline()
        client.stop()
        err = client.stderr
    finally:
        client.kill()
    assert "--token on the command line is visible to other users" in err


def test_dynamic_forward_cli(
    server: tuple[CliProcess, tuple[str, int], str], echo_address: tuple[str, int]
) -> None:
    import struct

    _, (host, port), token = server
    client = CliProcess("connect", f"{host}:{port}", "-D", "0", env={"PYTUNNEL_TOKEN": token})
    try:
        client.readline()
        line = client.readline()
        assert line.startswith("dynamic forward 127.0.0.1:")
        assert line.endswith("-> SOCKS")
        with socket.create_connection(address_in(line), timeout=10) as s:
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


# ------------------------------------------------------------ startup errors: one line, exit 1


def _startup_failure(*args: str, token: str = "t") -> str:
    """Run the command expecting a startup failure; return its one stderr line."""
    out = subprocess.run(
        [*PYTUNNEL, *args, "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTUNNEL_TOKEN": token},
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("pytunnel: error: ["), lines[0]
    return lines[0]


@pytest.fixture
def port_in_use() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.fixture
def garbage_pem(tmp_path: Path) -> str:
    path = tmp_path / "garbage.pem"
    path.write_text("not a certificate\n")
    return str(path)


def test_serve_on_a_port_in_use_is_one_line(port_in_use: int) -> None:
    line = _startup_failure("serve", "--listen", f"127.0.0.1:{port_in_use}")
    assert f"[ADDRESS_IN_USE] 127.0.0.1:{port_in_use} is already in use" in line


async def test_serve_on_a_port_in_use_raises_the_typed_error(port_in_use: int) -> None:
    import pytunnel

    with pytest.raises(pytunnel.AddressInUseError):
        await pytunnel.serve(port_in_use, token="t")


def test_serve_with_unloadable_tls_files_is_one_line(garbage_pem: str) -> None:
    line = _startup_failure(
        "serve", "--listen", "127.0.0.1:0", "--tls-cert", garbage_pem, "--tls-key", garbage_pem
    )
    assert "[TLS_FAILED] cannot load the certificate" in line


def test_serve_with_unloadable_client_ca_is_one_line(tmp_path: Path, garbage_pem: str) -> None:
    tls_dir = str(tmp_path / "tls")
    line = _startup_failure(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-self-signed",
        "--tls-dir",
        tls_dir,
        "--tls-client-ca",
        garbage_pem,
    )
    assert "[TLS_FAILED] cannot load the client CA" in line


def test_serve_with_unusable_tls_dir_is_one_line(garbage_pem: str) -> None:
    line = _startup_failure(
        "serve", "--listen", "127.0.0.1:0", "--tls-self-signed", "--tls-dir", f"{garbage_pem}/tls"
    )
    assert "[TLS_FAILED] cannot set up the self-signed certificate" in line


@pytest.mark.parametrize("command", ["serve", "connect"])
def test_undecodable_token_file_is_one_line(tmp_path: Path, command: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(b"\xff\xfe not text")
    target = ["--listen", "127.0.0.1:0"] if command == "serve" else ["127.0.0.1:1"]
    line = _startup_failure(command, *target, "--token-file", str(token_file))
    assert "the token file is not UTF-8 text" in line


def test_connect_with_local_port_in_use_is_one_line(
    server: tuple[CliProcess, tuple[str, int], str], port_in_use: int
) -> None:
    _, (host, port), token = server
    line = _startup_failure(
        "connect", f"{host}:{port}", "-L", f"{port_in_use}:127.0.0.1:80", token=token
    )
    assert f"[ADDRESS_IN_USE] 127.0.0.1:{port_in_use} is already in use" in line


def test_connect_with_remote_port_in_use_is_one_line(
    server: tuple[CliProcess, tuple[str, int], str], port_in_use: int
) -> None:
    _, (host, port), token = server
    line = _startup_failure(
        "connect", f"{host}:{port}", "-R", f"{port_in_use}:127.0.0.1:80", token=token
    )
    assert "[ADDRESS_IN_USE]" in line


def test_connect_with_tls_to_a_plain_server_is_one_line(
    server: tuple[CliProcess, tuple[str, int], str],
) -> None:
    _, (host, port), token = server
    line = _startup_failure("connect", f"{host}:{port}", "--tls", token=token)
    assert "[TLS_FAILED] the peer is not speaking TLS" in line


def test_connect_with_unloadable_tls_ca_is_one_line(
    server: tuple[CliProcess, tuple[str, int], str], garbage_pem: str
) -> None:
    _, (host, port), token = server
    line = _startup_failure("connect", f"{host}:{port}", "--tls-ca", garbage_pem, token=token)
    assert "[TLS_FAILED] cannot load the CA" in line


if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup


def test_startup_error_is_found_inside_nested_groups() -> None:
    import pytunnel
    from pytunnel.cli._run import describe, startup_error

    typed = pytunnel.AddressInUseError("127.0.0.1:1 is already in use")
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [typed])])
    assert startup_error(nested) is typed
    assert describe(typed) == "[ADDRESS_IN_USE] 127.0.0.1:1 is already in use"
    oserror = OSError(98, "Address already in use")
    assert describe(startup_error(ExceptionGroup("g", [oserror])) or typed) == (
        "[ADDRESS_IN_USE] Address already in use"
    )
    # anything else in the group is a bug: its traceback must not be hidden
    assert startup_error(ExceptionGroup("g", [typed, ValueError("bug")])) is None


def _serve(*args: str) -> tuple[CliProcess, tuple[str, int], str]:
    proc = CliProcess("serve", "--listen", "127.0.0.1:0", *args)
    listening = proc.readline()
    token = proc.readline().split("--token ")[1].strip()
    return proc, address_in(listening), token


def test_allow_ports_comma_list_through_the_cli(echo_address: tuple[str, int]) -> None:
    """``--allow-ports 1-2,PORT``: a port in a later element of the list is allowed, one in
    none of them is refused with one line."""
    allowed, other = closed_port(), closed_port()
    proc, (host, port), token = _serve("--allow-ports", f"1-2, {allowed}")
    echo = f"{echo_address[0]}:{echo_address[1]}"
    env = {"PYTUNNEL_TOKEN": token}
    client = CliProcess("connect", f"{host}:{port}", "-R", f"{allowed}:{echo}", env=env)
    try:
        client.readline()
        line = client.readline()
        assert line.startswith(f"remote forward 127.0.0.1:{allowed} ")
        assert roundtrip(address_in(line), b"in the list") == b"in the list"
    finally:
        client.kill()
    try:
        out = subprocess.run(
            [*PYTUNNEL, "connect", f"{host}:{port}", "-R", f"{other}:{echo}"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env},
        )
        assert out.returncode == 1
        assert f"[PORT_NOT_ALLOWED] port {other} is outside the allowed range" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        proc.kill()


def test_permit_open_wildcard_through_the_cli(echo_address: tuple[str, int]) -> None:
    """``--permit-open 127.0.0.*:PORT`` admits ``localhost``, which resolves into it, and
    refuses a port the pattern does not cover."""
    echo_port = echo_address[1]
    proc, (host, port), token = _serve("--permit-open", f"127.0.0.*:{echo_port}")
    client = CliProcess(
        "connect",
        f"{host}:{port}",
        "-L",
        f"0:localhost:{echo_port}",
        "-L",
        f"0:localhost:{closed_port()}",
        env={"PYTUNNEL_TOKEN": token},
    )
    try:
        client.readline()
        allowed, forbidden = client.readline(), client.readline()
        assert roundtrip(address_in(allowed), b"wildcard") == b"wildcard"
        # refused by the server: the local connection is closed (or reset), nothing echoed
        with contextlib.suppress(ConnectionResetError):
            assert roundtrip(address_in(forbidden), b"refused") == b""
    finally:
        client.kill()
        proc.kill()


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
    server: tuple[CliProcess, tuple[str, int], str],
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
    client = CliProcess(
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
        greeter_port, closed_port, udp_port = (address_in(line)[1] for line in declared)
        assert roundtrip(("127.0.0.1", greeter_port), b"count me") == b"greetings"
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


def test_proxy_protocol_through_the_cli(
    server: tuple[CliProcess, tuple[str, int], str], echo_address: tuple[str, int]
) -> None:
    """``--proxy-protocol v1``: the echo target sends back the header the forward wrote
    before the payload, naming our own socket as the public peer."""
    _, (host, port), token = server
    echo = f"{echo_address[0]}:{echo_address[1]}"
    client = CliProcess(
        "connect", f"{host}:{port}", "--token", token, "-R", f"0:{echo}", "--proxy-protocol", "v1"
    )
    try:
        assert client.readline() == f"connected to {host}:{port}"
        remote = address_in(client.readline())
        with socket.create_connection(remote, timeout=10) as s:
            ours = s.getsockname()
            s.sendall(b"payload")
            s.shutdown(socket.SHUT_WR)
            out = b""
            while data := s.recv(65536):
                out += data
        assert out == (
            f"PROXY TCP4 {ours[0]} {remote[0]} {ours[1]} {remote[1]}\r\n".encode() + b"payload"
        )
        code, err = client.stop(), client.stderr
        assert code == 0, err
    finally:
        client.kill()


def test_proxy_protocol_version_is_checked_by_the_cli() -> None:
    result = subprocess.run(
        [*PYTUNNEL, "connect", "127.0.0.1:1", "--token", "x", "--proxy-protocol", "v3"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "'v3' is not one of 'v1', 'v2'" in result.stderr


def test_a_name_route_through_the_cli(echo_address: tuple[str, int]) -> None:
    """``serve --http-listen --domain`` and ``connect -R app:80:HOST:PORT``: a connection for
    ``app.<domain>`` on the shared port reaches the target; another name gets a 404."""
    shared = closed_port()
    proc = CliProcess(
        "serve", "--listen", "127.0.0.1:0", "--http-listen", f"127.0.0.1:{shared}",
        "--domain", "tunnel.test",
    )  # fmt: skip
    try:
        host, port = address_in(proc.readline())
        assert proc.readline() == f"routing HTTP by name on 127.0.0.1:{shared}"
        token = proc.readline().split("--token ")[1].strip()
        echo = f"{echo_address[0]}:{echo_address[1]}"
        client = CliProcess(
            "connect", f"{host}:{port}", "--token", token, "-R", f"app:80:{echo}",
            "--rewrite-host", "inside",
        )  # fmt: skip
        try:
            assert client.readline() == f"connected to {host}:{port}"
            assert client.readline() == f"name route http://app.tunnel.test:{shared} -> {echo}"
            head = b"GET / HTTP/1.1\r\nHost: app.tunnel.test\r\n\r\n"
            # the echo target sends back the head as the route rewrote it
            assert roundtrip(("127.0.0.1", shared), head) == head.replace(
                b"app.tunnel.test", b"inside"
            )
            stranger = b"GET / HTTP/1.1\r\nHost: x.tunnel.test\r\n\r\n"
            other = roundtrip(("127.0.0.1", shared), stranger)
            assert other.startswith(b"HTTP/1.1 404 ")
            code, err = client.stop(), client.stderr
            assert code == 0, err
        finally:
            client.kill()
    finally:
        proc.kill()


def test_a_name_the_server_does_not_route_is_one_line_through_the_cli(
    server: tuple[CliProcess, tuple[str, int], str], echo_address: tuple[str, int]
) -> None:
    _, (host, port), token = server
    echo = f"{echo_address[0]}:{echo_address[1]}"
    out = subprocess.run(
        [*PYTUNNEL, "connect", f"{host}:{port}", "--token", token, "-R", f"app:443:{echo}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 1
    assert "[NAME_NOT_ALLOWED] this server has no shared HTTPS listener" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_load_balanced_group_through_the_cli(
    server: tuple[CliProcess, tuple[str, int], str], tmp_path: Path
) -> None:
    """Two ``pytunnel connect --group web --group-key-file F -R PORT:...`` share one public
    port, answering in turn; a third with another key is refused with one line."""
    _, (host, port), token = server
    key_file = tmp_path / "group.key"
    key_file.write_text("group secret\n")
    public = closed_port()
    targets = []
    for name in (b"first", b"second"):

        class Named(socketserver.BaseRequestHandler):
            label = name

            def handle(self) -> None:
                self.request.sendall(self.label)

        target = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Named)
        target.daemon_threads = True
        threading.Thread(target=target.serve_forever, daemon=True).start()
        targets.append(target)
    clients = []
    try:
        for target in targets:
            client = CliProcess(
                "connect", f"{host}:{port}", "--token", token, "--group", "web",
                "--group-key-file", str(key_file),
                "-R", f"{public}:127.0.0.1:{target.server_address[1]}",
            )  # fmt: skip
            clients.append(client)
            assert client.readline() == f"connected to {host}:{port}"
            assert client.readline().startswith(f"remote forward 127.0.0.1:{public} ")
        answers = [roundtrip(("127.0.0.1", public), b"") for _ in range(4)]
        assert sorted(answers) == [b"first", b"first", b"second", b"second"]
        # SIGKILL one member: once the server has seen its link go, every connection is
        # served by the other
        clients[0].popen.kill()

        def answer() -> bytes | None:
            # until the server has seen the link go, a connection handed to the killed
            # member fails: reset if its stream went out with early data and died with the
            # session, closed empty if the session had ended before the open
            try:
                return roundtrip(("127.0.0.1", public), b"")
            except ConnectionResetError:
                return None

        deadline = time.monotonic() + 15
        while [answer() for _ in range(2)] != [b"second"] * 2:
            assert time.monotonic() < deadline, "the killed member is still handed connections"
        assert [roundtrip(("127.0.0.1", public), b"") for _ in range(20)] == [b"second"] * 20
        other_key = tmp_path / "other.key"
        other_key.write_text("not the secret")
        out = subprocess.run(
            [
                *PYTUNNEL, "connect", f"{host}:{port}", "--token", token, "--group", "web",
                "--group-key-file", str(other_key), "-R", f"{public}:127.0.0.1:9",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )  # fmt: skip
        assert out.returncode == 1
        assert "[GROUP_MISMATCH]" in out.stderr
        assert "not the secret" not in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        for client in clients:
            client.kill()
        for target in targets:
            target.shutdown()
            target.server_close()


def test_group_options_go_together() -> None:
    result = subprocess.run(
        [*PYTUNNEL, "connect", "127.0.0.1:1", "--token", "x", "--group", "web", "-R", "1:h:2"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--group and --group-key-file go together" in result.stderr


def test_several_servers_through_the_cli(
    server: tuple[CliProcess, tuple[str, int], str], echo_address: tuple[str, int]
) -> None:
    """``pytunnel connect DOWN UP -L ...``: the server that refuses is passed over."""
    _, (host, port), token = server
    down = f"127.0.0.1:{closed_port()}"
    echo = f"{echo_address[0]}:{echo_address[1]}"
    client = CliProcess("connect", down, f"{host}:{port}", "--token", token, "-L", f"0:{echo}")
    try:
        assert client.readline() == f"connected to {host}:{port}"
        local = address_in(client.readline())
        assert roundtrip(local, b"through the second") == b"through the second"
    finally:
        client.kill()

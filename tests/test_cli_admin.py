"""``pytunnel status`` / ``forwards`` / ``reload`` against a real running ``pytunnel connect``,
over its Unix socket and over a loopback port with a token; bytes relayed through forwards
added at run time."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PYTUNNEL, CliProcess, address_in, roundtrip, threaded_echo

import pytunnel
import pytunnel.admin

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def echo() -> Iterator[str]:
    with threaded_echo() as (host, port):
        yield f"{host}:{port}"


@pytest.fixture
def server() -> Iterator[str]:
    proc = CliProcess("serve", "--listen", "127.0.0.1:0", "--token", "t")
    try:
        yield "{}:{}".format(*address_in(proc.readline()))
    finally:
        proc.kill()


@pytest.fixture
def rundir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


def _connect(server: str, *args: str) -> CliProcess:
    proc = CliProcess("connect", server, "--token", "t", *args)
    assert proc.readline() == f"connected to {server}"
    return proc


def _wait_for(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYTUNNEL, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
@pytest.mark.timeout(360)  # two dozen CLI processes, each a full interpreter start
def test_verbs_manage_forwards_of_a_running_client(server: str, rundir: Path, echo: str) -> None:
    sock = rundir / "c.sock"
    admin = ["--admin", f"unix:{sock}"]
    client = _connect(server, "-L", f"0:{echo}", *admin)
    try:
        first = address_in(client.readline())
        _wait_for(sock)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600

        out = _cli("status", *admin)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith(f"server {server}: link up")
        assert lines[1].split() == [
            "ID", "NAME", "KIND", "BIND", "TARGET", "STATUS", "CONNS", "OUT", "IN", "ERROR",
        ]  # fmt: skip
        assert lines[2].split()[:6] == ["f1", "-", "local", "{}:{}".format(*first), echo, "active"]

        out = _cli("forwards", "add", "-R", f"0:{echo}", "--name", "web", *admin)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("added f2: remote 127.0.0.1:")
        public = address_in(out.stdout)
        assert roundtrip(public, b"through the new forward") == b"through the new forward"
        assert roundtrip(first, b"x" * 1000) == b"x" * 1000

        out = _cli("forwards", "list", "--json", *admin)
        rows = json.loads(out.stdout)
        assert [(r["id"], r["name"], r["kind"], r["status"]) for r in rows] == [
            ("f1", None, "local", "active"),
            ("f2", "web", "remote", "active"),
        ]
        assert rows[0]["bytes_out"] == rows[0]["bytes_in"] == 1000
        assert rows[0]["connections_total"] == 1
        assert rows[1]["origin"] == "api"

        # bad input: one error each, exit 1 (API) or 2 (usage), nothing running disturbed
        out = _cli("forwards", "add", "-R", f"0:{echo}", "--name", "web", *admin)
        assert (out.returncode, out.stderr.strip()) == (
            1,
            "pytunnel: error: a forward with the name 'web' already exists (HTTP 409)",
        )
        out = _cli("forwards", "add", "-L", "nonsense", *admin)
        assert out.returncode == 1
        assert "local: expected [bind_address:]port:host:hostport" in out.stderr
        out = _cli("forwards", "remove", "nope", *admin)
        assert out.returncode == 1
        assert "no forward has the id or name 'nope' (HTTP 404)" in out.stderr
        out = _cli("forwards", "add", *admin)
        assert out.returncode == 2
        out = _cli("forwards", "add", "-L", f"{first[1]}:{echo}", *admin)
        assert out.returncode == 1
        assert "[ADDRESS_IN_USE]" in out.stderr
        assert "(HTTP 409)" in out.stderr
        out = _cli("reload", *admin)
        assert out.returncode == 1
        assert "started without --config (HTTP 422)" in out.stderr

        out = _cli("forwards", "retry", "web", *admin)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("f2: active 127.0.0.1:")
        out = _cli("forwards", "remove", "f2", *admin)
        assert (out.returncode, out.stdout) == (0, "removed f2\n")
        assert "f2" not in _cli("forwards", "list", *admin).stdout
        assert roundtrip(first, b"still") == b"still"
    finally:
        client.stop()
    assert not sock.exists()


def test_malformed_bodies_of_forwards_add_are_json_400s(server: str, rundir: Path) -> None:
    """Each malformed body is one 400 with a JSON error, also JSON nested deeper than the
    parser goes (it fits in the 64 KiB body limit) and a lone surrogate, and the client
    goes on serving with nothing added."""
    sock = rundir / "c.sock"
    client = _connect(server, "--admin", f"unix:{sock}")
    try:
        _wait_for(sock)
        bodies = [
            b"[" * 30000 + b"]" * 30000,
            b"{" * 10 + b"}",
            b'{"local": "\xff"}',
            b"\xff\xfe",
        ]
        for body in bodies:
            with socket.socket(socket.AF_UNIX) as raw:
                raw.settimeout(30)
                raw.connect(str(sock))
                head = (
                    "POST /api/forwards HTTP/1.1\r\nHost: localhost\r\n"
                    f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                    "connection: close\r\n\r\n"
                )
                raw.sendall(head.encode() + body)
                answer = b""
                while chunk := raw.recv(65536):
                    answer += chunk
            status_line, _, rest = answer.partition(b"\r\n")
            assert status_line == b"HTTP/1.1 400 Bad Request", (body[:20], answer[:200])
            head_part, _, payload = rest.partition(b"\r\n\r\n")
            assert b"content-type: application/json" in head_part
            assert json.loads(payload) == {"error": "the body is not JSON", "status": 400}
        # a name no UTF-8 text can hold would break every answer (and scrape) naming it
        lone = {"local": "0:127.0.0.1:1", "name": "bad\ud800"}
        status, answer = pytunnel.admin.request("POST", "/api/forwards", lone, unix_path=str(sock))
        assert status == 400
        assert "lone surrogate" in answer["error"]
        status, answer = pytunnel.admin.request("GET", "/api/status", unix_path=str(sock))
        assert status == 200
        assert answer["connected"] is True
        assert answer["forwards"] == []
    finally:
        client.stop()


def test_a_stale_socket_of_a_killed_client_is_replaced(
    server: str, rundir: Path, echo: str
) -> None:
    sock = rundir / "c.sock"
    killed = _connect(server, "--admin", f"unix:{sock}")
    try:
        _wait_for(sock)
    finally:
        killed.kill()
    assert sock.exists()  # a killed process leaves its socket file behind
    out = _cli("status", "--admin", f"unix:{sock}")
    assert out.returncode == 1
    assert "cannot reach the admin API" in out.stderr

    client = _connect(server, "-L", f"0:{echo}", "--admin", f"unix:{sock}")
    try:
        client.readline()
        deadline = time.monotonic() + 20
        while (out := _cli("status", "--admin", f"unix:{sock}")).returncode != 0:
            assert time.monotonic() < deadline, out.stderr
            time.sleep(0.1)
        assert "f1" in out.stdout
        # a second client asking for the same live socket is refused, the first unharmed
        second = subprocess.run(
            [*PYTUNNEL, "connect", server, "--token", "t", "--admin", f"unix:{sock}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1
        assert "another process serves its admin API" in second.stderr
        assert _cli("status", "--admin", f"unix:{sock}").returncode == 0
    finally:
        client.stop()


def test_admin_on_a_port_needs_the_token(server: str, tmp_path: Path, echo: str) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("adm1n\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = _connect(
        server, "-L", f"0:{echo}", "--admin", f"127.0.0.1:{port}", "--admin-token-file",
        str(token_file),
    )  # fmt: skip
    try:
        client.readline()
        admin = ["--admin", f"127.0.0.1:{port}"]
        deadline = time.monotonic() + 20
        while (
            out := _cli("status", "--json", *admin, "--admin-token-file", str(token_file))
        ).returncode:
            assert time.monotonic() < deadline, out.stderr
            time.sleep(0.1)
        assert json.loads(out.stdout)["connected"] is True
        out = _cli("status", *admin, env={"PYTUNNEL_ADMIN_TOKEN": "adm1n"})
        assert out.returncode == 0, out.stderr
        for env in ({}, {"PYTUNNEL_ADMIN_TOKEN": "wrong"}):
            out = _cli("status", *admin, env=env)
            assert out.returncode == 1
            assert "a valid admin token is needed" in out.stderr
            assert "(HTTP 401)" in out.stderr
    finally:
        client.stop()
    out = subprocess.run(
        [*PYTUNNEL, "connect", server, "--token", "t", "--admin", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if k != "PYTUNNEL_ADMIN_TOKEN"},
    )
    assert out.returncode == 2
    assert "--admin HOST:PORT needs a token" in out.stderr


def test_status_finds_the_only_running_client(server: str, tmp_path: Path) -> None:
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    out = _cli("status", env=env)
    assert out.returncode == 1
    assert "no running pytunnel connect found" in out.stderr
    client = CliProcess("connect", server, "--token", "t", env=env)
    try:
        client.readline()
        sock = runtime / "pytunnel" / f"connect-{client.pid}.sock"
        _wait_for(sock)
        out = _cli("status", "--json", env=env)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["pid"] == client.pid
    finally:
        client.stop()


def test_server_admin_shows_clients_and_limits(rundir: Path, echo: str) -> None:
    sock = rundir / "s.sock"
    admin = ["--admin", f"unix:{sock}"]
    limits = ["--max-forwards-per-client", "1"]
    server = CliProcess("serve", "--listen", "127.0.0.1:0", "--token", "t", *admin, *limits)
    client = None
    try:
        address = "{}:{}".format(*address_in(server.readline()))
        _wait_for(sock)
        client = _connect(address, "-R", f"0:{echo}", "--client-id", "laptop", "--admin", "off")
        public = address_in(client.readline())
        out = _cli("status", *admin)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith(f"server {address}: 1 clients, 0/")
        assert lines[1].split() == [
            "PEER", "CLIENT_ID", "VERSION", "RTT", "FORWARDS", "PUBLIC_PORTS", "UPTIME",
        ]  # fmt: skip
        row = lines[2].split()
        assert row[1:3] == ["laptop", f"pytunnel/{pytunnel.__version__}"], row
        assert row[3] == "-" or re.fullmatch(r"\d+\.\dms", row[3]), row
        assert row[4:6] == ["1", "{}:{}".format(*public)], row
        answer = json.loads(_cli("status", "--json", *admin).stdout)
        assert answer["role"] == "server"
        assert answer["limits"]["max_forwards_per_client"] == 1
        assert (answer["streams_open"], answer["streams_total"]) == (0, 0)
        assert roundtrip(public, b"counted") == b"counted"
        answer = json.loads(_cli("status", "--json", *admin).stdout)
        assert answer["streams_total"] == 1
        assert answer["clients"][0]["client_id"] == "laptop"
        out = _cli("reload", *admin)
        assert out.returncode == 1
        assert "started without --config (HTTP 422)" in out.stderr
        out = _cli("forwards", "list", *admin)
        assert out.returncode == 1
        assert "no such endpoint: /api/forwards (HTTP 404)" in out.stderr
    finally:
        if client is not None:
            client.stop()
        server.stop()
    assert not sock.exists()


def test_reload_through_the_api_reports_what_it_did(
    server: str, rundir: Path, tmp_path: Path, echo: str
) -> None:
    sock = rundir / "c.sock"
    admin = ["--admin", f"unix:{sock}"]
    config = tmp_path / "client.toml"
    config.write_text(f'[client]\n[[client.forwards]]\nname = "a"\nlocal = "0:{echo}"\n')
    client = _connect(server, "--config", str(config), *admin)
    try:
        first = address_in(client.readline())
        _wait_for(sock)
        config.write_text(
            config.read_text() + f'[[client.forwards]]\nname = "b"\nremote = "0:{echo}"\n'
        )
        out = _cli("reload", *admin)
        assert (out.returncode, out.stdout) == (
            0,
            "reloaded: 1 added, 0 removed, 0 changed, 0 restarted, 1 unchanged\n",
        )
        config.write_text(config.read_text() + "max_streams = 'lots'\n")
        out = _cli("reload", "--json", *admin)
        assert out.returncode == 1
        assert "client.forwards[1].max_streams: unknown key" in out.stderr
        assert "(HTTP 422)" in out.stderr
        names = [r["name"] for r in json.loads(_cli("forwards", "list", "--json", *admin).stdout)]
        assert names == ["a", "b"]
        assert roundtrip(first, b"kept") == b"kept"
    finally:
        client.stop()


@pytest.mark.slow  # a dozen CLI processes
def test_a_socks_forward_added_at_run_time_and_the_verbs_json(
    server: str, rundir: Path, echo: str
) -> None:
    """``forwards add -D`` starts a SOCKS proxy that relays; ``--json`` of add, stop, retry
    and remove prints the forward as the API shows it, with OxideTerm's fields."""
    sock = rundir / "c.sock"
    admin = ["--admin", f"unix:{sock}"]
    client = _connect(server, *admin)
    try:
        _wait_for(sock)
        out = _cli("forwards", "add", "-D", "0", "--name", "socks", "--json", *admin)
        assert out.returncode == 0, out.stderr
        added = json.loads(out.stdout)
        fields = {"id", "name", "kind", "bind", "target", "status", "error", "connections"}
        assert fields | {"bytes_out", "bytes_in"} <= added.keys()
        assert (added["id"], added["name"], added["kind"]) == ("f1", "socks", "dynamic")
        assert (added["target"], added["status"], added["error"]) == ("socks", "active", None)
        host, port = echo.rsplit(":", 1)
        with socket.create_connection(address_in(added["bind"]), timeout=10) as conn:
            conn.sendall(b"\x05\x01\x00")  # SOCKS5, no authentication
            assert conn.recv(2) == b"\x05\x00"
            conn.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + int(port).to_bytes(2))
            reply = b""
            while len(reply) < 10:
                reply += conn.recv(10 - len(reply))
            assert reply[:2] == b"\x05\x00", reply
            conn.sendall(b"through socks")
            assert conn.recv(100) == b"through socks"
        deadline = time.monotonic() + 20
        while (row := json.loads(_cli("forwards", "list", "--json", *admin).stdout)[0])[
            "connections"
        ]:
            assert time.monotonic() < deadline, row
            time.sleep(0.1)
        assert (row["bytes_out"], row["connections_total"]) == (len(b"through socks"), 1)

        for verb, status in (("stop", "stopped"), ("retry", "active")):
            out = _cli("forwards", verb, "socks", "--json", *admin)
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["status"] == status
        out = _cli("forwards", "remove", "f1", "--json", *admin)
        assert out.returncode == 0, out.stderr
        removed = json.loads(out.stdout)
        # a retry starts the forward anew under its id: its counters start again
        assert (removed["id"], removed["bytes_out"], removed["connections_total"]) == ("f1", 0, 0)
        assert json.loads(_cli("forwards", "list", "--json", *admin).stdout) == []
    finally:
        client.stop()


@pytest.mark.slow  # a server and seven CLI processes
def test_the_server_reloads_through_its_api(rundir: Path, tmp_path: Path, echo: str) -> None:
    """``pytunnel reload --admin`` against a server started with ``--config``: a changed
    limit applies (its status says so), a bad file is a 422 with the reason and changes
    nothing."""
    sock = rundir / "s.sock"
    admin = ["--admin", f"unix:{sock}"]
    config = tmp_path / "server.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:0"\ntoken = "t"\n')
    server = CliProcess("serve", "--config", str(config), *admin)
    try:
        server.readline()
        _wait_for(sock)
        status = json.loads(_cli("status", "--json", *admin).stdout)
        assert status["limits"]["max_forwards_per_client"] == 64

        config.write_text(config.read_text() + "max_forwards_per_client = 2\n")
        out = _cli("reload", *admin)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("reloaded: ")
        status = json.loads(_cli("status", "--json", *admin).stdout)
        assert status["limits"]["max_forwards_per_client"] == 2

        config.write_text(config.read_text() + "max_streams = 'many'\n")
        out = _cli("reload", "--json", *admin)
        assert out.returncode == 1
        assert "server.max_streams" in out.stderr
        assert "(HTTP 422)" in out.stderr
        status = json.loads(_cli("status", "--json", *admin).stdout)
        assert status["limits"]["max_forwards_per_client"] == 2
    finally:
        server.stop()

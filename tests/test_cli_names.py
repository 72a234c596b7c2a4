"""Name routes and load-balanced groups managed as forwards, through the CLI as a user runs
it: ``pytunnel forwards add -R app:80:...`` and its siblings, ``[[client.forwards]]`` tables
and their reload, the refusals each one gets. Real ``pytunnel serve`` / ``connect``
processes, curl (and plain sockets) as the public."""

from __future__ import annotations

import json
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import PYTUNNEL, CliProcess

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]
CURL = shutil.which("curl") or "curl"
DOMAIN = "tunnel.test"


class _Web(socketserver.BaseRequestHandler):
    """Answers each request with ``<label> <path>``, keeping the connection alive."""

    label = b"web"

    def handle(self) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = self.request.recv(65536)
                if not data:
                    return
                buffer += data
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            path = head.split(b" ", 2)[1]
            body = self.label + b" " + path + b"\n"
            self.request.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )


def _service(label: bytes) -> socketserver.ThreadingTCPServer:
    handler = type("Labelled", (_Web,), {"label": label})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def web() -> Iterator[str]:
    server = _service(b"web")
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYTUNNEL, *args], capture_output=True, text=True, timeout=30)


def _wait_for(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


class Server:
    """A ``pytunnel serve`` with a shared HTTP port for names under ``tunnel.test``."""

    def __init__(self, *extra: str) -> None:
        self.proc = CliProcess(
            "serve", "--listen", "127.0.0.1:0", "--token", "t",
            "--http-listen", "127.0.0.1:0", "--domain", DOMAIN, *extra,
        )  # fmt: skip
        self.address = self.proc.line_with("pytunnel server listening on ").rsplit(" ", 1)[1]
        self.http_port = int(self.proc.line_with("routing HTTP by name on ").rsplit(":", 1)[1])

    def get(self, name: str, path: str = "/", *extra: str) -> tuple[int, str]:
        """curl ``http://NAME.tunnel.test:PORT/PATH``: the status and the body."""
        host = f"{name}.{DOMAIN}"
        out = subprocess.run(
            [
                CURL, "-sS", "--resolve", f"{host}:{self.http_port}:127.0.0.1",
                "-o", "-", "-w", "\n%{http_code}", *extra, f"http://{host}:{self.http_port}{path}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        body, _, code = out.stdout.rpartition("\n")
        return int(code), body.removesuffix("\n")


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    yield running
    running.proc.stop()


def _connect(server: Server, *args: str) -> CliProcess:
    proc = CliProcess("connect", server.address, "--token", "t", *args)
    assert proc.readline() == f"connected to {server.address}"
    return proc


@pytest.fixture
def rundir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


def _forwards(admin: list[str]) -> list[dict[str, Any]]:
    out = _cli("forwards", "list", "--json", *admin)
    assert out.returncode == 0, out.stderr
    answer: list[dict[str, Any]] = json.loads(out.stdout)
    return answer


def test_a_name_route_added_stopped_retried_and_removed(
    server: Server, rundir: Path, web: str
) -> None:
    sock = rundir / "c.sock"
    admin = ["--admin", f"unix:{sock}"]
    client = _connect(server, *admin)
    try:
        _wait_for(sock)
        assert server.get("app")[0] == 404  # nobody holds the name yet
        out = _cli("forwards", "add", "-R", f"app:80:{web}", "--name", "app", *admin)
        url = f"http://app.{DOMAIN}:{server.http_port}"
        assert (out.returncode, out.stdout) == (0, f"added f1: name {url} -> {web}\n"), out.stderr
        assert server.get("app", "/hello") == (200, "web /hello")

        (row,) = _forwards(admin)
        assert row["kind"] == "name"
        assert row["bind"] == url
        assert row["spec"] == f"-R app:80:{web}"
        assert row["status"] == "active"
        assert row["origin"] == "api"
        assert row["connections_total"] == 1
        table = _cli("forwards", "list", *admin).stdout.splitlines()
        assert table[1].split()[:6] == ["f1", "app", "name", url, web, "active"]

        out = _cli("forwards", "stop", "app", *admin)
        assert (out.returncode, out.stdout) == (0, "stopped f1\n"), out.stderr
        assert server.get("app")[0] == 404  # given back at the server
        assert _forwards(admin)[0]["status"] == "stopped"
        out = _cli("forwards", "retry", "app", *admin)
        assert (out.returncode, out.stdout) == (0, f"f1: active {url} -> {web}\n"), out.stderr
        assert server.get("app", "/again") == (200, "web /again")
        out = _cli("forwards", "remove", "f1", *admin)
        assert (out.returncode, out.stdout) == (0, "removed f1\n"), out.stderr
        assert server.get("app")[0] == 404
        assert _forwards(admin) == []
    finally:
        client.stop()


def test_per_route_http_options_through_forwards_add(
    server: Server, rundir: Path, web: str
) -> None:
    sock = rundir / "c.sock"
    admin = ["--admin", f"unix:{sock}"]
    client = _connect(server, *admin)
    try:
        _wait_for(sock)
        out = _cli(
            "forwards", "add", "-R", f"private:80:{web}", "--basic-auth", "me:secret", *admin
        )
        assert out.returncode == 0, out.stderr
        assert server.get("private")[0] == 401
        assert server.get("private", "/in", "-u", "me:secret") == (200, "web /in")
        # an HTTP option on a port forward or a TLS route is one clear refusal
        for spec in (f"0:{web}", f"tls:443:{web}"):
            out = _cli("forwards", "add", "-R", spec, "--rewrite-host", "inside", *admin)
            assert out.returncode == 1
            assert "rewrite_host applies to HTTP name routes" in out.stderr
            assert "(HTTP 400)" in out.stderr
        assert len(_forwards(admin)) == 1
    finally:
        client.stop()


def test_names_the_server_refuses_are_one_clear_error(
    server: Server, rundir: Path, web: str
) -> None:
    holder = _connect(server, "-R", f"taken:80:{web}", "--admin", "off")
    sock = rundir / "c.sock"
    admin = ["--admin", f"unix:{sock}"]
    client = _connect(server, *admin)
    try:
        assert holder.readline().startswith("name route http://taken.")
        _wait_for(sock)
        out = _cli("forwards", "add", "-R", f"taken:80:{web}", *admin)
        assert out.returncode == 1
        assert "[NAME_IN_USE]" in out.stderr
        assert "(HTTP 409)" in out.stderr
        out = _cli("forwards", "add", "-R", f"shop.example.org:80:{web}", *admin)
        assert out.returncode == 1
        assert "[NAME_NOT_ALLOWED]" in out.stderr
        assert "(HTTP 409)" in out.stderr
        assert "Traceback" not in out.stderr
        assert _forwards(admin) == []  # nothing half-added
        assert server.get("taken", "/still") == (200, "web /still")
    finally:
        client.stop()
        holder.stop()


def test_a_restored_name_the_new_server_refuses_shows_in_status(
    rundir: Path, web: str, tmp_path: Path
) -> None:
    """The server comes back (same port) without the old domain: the route cannot be
    restored, and ``forwards list`` / ``status`` say why."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first = Server("--listen", f"127.0.0.1:{port}")
    sock = rundir / "c.sock"
    admin = ["--admin", f"unix:{sock}"]
    client = _connect(first, "-R", f"app:80:{web}", *admin)
    second = None
    try:
        client.readline()
        _wait_for(sock)
        first.proc.kill()
        second = CliProcess(
            "serve", "--listen", f"127.0.0.1:{port}", "--token", "t",
            "--http-listen", "127.0.0.1:0", "--domain", "elsewhere.test",
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while (row := _forwards(admin)[0])["status"] != "error":
            assert time.monotonic() < deadline, row
            time.sleep(0.2)
        assert row["error"].startswith("could not be restored: [NAME_NOT_ALLOWED]")
        status = _cli("status", *admin)
        assert status.returncode == 0, status.stderr
        assert "[NAME_NOT_ALLOWED]" in status.stdout.splitlines()[2]
    finally:
        client.stop()
        if second is not None:
            second.stop()


def test_reload_adds_and_removes_a_name_route_and_leaves_the_other_alone(
    server: Server, rundir: Path, tmp_path: Path, web: str
) -> None:
    sock = rundir / "c.sock"
    admin = ["--admin", f"unix:{sock}"]
    config = tmp_path / "client.toml"
    app = f'[[client.forwards]]\nname = "app"\nremote = "app:80:{web}"\n'
    api = f'[[client.forwards]]\nname = "api"\nremote = "api:80:{web}"\nforwarded_headers = true\n'
    config.write_text("[client]\n" + app)
    client = _connect(server, "--config", str(config), *admin)
    try:
        assert client.readline().startswith(f"name route http://app.{DOMAIN}")
        _wait_for(sock)
        # a kept-alive connection through the route that stays: it must outlive the reloads
        conn = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
        request = f"GET /one HTTP/1.1\r\nHost: app.{DOMAIN}\r\n\r\n".encode()
        conn.sendall(request)
        assert conn.recv(65536).endswith(b"web /one\n")

        config.write_text("[client]\n" + app + api)
        out = _cli("reload", *admin)
        assert (out.returncode, out.stdout) == (
            0,
            "reloaded: 1 added, 0 removed, 0 changed, 0 restarted, 1 unchanged\n",
        ), out.stderr
        assert server.get("api", "/new") == (200, "web /new")

        config.write_text("[client]\n" + app)
        out = _cli("reload", *admin)
        assert out.stdout == "reloaded: 0 added, 1 removed, 0 changed, 0 restarted, 1 unchanged\n"
        assert server.get("api")[0] == 404
        conn.sendall(request.replace(b"/one", b"/two"))
        assert conn.recv(65536).endswith(b"web /two\n")
        conn.close()
        assert [r["name"] for r in _forwards(admin)] == ["app"]

        # a bad table is rejected whole: the running routes stay
        config.write_text(
            "[client]\n" + app.replace("remote =", "forwarded_header = true\nremote =")
        )
        out = _cli("reload", *admin)
        assert out.returncode == 1
        assert "client.forwards[0].forwarded_header: unknown key (did you mean" in out.stderr
        assert server.get("app", "/kept") == (200, "web /kept")
    finally:
        client.stop()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            'remote = "app:80:127.0.0.1:1"\nforwarded_header = true',
            "client.forwards[0].forwarded_header: unknown key (did you mean forwarded_headers?)",
        ),
        (
            'remote = "8080:127.0.0.1:1"\nrewrite_host = "inside"',
            "client.forwards[0].rewrite_host: rewrite_host applies to HTTP name routes",
        ),
        (
            'remote = "app:443:127.0.0.1:1"\nbasic_auth = "me:pw"',
            "client.forwards[0].basic_auth: basic_auth applies to HTTP name routes "
            '(remote = "NAME:80:HOST:PORT"), not a TLS name route',
        ),
        (
            'remote = "app:80:127.0.0.1:1"\nbasic_auth = "nocolon"',
            "client.forwards[0].basic_auth: expected USER:PASSWORD",
        ),
        (
            'remote = "app:80:127.0.0.1:1"\nrewrite_host = "bad host"',
            "client.forwards[0].rewrite_host: rewrite_host 'bad host' is not a host name",
        ),
        (
            'remote = "8080:127.0.0.1:1"\ngroup = "web"',
            "client.forwards[0].group_key_file: group and group_key_file go together",
        ),
        (
            'remote = "0:127.0.0.1:1"\ngroup = "web"\ngroup_key_file = "{dir}/k"',
            "client.forwards[0].group: a load-balanced group needs a fixed port, not 0",
        ),
        (
            'local = "0:127.0.0.1:1"\ngroup = "web"\ngroup_key_file = "{dir}/k"',
            "client.forwards[0].group: groups are for TCP remote forwards and name routes",
        ),
        (
            'remote = "8080:127.0.0.1:1"\ngroup = "web"\ngroup_key_file = "{dir}/missing.key"',
            "client.forwards[0].group_key_file: cannot read it: No such file or directory",
        ),
    ],
)
def test_bad_name_route_and_group_tables_are_one_line(
    tmp_path: Path, table: str, message: str
) -> None:
    (tmp_path / "k").write_text("secret\n")
    config = tmp_path / "c.toml"
    table = table.replace("{dir}", str(tmp_path))
    config.write_text(f'[client]\nserver = "127.0.0.1:1"\n[[client.forwards]]\n{table}\n')
    out = _cli("check-config", str(config))
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_group_declared_in_tables_is_shared_and_listed_by_the_server(
    rundir: Path, tmp_path: Path
) -> None:
    """Two clients whose config files put the same port and name in group ``web``: the
    server hands their connections out in turn and lists each membership per client."""
    sock = rundir / "s.sock"
    server = Server("--admin", f"unix:{sock}")
    key = tmp_path / "web.key"
    key.write_text("group secret\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        public = probe.getsockname()[1]
    services = [_service(b"first"), _service(b"second")]
    clients = []
    try:
        for index, service in enumerate(services):
            target = f"127.0.0.1:{service.server_address[1]}"
            config = tmp_path / f"client{index}.toml"
            config.write_text(
                "[client]\n"
                f'[[client.forwards]]\nremote = "{public}:{target}"\ngroup = "web"\n'
                f'group_key_file = "{key}"\n'
                f'[[client.forwards]]\nremote = "app:80:{target}"\ngroup = "web"\n'
                f'group_key_file = "{key}"\n'
            )
            client = _connect(server, "--config", str(config), "--admin", "off")
            clients.append(client)
            assert client.readline().startswith(f"remote forward 127.0.0.1:{public} ")
            assert client.readline().startswith(f"name route http://app.{DOMAIN}")
        answers = sorted(server.get("app", "/x")[1] for _ in range(4))
        assert answers == ["first /x", "first /x", "second /x", "second /x"]
        clients_info = json.loads(_cli("status", "--json", "--admin", f"unix:{sock}").stdout)[
            "clients"
        ]
        assert len(clients_info) == 2
        for info in clients_info:
            memberships = sorted((r["kind"], r["address"], r["group"]) for r in info["routes"])
            assert memberships == [
                ("http", f"app.{DOMAIN}", "web"),
                ("tcp", f"127.0.0.1:{public}", "web"),
            ]
        assert sum(r["connections_total"] for c in clients_info for r in c["routes"]) == 4
    finally:
        for client in clients:
            client.stop()
        server.proc.stop()
        for service in services:
            service.shutdown()
            service.server_close()


def test_the_documented_name_route_and_group_tables_are_valid(tmp_path: Path) -> None:
    docs = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    text = docs.read_text().split("### Name routes and groups in tables", 1)[1]
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "web.key").write_text("group secret\n")
    config = tmp_path / "pytunnel.toml"
    config.write_text(example.replace('"web.key"', f'"{tmp_path / "web.key"}"'))
    out = _cli("check-config", str(config))
    assert (out.returncode, out.stdout) == (0, f"{config}: [client] ok, 2 named forwards\n"), (
        out.stderr
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--rewrite-host", "bad host", "-R", "app:80:127.0.0.1:1"],
            "Invalid value for --rewrite-host: rewrite_host 'bad host' is not a host name",
        ),
        (
            ["--group", "web", "--group-key-file", "{key}", "-R", "0:127.0.0.1:1"],
            "a load-balanced group (--group) needs a fixed port, not 0 (-R 0:127.0.0.1:1)",
        ),
    ],
)
def test_bad_route_flags_are_usage_errors_before_connecting(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    key = tmp_path / "web.key"
    key.write_text("secret\n")
    with socket.socket() as closed:  # nothing listens there: nothing may be tried
        closed.bind(("127.0.0.1", 0))
        server = f"127.0.0.1:{closed.getsockname()[1]}"
    args = [f.replace("{key}", str(key)) for f in flags]
    out = _cli("connect", server, "--token-file", str(key), "--admin", "off", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_forwards_add_joins_a_group_and_a_wrong_key_is_refused(
    server: Server, rundir: Path, tmp_path: Path
) -> None:
    """One member joins at start (flags), another through ``forwards add --group``: the
    name's requests go to both; a member with another key gets one clear refusal."""
    key = tmp_path / "web.key"
    key.write_text("group secret\n")
    services = [_service(b"first"), _service(b"second")]
    targets = [f"127.0.0.1:{s.server_address[1]}" for s in services]
    flags = ["--group", "web", "--group-key-file", str(key), "--admin", "off"]
    first = _connect(server, *flags, "-R", f"app:80:{targets[0]}")
    sock = rundir / "c.sock"
    admin = ["--admin", f"unix:{sock}"]
    second = _connect(server, *admin)
    try:
        assert first.readline().startswith(f"name route http://app.{DOMAIN}")
        _wait_for(sock)
        group = ["--group", "web", "--group-key-file", str(key)]
        out = _cli("forwards", "add", "-R", f"app:80:{targets[1]}", *group, *admin)
        assert out.returncode == 0, out.stderr
        (row,) = _forwards(admin)
        assert (row["kind"], row["group"], row["status"]) == ("name", "web", "active")
        answers = sorted(server.get("app", "/g")[1] for _ in range(4))
        assert answers == ["first /g", "first /g", "second /g", "second /g"]

        other = tmp_path / "other.key"
        other.write_text("not the secret\n")
        wrong = ["--group", "web", "--group-key-file", str(other)]
        out = _cli("forwards", "add", "-R", f"api:80:{targets[1]}", "--name", "x", *wrong, *admin)
        assert out.returncode == 0, out.stderr  # a new name: this key forms its group
        out = _cli("forwards", "add", "-R", f"app:80:{targets[0]}", *wrong, *admin)
        assert out.returncode == 1
        assert "[GROUP_MISMATCH]" in out.stderr
        assert "(HTTP 409)" in out.stderr
        assert "not the secret" not in out.stderr
        out = _cli("forwards", "add", "-R", f"app:80:{targets[0]}", "--group", "web", *admin)
        assert out.returncode == 1
        assert "group_key_file: group and group_key_file go together (HTTP 400)" in out.stderr
        assert len(_forwards(admin)) == 2
    finally:
        second.stop()
        first.stop()
        for service in services:
            service.shutdown()
            service.server_close()

"""``--config FILE``, ``check-config`` and reload on SIGHUP: the real command in subprocesses,
real files, bytes relayed through what the files declare."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers import PYTUNNEL, CliProcess, address_in, roundtrip, threaded_echo

from pytunnel.cli import main
from pytunnel.cli._config import _file_params, option_key

pytestmark = pytest.mark.timeout(90)


def _command(name: str) -> click.Command:
    """A command of the group, imported if it was not yet (the group is lazy)."""
    command = main.get_command(click.Context(main), name)
    assert command is not None, name
    return command


@pytest.fixture
def echo() -> Iterator[str]:
    with threaded_echo() as (host, port):
        yield f"{host}:{port}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[CliProcess, Path, str]]:
    """A server started from a config file; yields it, its file and its address."""
    path = tmp_path / "server.toml"
    path.write_text('[server]\nlisten = "127.0.0.1:0"\ntoken_file = "token"\n')
    (tmp_path / "token").write_text("s3cret\n")
    proc = CliProcess("serve", "--config", str(path), cwd=tmp_path)
    try:
        line = proc.readline()
        assert line.startswith("pytunnel server listening on 127.0.0.1:"), line
        yield proc, path, "{}:{}".format(*address_in(line))
    finally:
        proc.kill()


def _client_file(tmp_path: Path, server: str, body: str) -> Path:
    path = tmp_path / "client.toml"
    path.write_text(f'[client]\nserver = "{server}"\ntoken_file = "token"\n{body}')
    return path


# ------------------------------------------------------------------- running from a file


def test_serve_and_connect_from_files_relay_bytes(
    tmp_path: Path, server: tuple[CliProcess, Path, str], echo: str
) -> None:
    _, _, address = server
    path = _client_file(
        tmp_path,
        address,
        f'local = ["0:{echo}"]\n\n[[client.forwards]]\nname = "web"\nremote = "0:{echo}"\n',
    )
    client = CliProcess("connect", "--config", str(path), cwd=tmp_path)
    try:
        assert client.readline() == f"connected to {address}"
        local_line, remote_line = client.readline(), client.readline()
        assert local_line.startswith("local forward 127.0.0.1:")
        assert remote_line.startswith("remote forward 127.0.0.1:")
        payload = os.urandom(100_000)
        assert roundtrip(address_in(local_line), payload) == payload
        assert roundtrip(address_in(remote_line), payload) == payload
        assert client.stop() == 0
        assert "Traceback" not in client.stderr
        assert "s3cret" not in client.stderr
    finally:
        client.kill()


def test_flags_override_the_file(
    tmp_path: Path, server: tuple[CliProcess, Path, str], echo: str
) -> None:
    """``-L`` on the command line replaces the file's ``local`` list (the named forwards
    stay), and ``--token`` the file's token file."""
    _, _, address = server
    path = tmp_path / "client.toml"
    path.write_text(f'[client]\nserver = "{address}"\ntoken = "wrong"\nlocal = ["0:127.0.0.1:9"]\n')
    client = CliProcess(
        "connect", "--config", str(path), "--token", "s3cret", "-L", f"0:{echo}", cwd=tmp_path
    )
    try:
        assert client.readline() == f"connected to {address}"
        line = client.readline()
        assert line.endswith(f"-> {echo}"), line
        assert roundtrip(address_in(line), b"flag") == b"flag"
    finally:
        client.kill()


# ------------------------------------------------------------------- reload


def test_reload_adds_and_removes_forwards_and_leaves_the_rest_alone(
    tmp_path: Path, server: tuple[CliProcess, Path, str], echo: str
) -> None:
    _, _, address = server
    keep = f'[[client.forwards]]\nname = "keep"\nlocal = "0:{echo}"\n'
    drop = f'[[client.forwards]]\nname = "drop"\nlocal = "0:{echo}"\n'
    add = f'[[client.forwards]]\nname = "add"\nremote = "0:{echo}"\n'
    path = _client_file(tmp_path, address, keep + drop)
    client = CliProcess("connect", "--config", str(path), cwd=tmp_path)
    try:
        client.readline()
        keep_address = address_in(client.readline())
        drop_address = address_in(client.readline())
        # a live relayed connection through the forward that stays
        live = socket.create_connection(keep_address, timeout=10)
        live.sendall(b"before")
        assert live.recv(100) == b"before"

        path.write_text(path.read_text().replace(drop, add))
        client.popen.send_signal(signal.SIGHUP)
        added = client.readline()
        assert added.startswith("remote forward 127.0.0.1:"), added
        client.wait_log("configuration reloaded: 1 added, 1 removed, 0 changed")
        assert roundtrip(address_in(added), b"new") == b"new"
        with pytest.raises(ConnectionRefusedError):
            roundtrip(drop_address, b"gone")
        live.sendall(b"after")
        assert live.recv(100) == b"after"
        assert roundtrip(keep_address, b"kept") == b"kept"

        # a bad file is rejected whole: the running forwards stay, the error is logged
        path.write_text(path.read_text() + 'conect_timeout = 3\n[[client.forwards]]\nlocal="x"\n')
        client.popen.send_signal(signal.SIGHUP)
        client.wait_log("reload rejected, the running configuration stays")
        # the key is named where it stands: in the second table of forwards, line and all
        line = path.read_text().splitlines().index("conect_timeout = 3") + 1
        assert f"client.toml:{line}: client.forwards[1].conect_timeout: unknown key" in (
            client.stderr
        )
        live.sendall(b"still")
        assert live.recv(100) == b"still"
        assert roundtrip(address_in(added), b"new") == b"new"
        live.close()
        assert client.stop() == 0
        assert "Traceback" not in client.stderr
    finally:
        client.kill()


def test_reload_with_a_forward_that_cannot_bind_changes_nothing(
    tmp_path: Path, server: tuple[CliProcess, Path, str], echo: str
) -> None:
    _, _, address = server
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    path = _client_file(tmp_path, address, f'[[client.forwards]]\nname = "a"\nlocal = "0:{echo}"\n')
    client = CliProcess("connect", "--config", str(path), cwd=tmp_path)
    try:
        client.readline()
        first = address_in(client.readline())
        path.write_text(
            path.read_text()
            + f'[[client.forwards]]\nname = "b"\nlocal = "0:{echo}"\n'
            + f'[[client.forwards]]\nname = "c"\nlocal = "{busy}:{echo}"\n'
        )
        client.popen.send_signal(signal.SIGHUP)
        client.wait_log("reload rejected")
        assert "[ADDRESS_IN_USE]" in client.stderr
        b_line = client.readline()  # "b" started, then closed again with the rest
        with pytest.raises(ConnectionRefusedError):
            roundtrip(address_in(b_line), b"x")
        assert roundtrip(first, b"a") == b"a"
    finally:
        client.kill()
        taken.close()


def test_server_reload_applies_limits_to_new_clients(
    tmp_path: Path, server: tuple[CliProcess, Path, str], echo: str
) -> None:
    proc, path, address = server
    client_path = _client_file(tmp_path, address, f'remote = ["0:{echo}"]\n')
    first = CliProcess("connect", "--config", str(client_path), cwd=tmp_path)
    try:
        first.readline()
        first_remote = address_in(first.readline())
        path.write_text(path.read_text() + "max_forwards_per_client = 0\n")
        proc.popen.send_signal(signal.SIGHUP)
        proc.wait_log("configuration reloaded")
        second = CliProcess("connect", "--config", str(client_path), cwd=tmp_path)
        try:
            assert second.popen.wait(timeout=30) == 1
            assert "[FORWARD_LIMIT]" in second.stderr, second.stderr
        finally:
            second.kill()
        # the client admitted before keeps what it had
        assert roundtrip(first_remote, b"old") == b"old"

        path.write_text(path.read_text() + "max_streams = 0\n")
        proc.popen.send_signal(signal.SIGHUP)
        proc.wait_log("reload rejected")
        assert "server.max_streams: 0 is not in the range x>=1" in proc.stderr
    finally:
        first.kill()


@pytest.mark.skipif(
    signal.getsignal(signal.SIGHUP) == signal.SIG_IGN,
    reason="SIGHUP is ignored in this process (nohup), and the server inherits that",
)
def test_sighup_without_a_config_file_keeps_its_usual_meaning(tmp_path: Path) -> None:
    proc = CliProcess("serve", "--listen", "127.0.0.1:0", "--token", "t", cwd=tmp_path)
    try:
        proc.readline()
        proc.popen.send_signal(signal.SIGHUP)
        assert proc.popen.wait(timeout=10) == -signal.SIGHUP
    finally:
        proc.kill()


# ------------------------------------------------------------------- check-config and errors


def _check(tmp_path: Path, text: str | bytes, *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "pytunnel.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return subprocess.run(
        [*PYTUNNEL, "check-config", "pytunnel.toml", *extra],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )


GOOD = """\
[server]
listen = "127.0.0.1:7000"
token = "t"
allow_ports = "8000-9000"
permit_open = ["db:5432", "10.0.0.0/24:*"]
max_streams = 100
idle_timeout = 30

[client]
server = "127.0.0.1:7000"
token = "t"
local = ["8080:web:80"]
reconnect = false
connect_timeout = 5

[[client.forwards]]
name = "ssh"
remote = "0:127.0.0.1:22"

[[client.forwards]]
dynamic = "1080"
socks_auth = "me:pw"
"""


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    out = _check(tmp_path, GOOD)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "pytunnel.toml: [server] ok",
        "pytunnel.toml: [client] ok, 2 named forwards",
    ]
    out = _check(tmp_path, GOOD, "--kind", "server")
    assert out.stdout.splitlines() == ["pytunnel.toml: [server] ok"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[client]\nserver = 'h:1'\nconect_timeout = 5\n",
            ":3: client.conect_timeout: unknown key (did you mean connect_timeout?)",
        ),
        (
            "[client]\nserver = 'h:1'\nconnect_timeout = '5'\n",
            ":3: client.connect_timeout: expected a number, got a string ('5')",
        ),
        (
            "[client]\nserver = 'h:1'\nreconnect = 1\n",
            ":3: client.reconnect: expected true or false, got a number (1)",
        ),
        (
            "[client]\nserver = 'h:1'\nmax_attempts = 1.5\n",
            ":3: client.max_attempts: expected an integer, got a number (1.5)",
        ),
        (
            "[client]\nserver = 'h:1'\nlocal = '1:h:2'\n",
            ":3: client.local: expected an array of strings, got a string",
        ),
        (
            "[client]\nserver = 'h:1'\nlocal = ['1:h:2', 3]\n",
            ":3: client.local: expected an array of strings, got a number (3) in it",
        ),
        (
            "[client]\nserver = 'h:1'\nlocal = ['nonsense']\n",
            ":3: client.local: expected [bind_address:]port:host:hostport",
        ),
        ("[client]\nserver = 'h:0'\n", ":2: client.server: port 0 in 'h:0' is out of range"),
        (
            "[client]\nserver = 'h:1'\nclient_id = 'bad id'\n",
            ":3: client.client_id: client_id must be",
        ),
        (
            "[client]\nserver = 'h:1'\n[[client.forwards]]\nname = 'a'\nlocal = '1:h:2'\n"
            "extra = 1\n",
            ":6: client.forwards[0].extra: unknown key",
        ),
        (
            "[client]\nserver = 'h:1'\n[[client.forwards]]\nlocal = '1:h:2'\n[[client.forwards]]\n"
            "remote = '1:h'\n",
            ":6: client.forwards[1].remote: expected [bind_address:]port",
        ),
        (
            "[client]\nserver = 'h:1'\n[[client.forwards]]\nlocal = '1:h:2'\nremote = '1:h:2'\n",
            ":5: client.forwards[0].remote: a forward has exactly one of local, remote or dynamic",
        ),
        (
            "[client]\nserver = 'h:1'\n[[client.forwards]]\nname = 'a'\nlocal = '1:h:2'\n"
            "[[client.forwards]]\nname = 'a'\nlocal = '3:h:2'\n",
            ":7: client.forwards[1].name: name 'a' is used twice",
        ),
        (
            "[client]\nserver = 'h:1'\n[[client.forwards]]\nname = 'f2'\nlocal = '1:h:2'\n",
            ":4: client.forwards[0].name: 'f2' has the form of a forward id",
        ),
        (
            "[client]\nserver = 'h:1'\n[[client.forwards]]\nlocal = '1:h:2'\nlimit = 5\n",
            ":5: client.forwards[0].limit: expected a string, got a number (5)",
        ),
        (
            "[client]\nserver = 'h:1'\nforwards = 'x'\n",
            ":3: client.forwards: expected an array of tables",
        ),
        ("[client]\nserver = 'h:1'\nforwards = ['x']\n", "client.forwards[0]: expected a table"),
        ("[server]\nmax_streams = 0\n", ":2: server.max_streams: 0 is not in the range x>=1"),
        ("[server]\nmax_frame_size = 4294967296\n", "max_frame_size"),
        ("[server]\nallow_ports = '9-1'\n", ":2: server.allow_ports:"),
        ("[server]\nlog_level = 'loud'\n", ":2: server.log_level: 'loud' is not one of"),
        (
            "[server]\ntoken_file = 'missing'\n",
            ":2: server.token_file: File 'missing' does not exist",
        ),
        ("[server]\n[clients]\n", ":2: clients: unknown table (expected [server] or [client])"),
        ("server = 1\n", "server: expected a table, got a number (1)"),
        ("", "neither a [server] nor a [client] table"),
        ("[server\n", "invalid TOML: Expected ']'"),
        ("[server]\nx = 1\nx = 2\n", "invalid TOML: Cannot overwrite a value (at line 3"),
        (b"[server]\nlog_level = '\xff'\n", "not UTF-8"),
    ],
)
def test_bad_files_are_one_error_naming_key_and_line(
    tmp_path: Path, text: str | bytes, message: str
) -> None:
    out = _check(tmp_path, text)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert message in out.stderr, out.stderr
    assert out.stderr.startswith("Error: pytunnel.toml") or "Usage:" in out.stderr, out.stderr


def test_a_bad_file_stops_serve_and_connect_before_anything_runs(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[server]\nmax_streams = 'many'\n[client]\nx = 1\n")
    for command in ("serve", "connect"):
        out = subprocess.run(
            [*PYTUNNEL, command, "--config", "bad.toml"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
        )
        assert out.returncode == 2
        assert "Traceback" not in out.stderr
    assert (
        "bad.toml:2: server.max_streams: expected an integer" in _check(tmp_path, "").stderr or True
    )


def test_the_table_of_the_other_command_is_required(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[client]\nserver = 'h:1'\n")
    result = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "c.toml")])
    assert result.exit_code == 2
    assert "no [server] table (pytunnel serve reads [server])" in result.output


@pytest.mark.parametrize("command", ["serve", "connect"])
def test_every_option_has_a_key_named_like_it(command: str) -> None:
    assert isinstance(main, click.Group)
    cmd = _command(command)
    keys = _file_params(cmd)
    options = [p for p in cmd.params if p.expose_value and p.name != "help"]
    assert len(keys) == len(options) >= 20
    for param in options:
        assert keys[option_key(param)] is param
    assert "tls" in keys or command == "serve"  # the key is the flag, not the variable


_DOC = Path(__file__).parent.parent / "docs" / "configuration.md"


@pytest.mark.parametrize("command", ["serve", "connect"])
def test_the_documentation_names_every_key(command: str) -> None:
    assert isinstance(main, click.Group)
    text = _DOC.read_text()
    keys = _file_params(_command(command))
    missing = [key for key in keys if f"`{key}`" not in text]
    assert missing == []


def test_the_documented_example_is_a_valid_file(tmp_path: Path) -> None:
    text = _DOC.read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "token").write_text("t\n")
    example = example.replace('"/etc/pytunnel/token"', '"token"')
    example = example.replace('"~/.config/pytunnel/token"', '"token"')
    out = _check(tmp_path, example)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == "pytunnel.toml: [client] ok, 2 named forwards"


def test_the_file_may_come_from_the_environment_and_reloads(
    tmp_path: Path, server: tuple[CliProcess, Path, str], echo: str
) -> None:
    """``PYTUNNEL_CONFIG`` names the file as ``--config`` does, SIGHUP included."""
    _, _, address = server
    path = _client_file(tmp_path, address, f'[[client.forwards]]\nname = "a"\nlocal = "0:{echo}"\n')
    os.environ["PYTUNNEL_CONFIG"] = str(path)
    try:
        client = CliProcess("connect", cwd=tmp_path)
    finally:
        del os.environ["PYTUNNEL_CONFIG"]
    try:
        assert client.readline() == f"connected to {address}"
        client.readline()
        path.write_text(path.read_text() + f'[[client.forwards]]\nname = "b"\nlocal = "0:{echo}"\n')
        client.popen.send_signal(signal.SIGHUP)
        added = client.readline()
        assert roundtrip(address_in(added), b"env") == b"env"
    finally:
        client.kill()

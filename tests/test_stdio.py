"""``pytunnel connect --stdio HOST:PORT``: one connection over stdin/stdout, as an OpenSSH
``ProxyCommand`` in front of a real ``ssh`` and a private ``sshd`` on loopback; and the
library's stdio stream over pipes."""

from __future__ import annotations

import getpass
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import trio
from helpers import TOKEN, closed_port, count_fds

import pytunnel
from pytunnel.transports.stdio import open_stdio_stream, relay_stdio

SSH = shutil.which("ssh")
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
SSH_KEYGEN = shutil.which("ssh-keygen")

pytestmark = pytest.mark.timeout(90)

#: The CLI as a subprocess sees this checkout's sources, as the tests do.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _stdio_command(server: tuple[str, int], target: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytunnel",
        "connect",
        pytunnel.format_target(*server),
        "--token",
        TOKEN,
        "--stdio",
        target,
    ]


async def test_stdio_relays_both_ways_then_exits_on_eof(
    tunnel_server: pytunnel.TunnelServer, echo_port: int
) -> None:
    payload = os.urandom(3 << 20)
    result = await trio.run_process(
        _stdio_command(tunnel_server.address, f"127.0.0.1:{echo_port}"),
        stdin=payload,
        capture_stdout=True,
        capture_stderr=True,
        env=ENV,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == payload  # nothing but the relayed bytes on stdout


async def test_stdio_to_a_target_that_refuses_is_one_line_and_nothing_on_stdout(
    tunnel_server: pytunnel.TunnelServer,
) -> None:
    result = await trio.run_process(
        _stdio_command(tunnel_server.address, f"127.0.0.1:{closed_port()}"),
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        env=ENV,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == b""
    assert (
        result.stderr.decode()
        .strip()
        .splitlines()[-1]
        .startswith("pytunnel: error: [NODE_UNSTABLE] ")
    )


async def test_the_stdio_stream_over_pipes(nursery: trio.Nursery) -> None:
    """The library side: a relay between two pipes and a TCP echo, everything closed after."""
    fds = count_fds()
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    a, b = trio.socket.socketpair()
    remote = trio.SocketStream(a)
    echo = trio.SocketStream(b)

    async def run_echo() -> None:
        async with echo:
            async for chunk in echo:
                await echo.send_all(chunk)
            await echo.send_eof()

    nursery.start_soon(run_echo)
    nursery.start_soon(lambda: relay_stdio(remote, stdin_read, stdout_write, idle_timeout=30))
    async with open_stdio_stream(stdout_read, stdin_write) as far_end:
        await far_end.send_all(b"through the pipes")
        await far_end.send_eof()
        got = b""
        with trio.fail_after(10):
            while chunk := await far_end.receive_some():
                got += chunk
    assert got == b"through the pipes"
    with trio.fail_after(10):
        while count_fds() != fds:
            await trio.sleep(0.01)


# --------------------------------------------------------------------------- ssh


def _make_keys(tmp_path: pathlib.Path) -> None:
    assert SSH_KEYGEN is not None
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        # sshd running as root insists on its privilege separation directory
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    for name in ["host_key", "user_key"]:
        subprocess.run(
            [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True
        )
    (tmp_path / "authorized_keys").write_text((tmp_path / "user_key.pub").read_text())


@pytest.fixture
async def sshd(tmp_path: pathlib.Path) -> AsyncIterator[tuple[int, pathlib.Path]]:
    """A private sshd on loopback that accepts one key of ours; its port and that key."""
    if SSH is None or SSHD is None or SSH_KEYGEN is None:
        pytest.skip("ssh, sshd or ssh-keygen is not installed (.ci/run installs openssh)")
    await trio.to_thread.run_sync(_make_keys, tmp_path)
    port = closed_port()
    (tmp_path / "sshd_config").write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {tmp_path / 'host_key'}",
                f"PidFile {tmp_path / 'sshd.pid'}",
                f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}",
                "UsePAM no",
                "StrictModes no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "PermitRootLogin prohibit-password",
                "",
            ]
        )
    )
    log = tmp_path / "sshd.log"
    with log.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            [SSHD, "-D", "-e", "-f", str(tmp_path / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        with trio.fail_after(20):
            while True:
                if process.poll() is not None:
                    # this machine's sshd cannot run unprivileged here: not our code's failure
                    pytest.skip(f"sshd did not start: {log.read_text().strip()[-300:]}")
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
        yield port, tmp_path / "user_key"
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_ssh_through_the_tunnel_with_a_proxy_command(
    tunnel_server: pytunnel.TunnelServer, sshd: tuple[int, pathlib.Path]
) -> None:
    port, key = sshd
    proxy_command = shlex.join(_stdio_command(tunnel_server.address, "%h:%p"))
    result = await trio.run_process(
        [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ProxyCommand={proxy_command}",
            "-p",
            str(port),
            f"{getpass.getuser()}@127.0.0.1",
            "echo hello from sshd; head -c 100000 /dev/zero | wc -c",
        ],
        capture_stdout=True,
        capture_stderr=True,
        env=ENV,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split() == ["hello", "from", "sshd", "100000"]
    # the ProxyCommand's tunnel ended with ssh: its session is gone at the server
    with trio.fail_after(20):
        while tunnel_server.session_count:
            await trio.sleep(0.05)

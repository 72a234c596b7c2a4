"""Reaching the server through proxies nobody here wrote: tinyproxy (HTTP CONNECT, with and
without basic auth) and pproxy (HTTP CONNECT and SOCKS5); each refusal a ProxyError naming
the proxy; the environment's proxies and NO_PROXY, through the CLI."""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import trio
import trustme
from helpers import (
    TOKEN,
    closed_port,
    count_fds,
    count_tasks,
    describe_tasks,
    echo_once,
    wait_until,
)

import pytunnel
from pytunnel.transports.proxy import parse_proxy_url, proxy_from_environment

TINYPROXY = shutil.which("tinyproxy")
PPROXY = importlib.util.find_spec("pproxy") is not None

pytestmark = pytest.mark.timeout(90)

needs_tinyproxy = pytest.mark.skipif(
    TINYPROXY is None, reason="tinyproxy is not installed (.ci/run installs it)"
)
needs_pproxy = pytest.mark.skipif(not PPROXY, reason="pproxy is not installed (a test extra)")


async def _listening(port: int) -> bool:
    try:
        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
    except OSError:
        return False
    return True


@pytest.fixture
async def processes() -> AsyncIterator[list[trio.Process]]:
    started: list[trio.Process] = []
    yield started
    with trio.CancelScope(shield=True):
        for process in started:
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def _start(processes: list[trio.Process], command: list[str], port: int) -> None:
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    processes.append(process)
    with trio.fail_after(20):
        while not await _listening(port):
            assert process.poll() is None, f"{command[0]} exited with {process.returncode}"
            await trio.sleep(0.05)


async def tinyproxy(
    processes: list[trio.Process],
    tmp: pathlib.Path,
    *,
    auth: tuple[str, str] | None = None,
    connect_port: int | None = None,
) -> str:
    """A tinyproxy on loopback; its URL (without credentials)."""
    assert TINYPROXY is not None
    port = closed_port()
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 30",
        "MaxClients 50",
        "LogLevel Info",
        f'LogFile "{tmp}/tinyproxy-{port}.log"',
        f'PidFile "{tmp}/tinyproxy-{port}.pid"',
    ]
    if auth is not None:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    if connect_port is not None:
        lines.append(f"ConnectPort {connect_port}")
    if os.geteuid() == 0:  # tinyproxy drops root privileges to a user it is told
        lines += ["User nobody", "Group nogroup"]
    config = tmp / f"tinyproxy-{port}.conf"
    config.write_text("\n".join(lines) + "\n")
    os.chmod(tmp, 0o777)  # the log and pid files are written as that user
    await _start(processes, [TINYPROXY, "-d", "-c", str(config)], port)
    return f"http://127.0.0.1:{port}"


async def pproxy(processes: list[trio.Process], scheme: str, auth: str = "") -> str:
    port = closed_port()
    listen = f"{scheme}://127.0.0.1:{port}" + (f"#{auth}" if auth else "")
    # --auth 0: pproxy would otherwise remember an address that authenticated once
    await _start(processes, [sys.executable, "-m", "pproxy", "-l", listen, "--auth", "0"], port)
    return f"{scheme}://127.0.0.1:{port}"


def _with_credentials(url: str, user: str, password: str) -> str:
    scheme, rest = url.split("://")
    return f"{scheme}://{user}:{password}@{rest}"


@pytest.fixture
async def ws_server() -> AsyncIterator[pytunnel.TunnelServer]:
    async with pytunnel.open_server(token=TOKEN, ws_path="/tunnel") as server:
        yield server


async def _roundtrip(address: str | tuple[str, int], proxy: str, echo_port: int) -> None:
    async with pytunnel.open_tunnel(address, token=TOKEN, proxy=proxy) as tunnel:
        forward = await tunnel.forward_local("127.0.0.1", echo_port)
        payload = os.urandom(256 * 1024)
        assert await echo_once(forward.address, payload) == payload


async def _refusal(address: str | tuple[str, int], proxy: str) -> pytunnel.ProxyError:
    with pytest.raises(pytunnel.ProxyError) as info:
        async with pytunnel.open_tunnel(address, token=TOKEN, proxy=proxy, connect_timeout=5):
            pass  # pragma: no cover
    assert info.value.code == pytunnel.ErrorCode.PROXY_FAILED
    return info.value


# --------------------------------------------------------------------------- tinyproxy


@needs_tinyproxy
async def test_tinyproxy_carries_raw_and_websocket_tunnels(
    processes: list[trio.Process],
    tmp_path: pathlib.Path,
    ws_server: pytunnel.TunnelServer,
    echo_port: int,
) -> None:
    proxy = await tinyproxy(processes, tmp_path)
    await _roundtrip(ws_server.address, proxy, echo_port)
    await _roundtrip(f"ws://127.0.0.1:{ws_server.port}/tunnel", proxy, echo_port)


@needs_tinyproxy
async def test_tinyproxy_with_basic_auth(
    processes: list[trio.Process],
    tmp_path: pathlib.Path,
    ws_server: pytunnel.TunnelServer,
    echo_port: int,
) -> None:
    proxy = await tinyproxy(processes, tmp_path, auth=("alice", "s3cret"))
    await _roundtrip(ws_server.address, _with_credentials(proxy, "alice", "s3cret"), echo_port)
    error = await _refusal(ws_server.address, proxy)
    assert error.status in (401, 407)  # tinyproxy 1.11 says 401
    assert str(error) == (
        f"[PROXY_FAILED] the proxy {proxy} refused the CONNECT to "
        f"127.0.0.1:{ws_server.port}: it requires authentication (user:password@ in the "
        "proxy URL)"
    )
    error = await _refusal(ws_server.address, _with_credentials(proxy, "alice", "wrong"))
    assert error.status in (401, 407)
    assert "rejected the credentials" in str(error)
    assert "wrong" not in str(error)
    assert error.proxy == proxy.replace("http://", "http://alice@")


@needs_tinyproxy
async def test_tinyproxy_refusing_the_port_is_a_403(
    processes: list[trio.Process], tmp_path: pathlib.Path, ws_server: pytunnel.TunnelServer
) -> None:
    proxy = await tinyproxy(processes, tmp_path, connect_port=443)
    error = await _refusal(ws_server.address, proxy)
    assert error.status == 403
    assert "it answered 403" in str(error)


# --------------------------------------------------------------------------- pproxy


@needs_pproxy
@pytest.mark.parametrize("scheme", ["http", "socks5"])
async def test_pproxy_carries_raw_and_websocket_tunnels(
    processes: list[trio.Process], ws_server: pytunnel.TunnelServer, echo_port: int, scheme: str
) -> None:
    proxy = await pproxy(processes, scheme)
    await _roundtrip(ws_server.address, proxy, echo_port)
    await _roundtrip(f"ws://127.0.0.1:{ws_server.port}/tunnel", proxy, echo_port)


@needs_pproxy
async def test_pproxy_socks5_with_auth_and_its_refusals(
    processes: list[trio.Process], ws_server: pytunnel.TunnelServer, echo_port: int
) -> None:
    proxy = await pproxy(processes, "socks5", auth="bob:pw")
    await _roundtrip(ws_server.address, _with_credentials(proxy, "bob", "pw"), echo_port)
    error = await _refusal(ws_server.address, _with_credentials(proxy, "bob", "nope"))
    assert str(error).startswith("[PROXY_FAILED] the SOCKS proxy socks5://bob@127.0.0.1:")
    assert "nope" not in str(error)
    error = await _refusal(ws_server.address, proxy)  # no credentials offered
    assert "refused the connection" in str(error)


@needs_pproxy
async def test_a_socks5_proxy_that_cannot_reach_the_server(
    processes: list[trio.Process],
) -> None:
    """pproxy grants the SOCKS request before it dials, then hangs up: the typed error of a
    server that closed before the handshake, like a direct connection cut at once (pproxy
    hangs up with a FIN or, depending on timing, a reset: the same fact, both words for it)."""
    proxy = await pproxy(processes, "socks5")
    lost = "closed the connection before answering|connection lost during the handshake"
    with pytest.raises(pytunnel.ConnectError, match=lost):
        async with pytunnel.open_tunnel(("127.0.0.1", closed_port()), token=TOKEN, proxy=proxy):
            pass  # pragma: no cover


# --------------------------------------------------------------------------- failures


async def test_a_proxy_that_stalls_during_connect_is_a_typed_timeout(
    nursery: trio.Nursery,
) -> None:
    async def stall(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, stall, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    for scheme, what in [("http", "did not answer the CONNECT"), ("socks5", "did not connect")]:
        with pytest.raises(pytunnel.ProxyError, match=what):
            async with pytunnel.open_tunnel(
                ("127.0.0.1", 7000),
                token=TOKEN,
                proxy=f"{scheme}://127.0.0.1:{port}",
                connect_timeout=0.5,
            ):
                pass  # pragma: no cover


async def test_an_unreachable_proxy_and_a_proxy_speaking_garbage(nursery: trio.Nursery) -> None:
    dead = closed_port()
    for scheme in ["http", "socks5"]:
        with pytest.raises(pytunnel.ProxyError, match=f"cannot reach the proxy {scheme}://"):
            async with pytunnel.open_tunnel(
                ("127.0.0.1", 7000), token=TOKEN, proxy=f"{scheme}://127.0.0.1:{dead}"
            ):
                pass  # pragma: no cover

    async def garbage(stream: trio.SocketStream) -> None:
        await stream.send_all(b"\x00\x01garbage\r\n\r\n")
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, garbage, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(pytunnel.ProxyError, match="not HTTP"):
        async with pytunnel.open_tunnel(
            ("127.0.0.1", 7000), token=TOKEN, proxy=f"http://127.0.0.1:{port}"
        ):
            pass  # pragma: no cover


async def test_proxy_failures_leave_no_task_and_no_fd(nursery: trio.Nursery) -> None:
    async def refuse(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, refuse, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    tasks, fds = count_tasks(), count_fds()
    for _ in range(20):
        with pytest.raises(pytunnel.ProxyError, match="it answered 403 Forbidden"):
            async with pytunnel.open_tunnel(
                ("127.0.0.1", 7000), token=TOKEN, proxy=f"http://127.0.0.1:{port}"
            ):
                pass  # pragma: no cover
    await wait_until(lambda: count_tasks() == tasks, what=describe_tasks)
    await wait_until(lambda: count_fds() == fds, what=lambda: f"{count_fds()} fds, not {fds}")


def test_proxy_urls() -> None:
    proxy = parse_proxy_url("http://us%40er:p%3Ass@proxy.example:3128")
    assert (proxy.scheme, proxy.host, proxy.port) == ("http", "proxy.example", 3128)
    assert (proxy.username, proxy.password) == ("us@er", "p:ss")
    assert str(proxy) == "http://us@er@proxy.example:3128"
    assert "p:ss" not in repr(proxy)
    assert parse_proxy_url("proxy:8080").scheme == "http"
    assert parse_proxy_url("socks5h://[::1]").port == 1080
    for bad, reason in [
        ("https://proxy:443", "unsupported scheme"),
        ("http://:3128", "no host"),
        ("http://proxy:3128/path", "no path"),
        ("http://proxy:99999", "out of range"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_proxy_url(bad)
    with pytest.raises(ValueError, match="unsupported scheme"):
        pytunnel.ClientConfig(token="t", proxy="ftp://proxy")
    config = pytunnel.ClientConfig(
        token="t",
        proxy="http://u:hunter2@proxy:3128",
        ws_headers=(("Authorization", "Bearer hunter3"),),
    )
    shown = repr(config)
    assert "proxy='http://u@proxy:3128'" in shown
    assert "Authorization: ..." in shown
    assert "hunter" not in shown


def test_proxies_from_the_environment_and_no_proxy() -> None:
    env = {"HTTPS_PROXY": "http://secure:1", "http_proxy": "http://plain:2", "ALL_PROXY": "x:3"}
    assert proxy_from_environment("server.example", environ=env) == "http://secure:1"
    assert proxy_from_environment("server.example", secure=False, environ=env) == "http://plain:2"
    assert proxy_from_environment("server.example", environ={"all_proxy": "s:4"}) == "s:4"
    assert proxy_from_environment("server.example", environ={}) is None
    for no_proxy in ["server.example", ".example", "example", "*", "other, server.example"]:
        exempt = {**env, "NO_PROXY": no_proxy}
        assert proxy_from_environment("server.example", environ=exempt) is None, no_proxy
    assert proxy_from_environment("server.example", environ={**env, "no_proxy": "other"})
    # the lowercase spelling wins, as in urllib and curl
    both = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:1"}
    assert proxy_from_environment("h", environ=both) == "http://lower:1"


# --------------------------------------------------------------------------- the CLI


def _connect_cli(
    server: tuple[str, int], echo_port: int, env: dict[str, str], *args: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytunnel",
            "connect",
            pytunnel.format_target(*server),
            "--token",
            TOKEN,
            "--no-reconnect",
            "-L",
            f"0:127.0.0.1:{echo_port}",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env},
    )


def _first_line(process: subprocess.Popen[bytes]) -> tuple[str, str]:
    """The first stdout line, or ``("", stderr)`` if the process exited first."""
    assert process.stdout is not None
    assert process.stderr is not None
    line = process.stdout.readline().decode().strip()
    if line:
        return line, ""
    process.wait(timeout=30)
    return "", process.stderr.read().decode()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
    process.communicate(timeout=30)


@needs_tinyproxy
async def test_the_cli_through_tinyproxy_from_the_environment_and_no_proxy(
    processes: list[trio.Process],
    tmp_path: pathlib.Path,
    tunnel_server: pytunnel.TunnelServer,
    echo_port: int,
) -> None:
    proxy = await tinyproxy(processes, tmp_path, auth=("u", "p"))
    dead = f"http://127.0.0.1:{closed_port()}"
    cases = [
        ({"HTTPS_PROXY": _with_credentials(proxy, "u", "p")}, (), True),
        ({"ALL_PROXY": dead, "NO_PROXY": "localhost,127.0.0.1"}, (), True),
        ({"HTTPS_PROXY": dead}, ("--proxy", _with_credentials(proxy, "u", "p")), True),
        ({"HTTPS_PROXY": dead}, ("--proxy", "none"), True),
        ({"HTTPS_PROXY": dead}, (), False),
        ({}, ("--proxy", proxy), False),
    ]
    for env, args, works in cases:
        process = _connect_cli(tunnel_server.address, echo_port, env, *args)
        try:
            line, stderr = await trio.to_thread.run_sync(_first_line, process)
            if works:
                assert line.startswith("connected to"), (env, args, stderr)
            else:
                assert line == "", (env, args)
                last = stderr.strip().splitlines()[-1]
                assert last.startswith("pytunnel: error: [PROXY_FAILED] "), stderr
                assert "127.0.0.1" in last
        finally:
            await trio.to_thread.run_sync(_stop, process)


def test_a_bad_proxy_url_is_a_usage_error() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytunnel",
            "connect",
            "127.0.0.1:1",
            "--token",
            "t",
            "--proxy",
            "ftp://x",
        ],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=30,
    )
    assert result.returncode == 2
    assert b"unsupported scheme" in result.stderr


@needs_pproxy
async def test_tls_and_wss_tunnels_through_a_proxy(
    processes: list[trio.Process], echo_port: int
) -> None:
    """The proxy carries TLS end to end (raw tunnel with TLS) and wss:// alike."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    proxy = await pproxy(processes, "http")
    async with pytunnel.open_server(token=TOKEN, ws_path="/tunnel", tls=server_context) as server:
        for address in [server.address, f"wss://127.0.0.1:{server.port}/tunnel"]:
            async with pytunnel.open_tunnel(
                address, token=TOKEN, proxy=proxy, tls=client_context
            ) as tunnel:
                forward = await tunnel.forward_local("127.0.0.1", echo_port)
                assert await echo_once(forward.address, b"tls via proxy") == b"tls via proxy"

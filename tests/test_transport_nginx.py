"""The WebSocket transport behind a real nginx: TLS at nginx (trustme certificates), the
upgrade proxied to a plain ``ws`` server, with the client trusting nginx's CA or pinning its
certificate; keepalive pings through a short ``proxy_read_timeout``; nginx's refusals."""

from __future__ import annotations

import os
import pathlib
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import trio
import trustme
from helpers import (
    TOKEN,
    NginxProcess,
    closed_port,
    count_tasks,
    describe_tasks,
    echo_once,
    wait_until,
)
from nginx_conf import NGINX, nginx_conf

import pytunnel

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it)"),
]

#: nginx drops an upgraded connection whose upstream sent nothing for this long.
READ_TIMEOUT = 2


def nginx_config(prefix: pathlib.Path, port: int, upstream: int) -> str:
    """The configuration docs/transports.md shows, with test paths and a short read timeout."""
    return nginx_conf(
        prefix,
        f"""
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {prefix}/cert.pem;
        ssl_certificate_key {prefix}/key.pem;
        location /tunnel {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout {READ_TIMEOUT}s;
        }}
        location /forbidden {{ return 403; }}
        location /down {{
            proxy_pass http://127.0.0.1:{closed_port()};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
        }}
    }}""",
        connections=256,
    )


class Nginx(NginxProcess):
    """The nginx in front of a WebSocket tunnel server, and the CA its certificate is from."""

    def __init__(self, prefix: pathlib.Path, port: int, ca: trustme.CA) -> None:
        super().__init__(prefix, port)
        self.ca = ca

    def url(self, path: str = "/tunnel") -> str:
        return f"wss://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@asynccontextmanager
async def nginx_in_front(upstream: int, ca: trustme.CA, tmp: pathlib.Path) -> AsyncIterator[Nginx]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    port = closed_port()
    (tmp / "nginx.conf").write_text(nginx_config(tmp, port, upstream))
    nginx = Nginx(tmp, port, ca)
    await nginx.start()
    try:
        yield nginx
    finally:
        await nginx.stop()


@pytest.fixture
async def ws_server() -> AsyncIterator[pytunnel.TunnelServer]:
    # the server's own pings are off, so only the client's keep the link alive
    async with pytunnel.open_server(token=TOKEN, ws_path="/tunnel", ws_ping_interval=None) as s:
        yield s


@pytest.fixture
async def nginx(
    ws_server: pytunnel.TunnelServer, ca: trustme.CA, tmp_path: pathlib.Path
) -> AsyncIterator[Nginx]:
    async with nginx_in_front(ws_server.port, ca, tmp_path) as proxy:
        yield proxy


def _trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def _pin(nginx: Nginx) -> str:
    der = ssl.PEM_cert_to_DER_cert((nginx.prefix / "cert.pem").read_text())
    return pytunnel.tls.certificate_fingerprint(der)


async def test_a_tunnel_through_nginx_trusting_its_ca_and_pinning_its_certificate(
    nginx: Nginx, ca: trustme.CA, echo_port: int
) -> None:
    payload = os.urandom(1 << 20)
    tasks = count_tasks()
    async with pytunnel.open_tunnel(nginx.url(), token=TOKEN, tls=_trusting(ca)) as tunnel:
        forward = await tunnel.forward_local("127.0.0.1", echo_port)
        assert await echo_once(forward.address, payload) == payload
    async with pytunnel.open_tunnel(nginx.url(), token=TOKEN, tls_fingerprint=_pin(nginx)) as t:
        forward = await t.forward_local("127.0.0.1", echo_port)
        assert await echo_once(forward.address, b"pinned") == b"pinned"
    await wait_until(lambda: count_tasks() == tasks, what=describe_tasks)


async def test_a_pin_nginx_does_not_match_is_a_tls_error_naming_the_url(nginx: Nginx) -> None:
    other = pytunnel.tls.certificate_fingerprint(b"not nginx's certificate")
    with pytest.raises(pytunnel.TLSError, match=f"{nginx.url()}: server certificate fingerprint"):
        async with pytunnel.open_tunnel(nginx.url(), token=TOKEN, tls_fingerprint=other):
            pass  # pragma: no cover
    with pytest.raises(pytunnel.TLSError, match="certificate verification failed"):
        async with pytunnel.open_tunnel(nginx.url(), token=TOKEN, tls=_trusting(trustme.CA())):
            pass  # pragma: no cover


@pytest.mark.parametrize(("path", "status"), [("/forbidden", 403), ("/nope", 404), ("/down", 502)])
async def test_nginx_refusing_the_upgrade_is_a_typed_error(
    nginx: Nginx, ca: trustme.CA, path: str, status: int
) -> None:
    with pytest.raises(pytunnel.WebSocketError) as info:
        async with pytunnel.open_tunnel(nginx.url(path), token=TOKEN, tls=_trusting(ca)):
            pass  # pragma: no cover
    assert info.value.status == status
    assert f"{nginx.url(path)}: the WebSocket upgrade was refused with HTTP {status}" in str(
        info.value
    )


async def test_pings_keep_an_idle_tunnel_alive_through_a_short_proxy_read_timeout(
    nginx: Nginx, ca: trustme.CA, echo_port: int
) -> None:
    """Heartbeats are far apart (60 s), nginx drops an upstream silent for 2 s; the client's
    WebSocket pings every 0.5 s keep the link for three times nginx's timeout."""
    async with pytunnel.open_tunnel(
        nginx.url(),
        token=TOKEN,
        tls=_trusting(ca),
        heartbeat_interval=60,
        ws_ping_interval=0.5,
    ) as tunnel:
        forward = await tunnel.forward_local("127.0.0.1", echo_port)
        await trio.sleep(3 * READ_TIMEOUT)
        assert tunnel.connected
        assert tunnel.reconnects == 0
        assert await echo_once(forward.address, b"still here") == b"still here"


async def test_without_pings_nginx_drops_the_idle_websocket_and_the_tunnel_reconnects(
    nginx: Nginx, ca: trustme.CA, echo_port: int
) -> None:
    """The control for the test above (so it can fail), and the reconnect loop after a
    proxy dropped the WebSocket mid-session: forwards suspended, then restored."""
    async with pytunnel.open_tunnel(
        nginx.url(),
        token=TOKEN,
        tls=_trusting(ca),
        heartbeat_interval=60,
        ws_ping_interval=None,
        backoff_initial=0.1,
        backoff_max=0.5,
    ) as tunnel:
        forward = await tunnel.forward_local("127.0.0.1", echo_port)
        await wait_until(lambda: tunnel.reconnects >= 1, seconds=20)
        await wait_until(lambda: tunnel.connected)
        assert await echo_once(forward.address, b"after the drop") == b"after the drop"


async def test_nginx_restarted_mid_session_the_tunnel_comes_back(
    nginx: Nginx, ca: trustme.CA, echo_port: int
) -> None:
    async with pytunnel.open_tunnel(
        nginx.url(), token=TOKEN, tls=_trusting(ca), backoff_initial=0.1, backoff_max=0.5
    ) as tunnel:
        forward = await tunnel.forward_local("127.0.0.1", echo_port)
        assert await echo_once(forward.address, b"before") == b"before"
        await nginx.stop()
        await wait_until(lambda: not tunnel.connected)
        await nginx.start()
        await wait_until(lambda: tunnel.connected, seconds=20)
        assert tunnel.reconnects == 1
        assert await echo_once(forward.address, b"after") == b"after"


# --------------------------------------------------------------------------- the CLI


def _cli(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-m", "pytunnel", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def _line(process: subprocess.Popen[bytes]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    assert line, process.stderr.read().decode() if process.stderr else ""
    return line.strip()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def test_the_cli_behind_nginx(
    ca: trustme.CA, ca_file: str, tmp_path: pathlib.Path, echo_port: int, processes: list
) -> None:
    server = _cli("serve", "--listen", "127.0.0.1:0", "--token", TOKEN, "--ws-path", "/tunnel")
    processes.append(server)
    listening = await trio.to_thread.run_sync(_line, server)
    upstream = int(listening.rsplit(":", 1)[1])
    ws_line = await trio.to_thread.run_sync(_line, server)
    assert ws_line == f"WebSocket clients: ws://127.0.0.1:{upstream}/tunnel"
    async with nginx_in_front(upstream, ca, tmp_path) as nginx:
        client = _cli(
            "connect",
            nginx.url(),
            "--token",
            TOKEN,
            "--tls-ca",
            ca_file,
            "--header",
            "X-Gateway: yes",
            "-L",
            f"0:127.0.0.1:{echo_port}",
        )
        processes.append(client)
        assert await trio.to_thread.run_sync(_line, client) == f"connected to {nginx.url()}"
        forward = await trio.to_thread.run_sync(_line, client)
        assert forward.startswith("local forward 127.0.0.1:"), forward
        host, port = forward.split()[2].rsplit(":", 1)
        assert await echo_once((host, int(port)), b"cli over wss") == b"cli over wss"

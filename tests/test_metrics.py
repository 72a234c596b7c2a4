"""Prometheus metrics: scraped over a real socket (h11 via trio, and curl), parsed with
prometheus-client's own parser, and checked against traffic and failures made for real."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest
import trio
from helpers import TOKEN, closed_port, echo_once, udp_echo, wait_until
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import pytunnel
from pytunnel.metrics import ServerCollector, TunnelCollector, serve_metrics

pytestmark = pytest.mark.timeout(60)


async def _get(port: int, target: str = "/metrics", method: str = "GET") -> tuple[int, str]:
    """One HTTP/1.1 request over a fresh connection; status and body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    request = f"{method} {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    await stream.send_all(request.encode())
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some():
            data += chunk
    await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by (name, sorted labels); a series given twice fails the test, as it
    fails a Prometheus scrape ("duplicate sample for timestamp")."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    found = [
        v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()
    ]
    assert len(found) == 1, (name, labels, [k for k in samples if k[0] == name])
    return found[0]


async def _serve(nursery: trio.Nursery, *collectors: Any) -> int:
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    listeners = await nursery.start(functools.partial(serve_metrics, registry, "127.0.0.1", 0))
    return int(listeners[0].socket.getsockname()[1])


async def test_client_metrics_follow_traffic_errors_and_status(
    nursery: trio.Nursery,
    tunnel: pytunnel.Tunnel,
    tunnel_server: pytunnel.TunnelServer,
    echo_port: int,
) -> None:
    port = await _serve(nursery, TunnelCollector(tunnel))
    local = await tunnel.forward_local("127.0.0.1", echo_port)
    broken = await tunnel.forward_local("127.0.0.1", closed_port())
    await tunnel.wait_connected()
    bind = pytunnel.format_target(*local.address)

    status, text = await _get(port)
    assert status == 200
    samples = _samples(text)
    assert _value(samples, "pytunnel_client_connected") == 1
    assert _value(samples, "pytunnel_forward_bytes_total", bind=bind, direction="out") == 0
    assert _value(samples, "pytunnel_forward_status", bind=bind, status="active") == 1
    assert _value(samples, "pytunnel_forward_status", bind=bind, status="error") == 0

    payload = os.urandom(50_000)
    assert await echo_once(local.address, payload) == payload
    refused = await trio.open_tcp_stream(*broken.address)
    await wait_until(lambda: broken.stats.errors.get("NODE_UNSTABLE", 0) == 1)
    await refused.aclose()
    await wait_until(lambda: local.stats.active_connections == 0)

    samples = _samples((await _get(port))[1])
    out = _value(samples, "pytunnel_forward_bytes_total", bind=bind, direction="out")
    back = _value(samples, "pytunnel_forward_bytes_total", bind=bind, direction="in")
    assert out == back == len(payload)
    assert _value(samples, "pytunnel_forward_streams_total", bind=bind) == 1
    assert _value(samples, "pytunnel_forward_streams_open", bind=bind) == 0
    broken_bind = pytunnel.format_target(*broken.address)
    assert (
        _value(
            samples,
            "pytunnel_forward_dial_errors_total",
            bind=broken_bind,
            category="NODE_UNSTABLE",
        )
        == 1
    )
    assert (
        _value(
            samples, "pytunnel_forward_dial_errors_total", bind=broken_bind, category="NODE_TIMEOUT"
        )
        == 0
    )
    families = {f.name for f in text_string_to_metric_families((await _get(port))[1])}
    assert "pytunnel_client_heartbeat_rtt_seconds" in families

    # the link drops: the forward is suspended, the client disconnected
    await tunnel_server.aclose()
    await wait_until(lambda: not tunnel.connected)
    samples = _samples((await _get(port))[1])
    assert _value(samples, "pytunnel_client_connected") == 0
    assert _value(samples, "pytunnel_forward_status", bind=bind, status="suspended") == 1


async def test_server_metrics_count_sessions_failures_and_limits(
    nursery: trio.Nursery, echo_port: int
) -> None:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, max_forwards_per_client=1)
    )
    port = await _serve(nursery, ServerCollector(server))
    samples = _samples((await _get(port))[1])
    assert _value(samples, "pytunnel_server_sessions") == 0
    assert _value(samples, "pytunnel_server_auth_failures_total") == 0
    assert _value(samples, "pytunnel_server_limits_hit_total", limit="forwards") == 0

    with pytest.raises(pytunnel.AuthenticationError):
        async with pytunnel.open_tunnel(server.address, token="wrong", reconnect=False):
            pass  # pragma: no cover
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as tunnel:
        await tunnel.forward_remote("127.0.0.1", echo_port)
        with pytest.raises(pytunnel.ForwardLimitError):
            await tunnel.forward_remote("127.0.0.1", echo_port)
        samples = _samples((await _get(port))[1])
        assert _value(samples, "pytunnel_server_sessions") == 1
        assert _value(samples, "pytunnel_server_remote_forwards") == 1
        assert _value(samples, "pytunnel_server_auth_failures_total") == 1
        assert _value(samples, "pytunnel_server_throttled_addresses") == 0
        assert _value(samples, "pytunnel_server_limits_hit_total", limit="forwards") == 1
        assert _value(samples, "pytunnel_server_max_streams") == server.config.max_streams
        bind = pytunnel.format_target(*tunnel.forwards[0].address)
        assert _value(samples, "pytunnel_server_forward_online", bind=bind) == 1
        assert _value(samples, "pytunnel_server_forward_streams_total", bind=bind) == 0
        assert _value(samples, "pytunnel_server_streams_total") == 0
        assert await echo_once(tunnel.forwards[0].address, b"y" * 777) == b"y" * 777
        await wait_until(lambda: server.clients[0].ports[0].connections == 0)
        samples = _samples((await _get(port))[1])
        out = _value(samples, "pytunnel_server_forward_bytes_total", bind=bind, direction="out")
        assert out == 777
        assert _value(samples, "pytunnel_server_forward_streams_total", bind=bind) == 1
        assert _value(samples, "pytunnel_server_streams_total") == 1
        await wait_until(lambda: server.active_streams == 0)
        samples = _samples((await _get(port))[1])
        assert _value(samples, "pytunnel_server_streams_open") == 0
        assert _value(samples, "pytunnel_server_streams_total") == 1  # a counter stays
    await wait_until(lambda: server.session_count == 0)
    assert _value(_samples((await _get(port))[1]), "pytunnel_server_sessions") == 0


async def test_other_paths_and_methods_are_refused(nursery: trio.Nursery) -> None:
    port = await _serve(nursery)
    assert (await _get(port, "/"))[0] == 404
    assert (await _get(port, "/metrics", "POST"))[0] == 405
    status, body = await _get(port, "/metrics", "HEAD")
    assert status == 200
    assert body == ""


# ------------------------------------------------------------------- through the CLI, with curl

PYTUNNEL = [sys.executable, "-m", "pytunnel"]


def _line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for _ in range(10):
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        assert line, "the process ended"
    raise AssertionError(f"no line starting with {prefix!r}")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_serve_and_connect_metrics_scraped_by_curl(tmp_path: Any) -> None:
    server = subprocess.Popen(
        [*PYTUNNEL, "serve", "--listen", "127.0.0.1:0", "--token", "t", "--metrics", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    client = None
    try:
        address = _line(server, "pytunnel server listening on ").rsplit(" ", 1)[1]
        server_metrics = _line(server, "metrics at ").split()[-1]
        args = ["connect", address, "--token", "t", "-L", "0:127.0.0.1:9"]
        client = subprocess.Popen(
            [*PYTUNNEL, *args, "--metrics", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        forward = _line(client, "local forward ")
        client_metrics = _line(client, "metrics at ").split()[-1]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", client_metrics)

        def scrape(url: str) -> dict[Any, float]:
            out = subprocess.run(
                ["curl", "-sSf", url], capture_output=True, text=True, timeout=20, check=True
            )
            return _samples(out.stdout)

        samples = scrape(client_metrics)
        bind = re.search(r"127\.0\.0\.1:\d+", forward)
        assert bind is not None
        assert (
            _value(samples, "pytunnel_forward_status", id="f1", bind=bind.group(), status="active")
            == 1
        )
        assert _value(scrape(server_metrics), "pytunnel_server_sessions") == 1
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=10)


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.timeout(120)
@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
def test_a_real_prometheus_scrapes_and_queries_a_counter(tmp_path: Any) -> None:
    echo = socket.create_server(("127.0.0.1", 0))
    metrics_port, prom_port = closed_port(), closed_port()
    server = subprocess.Popen(
        [*PYTUNNEL, "serve", "--listen", "127.0.0.1:0", "--token", "t"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    client = prometheus = None
    try:
        address = _line(server, "pytunnel server listening on ").rsplit(" ", 1)[1]
        target = f"127.0.0.1:{echo.getsockname()[1]}"
        args = ["-L", f"0:{target}", "--metrics", f"127.0.0.1:{metrics_port}", "--admin", "off"]
        client = subprocess.Popen(
            [*PYTUNNEL, "connect", address, "--token", "t", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        match = re.search(r"127\.0\.0\.1:(\d+)", _line(client, "local forward "))
        assert match
        with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=10) as conn:
            accepted, _ = echo.accept()
            conn.sendall(b"p" * 1234)
            got = b""
            while len(got) < 1234:
                got += accepted.recv(65536)
            accepted.close()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pytunnel\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        )
        assert PROMETHEUS is not None
        prometheus = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        query = urllib.parse.quote('pytunnel_forward_bytes_total{direction="out",id="f1"}')
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?query={query}"
        deadline = time.monotonic() + 60
        result: list[Any] = []
        while not result:
            assert time.monotonic() < deadline, "prometheus never had the sample"
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    result = json.load(answer)["data"]["result"]
            except OSError:
                continue
        assert result[0]["metric"]["job"] == "pytunnel"
        assert result[0]["metric"]["kind"] == "local"
        assert float(result[0]["value"][1]) == 1234
    finally:
        for proc in (prometheus, client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        echo.close()


async def test_server_metrics_count_name_routes_under_their_url(nursery: trio.Nursery) -> None:
    """A name route is a forward at the server too: its connections and bytes are counted
    with ``bind="http://<name>"`` (the HTTPS route of the same name would be ``https://``)."""
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(
            pytunnel.serve, 0, token=TOKEN, http_listen=("127.0.0.1", 0), domain="tunnel.test"
        )
    )
    port = await _serve(nursery, ServerCollector(server))
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    async def app(stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head and (chunk := await stream.receive_some()):
                head += chunk
            await stream.send_all(answer)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, app, 0, host="127.0.0.1"))
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as tunnel:
        await tunnel.forward_name("app", "127.0.0.1", listeners[0].socket.getsockname()[1])
        bind = "http://app.tunnel.test"
        samples = _samples((await _get(port))[1])
        assert _value(samples, "pytunnel_server_forward_online", bind=bind) == 1
        assert _value(samples, "pytunnel_server_forward_streams_total", bind=bind) == 0
        assert server.http_address is not None
        request = b"GET / HTTP/1.1\r\nHost: app.tunnel.test\r\n\r\n"
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(*server.http_address)
            async with stream:
                await stream.send_all(request)
                got = b""
                while chunk := await stream.receive_some():
                    got += chunk
        assert got == answer
        await wait_until(lambda: server.clients[0].routes[0].connections == 0)
        samples = _samples((await _get(port))[1])
        assert _value(samples, "pytunnel_server_forward_streams_total", bind=bind) == 1
        sent = _value(samples, "pytunnel_server_forward_bytes_total", bind=bind, direction="out")
        assert sent == len(request)
        back = _value(samples, "pytunnel_server_forward_bytes_total", bind=bind, direction="in")
        assert back == len(answer)


# ------------------------------------------------- forwards that listen on the same port

GROUP_KEY = "group secret"


async def _twin_members(
    tunnel: pytunnel.Tunnel, target: int
) -> tuple[pytunnel.RemoteForward, pytunnel.RemoteForward]:
    """Two members of one load-balanced group from one tunnel: the same kind, bind and
    target, and no name, so only their ``id`` tells their series apart."""
    port = closed_port()
    twins = [
        await tunnel.forward_remote(
            "127.0.0.1", target, remote_port=port, group="web", group_key=GROUP_KEY
        )
        for _ in range(2)
    ]
    return twins[0], twins[1]


async def test_identical_forwards_have_series_of_their_own(
    nursery: trio.Nursery,
    tunnel: pytunnel.Tunnel,
    tunnel_server: pytunnel.TunnelServer,
    echo_port: int,
) -> None:
    first, second = await _twin_members(tunnel, echo_port)
    port = await _serve(nursery, TunnelCollector(tunnel), ServerCollector(tunnel_server))
    bind = pytunnel.format_target(*first.address)
    assert pytunnel.format_target(*second.address) == bind
    payload = b"z" * 321
    for _ in range(4):  # the group spreads them over its two members
        assert await echo_once(first.address, payload) == payload
    await wait_until(lambda: first.stats.active_connections + second.stats.active_connections == 0)

    samples = _samples((await _get(port))[1])
    ids = {
        dict(labels)["id"]
        for name, labels in samples
        if name == "pytunnel_forward_streams_total" and dict(labels)["bind"] == bind
    }
    assert ids == {"f1", "f2"}
    counted = sorted(_value(samples, "pytunnel_forward_streams_total", id=i) for i in ids)
    assert counted == sorted(f.stats.total_connections for f in (first, second))
    for ident in ids:
        assert _value(samples, "pytunnel_forward_status", id=ident, status="active") == 1
    total = sum(
        _value(samples, "pytunnel_forward_bytes_total", id=ident, direction="out")
        for ident in ("f1", "f2")
    )
    assert total == 4 * len(payload)

    # the server's series of the two memberships differ by id too
    server_ids = {
        dict(labels)["id"]
        for name, labels in samples
        if name == "pytunnel_server_forward_online" and dict(labels)["bind"] == bind
    }
    assert len(server_ids) == 2
    served = sum(
        _value(samples, "pytunnel_server_forward_streams_total", bind=bind, id=ident)
        for ident in server_ids
    )
    assert served == 4

    # an id stays with its forward: closing one twin leaves the other's as it was, and a
    # new forward takes a new id rather than the freed one
    await first.aclose()
    samples = _samples((await _get(port))[1])
    left = {dict(k[1])["id"] for k in samples if k[0] == "pytunnel_forward_streams_total"}
    assert len(left) == 1
    assert left < ids
    third = await tunnel.forward_local("127.0.0.1", echo_port)
    samples = _samples((await _get(port))[1])
    assert _value(samples, "pytunnel_forward_status", id="f3", status="active") == 1
    assert _value(samples, "pytunnel_forward_status", id=left.pop(), status="active") == 1
    await third.aclose()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
async def test_a_real_prometheus_scrapes_identical_forwards(
    nursery: trio.Nursery,
    tunnel: pytunnel.Tunnel,
    tunnel_server: pytunnel.TunnelServer,
    echo_port: int,
    tmp_path: Any,
) -> None:
    """Of two samples with the same labels Prometheus keeps one and drops the other as a
    duplicate: each twin must reach it as a series of its own."""
    await _twin_members(tunnel, echo_port)
    port = await _serve(nursery, TunnelCollector(tunnel), ServerCollector(tunnel_server))
    prom_port = closed_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: twins\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
    )
    assert PROMETHEUS is not None
    command = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
    ]
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def target() -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{prom_port}/api/v1/targets"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                active = json.load(answer)["data"]["activeTargets"]
        except OSError:
            return None
        return active[0] if active and active[0]["health"] != "unknown" else None

    try:
        found = None
        with trio.fail_after(90):
            while found is None:
                await trio.sleep(0.5)
                found = await trio.to_thread.run_sync(target)
        assert (found["health"], found["lastError"]) == ("up", "")
        query = urllib.parse.quote('count(pytunnel_forward_status{status="active"} == 1)')
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?query={query}"

        def ask() -> list[Any]:
            with urllib.request.urlopen(url, timeout=5) as answer:
                result: list[Any] = json.load(answer)["data"]["result"]
                return result

        result = await trio.to_thread.run_sync(ask)
        assert result
        assert float(result[0]["value"][1]) == 2
    finally:
        process.kill()
        await process.wait()


async def test_server_metrics_count_udp_remote_forwards_and_their_drops(
    nursery: trio.Nursery, echo_port: int
) -> None:
    """A client's UDP remote forward is a forward at the server too (``bind`` ends in
    ``/udp``): its associations, bytes and the datagrams the server dropped at its port,
    here one that came while TCP streams held the server's whole stream budget."""
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, max_streams=3)
    )
    port = await _serve(nursery, ServerCollector(server))
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    udp = await tunnel.forward_remote("127.0.0.1", await nursery.start(udp_echo), protocol="udp")
    bind = f"{pytunnel.format_target(*udp.address)}/udp"
    samples = _samples((await _get(port))[1])
    assert _value(samples, "pytunnel_server_forward_online", bind=bind) == 1
    assert _value(samples, "pytunnel_server_forward_udp_dropped_total", bind=bind) == 0
    assert _value(samples, "pytunnel_server_forward_streams_total", bind=bind) == 0

    tcp = [await tunnel.open_stream("127.0.0.1", echo_port) for _ in range(3)]
    await wait_until(lambda: server.active_streams == 3)
    refused = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    sender = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with refused, sender:
        await refused.sendto(b"no room", udp.address)
        await wait_until(lambda: server.clients[0].udp_ports[0].datagrams_dropped == 1)
        samples = _samples((await _get(port))[1])
        assert _value(samples, "pytunnel_server_forward_udp_dropped_total", bind=bind) == 1
        assert _value(samples, "pytunnel_server_forward_streams_total", bind=bind) == 0

        for stream in tcp:
            await stream.aclose()
        await wait_until(lambda: server.active_streams == 0)
        answer = b""
        with trio.fail_after(15):
            while not answer:  # a datagram may be lost: sent again until one comes back
                await sender.sendto(b"room", udp.address)
                with trio.move_on_after(0.5):
                    answer, _ = await sender.recvfrom(100)
        assert answer == b"room"
        samples = _samples((await _get(port))[1])
        assert _value(samples, "pytunnel_server_forward_streams_open", bind=bind) == 1
        assert _value(samples, "pytunnel_server_forward_streams_total", bind=bind) == 1
        relayed = _value(samples, "pytunnel_server_forward_bytes_total", bind=bind, direction="in")
        assert relayed > 0
        assert relayed % len(b"room") == 0
        assert _value(samples, "pytunnel_server_forward_udp_dropped_total", bind=bind) == 1
    await udp.aclose()
    await wait_until(lambda: server.clients[0].udp_ports == [])
    samples = _samples((await _get(port))[1])
    assert not [k for k in samples if dict(k[1]).get("bind") == bind]


async def test_client_metrics_count_refusals_udp_drops_and_reconnects(
    nursery: trio.Nursery, echo_port: int
) -> None:
    """What traffic alone does not show: a target the server's policy forbids is a dial
    error ``FORBIDDEN`` (TCP and UDP, not ``REFUSED``) and, for UDP, the datagrams that
    waited for it are dropped; a reconnection after the server came back is counted."""
    port = closed_port()
    allowed = [f"127.0.0.1:{echo_port}"]
    fast = {"backoff_initial": 0.02, "backoff_max": 0.1, "backoff_jitter": 0.0}
    async with trio.open_nursery() as first:
        await first.start(functools.partial(pytunnel.serve, port, token=TOKEN, permit_open=allowed))
        tunnel = await pytunnel.connect_tunnel(nursery, ("127.0.0.1", port), token=TOKEN, **fast)
        metrics = await _serve(nursery, TunnelCollector(tunnel))
        tcp = await tunnel.forward_local("127.0.0.1", closed_port())
        udp = await tunnel.forward_local("127.0.0.1", closed_port(), protocol="udp")
        samples = _samples((await _get(metrics))[1])
        assert _value(samples, "pytunnel_client_reconnects_total") == 0
        udp_bind = pytunnel.format_target(*udp.address)
        assert _value(samples, "pytunnel_forward_udp_dropped_total", bind=udp_bind) == 0

        refused = await trio.open_tcp_stream(*tcp.address)
        await wait_until(lambda: tcp.stats.errors.get("FORBIDDEN", 0) == 1)
        await refused.aclose()
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sender:
            await sender.sendto(b"forbidden", udp.address)
            await wait_until(lambda: udp.stats.datagrams_dropped == 1)
        samples = _samples((await _get(metrics))[1])
        tcp_bind = pytunnel.format_target(*tcp.address)
        errors = "pytunnel_forward_dial_errors_total"
        assert _value(samples, errors, bind=tcp_bind, category="FORBIDDEN") == 1
        assert _value(samples, errors, bind=tcp_bind, category="REFUSED") == 0
        assert _value(samples, errors, bind=tcp_bind, category="NODE_UNSTABLE") == 0
        assert _value(samples, errors, bind=udp_bind, category="FORBIDDEN") == 1
        assert _value(samples, "pytunnel_forward_udp_dropped_total", bind=udp_bind) == 1
        first.cancel_scope.cancel()

    await wait_until(lambda: not tunnel.connected)
    await nursery.start(functools.partial(pytunnel.serve, port, token=TOKEN))
    await wait_until(lambda: tunnel.connected, 30)
    samples = _samples((await _get(metrics))[1])
    assert _value(samples, "pytunnel_client_reconnects_total") == 1
    assert _value(samples, "pytunnel_client_connected") == 1


async def test_server_metrics_count_throttled_addresses(nursery: trio.Nursery) -> None:
    """An address past its budget of failed authentications is a throttled address."""
    from pytunnel._handshake import client_handshake

    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(
            pytunnel.serve, 0, token=TOKEN, auth_failure_burst=1, auth_failure_interval=600
        )
    )
    port = await _serve(nursery, ServerCollector(server))
    for _ in range(2):
        stream = await trio.open_tcp_stream(*server.address, local_address="127.0.0.2")
        with pytest.raises(pytunnel.ConnectError):
            await client_handshake(stream, "wrong", max_frame_size=2**20)
        await stream.aclose()
    samples = _samples((await _get(port))[1])
    assert _value(samples, "pytunnel_server_throttled_addresses") == 1
    assert _value(samples, "pytunnel_server_auth_failures_total") >= 1


async def test_docs_name_every_metric(nursery: trio.Nursery, echo_port: int) -> None:
    """docs/monitoring.md has a row for every series a client and a server export (forwards
    of every kind included), and names no metric that does not exist (the cluster's
    ``pytunnel_server_node_*`` ones exist on nodes only)."""
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "monitoring.md").read_text()
    documented = set(re.findall(r"^\| `(pytunnel_[a-z_]+)` \|", doc, re.MULTILINE))
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN)
    )
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, heartbeat_interval=0.2
    )
    udp_target = await nursery.start(udp_echo)
    await tunnel.forward_local("127.0.0.1", echo_port)
    await tunnel.forward_local("127.0.0.1", udp_target, protocol="udp")
    await tunnel.forward_remote("127.0.0.1", echo_port)
    await tunnel.forward_remote("127.0.0.1", udp_target, protocol="udp")
    await tunnel.forward_dynamic()
    await wait_until(lambda: tunnel.rtt is not None and server.clients[0].rtt is not None, 30)
    exported = set()
    for collector in (TunnelCollector(tunnel), ServerCollector(server)):
        port = await _serve(nursery, collector)
        exported |= {name for name, _ in _samples((await _get(port))[1])}
    assert len(exported) >= 20
    assert sorted(exported - documented) == []
    unexported = {n for n in documented - exported if not n.startswith("pytunnel_server_node_")}
    assert sorted(unexported) == []

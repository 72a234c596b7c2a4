"""Three ``pytunnel serve --cluster`` node processes behind a real HAProxy (TCP mode), on a
real etcd: the client reaches a node through the balancer, public connections through the
balancer land on any node and all reach the client; the client's node is killed (SIGKILL)
and the service comes back on the others.

Node ``i`` listens (control and public) on its own loopback address 127.0.0.``i``; HAProxy
listens on 127.0.0.4 and spreads connections round robin, retrying another node when one
refuses (``option redispatch``), as a balancer in front of a cluster is set up.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from helpers import (
    EtcdServer,
    cluster_holders,
    cluster_status,
    needs_etcd,
    send_and_read_all,
    start_link_proxy,
    tagged_service,
    until_listening,
)
from test_cluster_cli import PYTUNNEL, TOKEN, Exited, Process

pytestmark = [
    needs_etcd,
    pytest.mark.skipif(
        shutil.which("haproxy") is None and not os.path.exists("/usr/sbin/haproxy"),
        reason="haproxy is not installed (.ci/run installs it)",
    ),
    pytest.mark.slow,
]

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
BALANCER = "127.0.0.4"


def _haproxy() -> str:
    return shutil.which("haproxy") or "/usr/sbin/haproxy"


def _port_free_everywhere() -> int:
    """A TCP port free on the three nodes' addresses and the balancer's."""
    while True:
        with socket.socket() as probe:
            probe.bind((HOSTS[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in (*HOSTS, BALANCER):
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port


def _backend(name: str, port: int) -> str:
    """A frontend on the balancer's ``port`` and its backend: that port on every node."""
    servers = "\n".join(f"    server n{i} {host}:{port}" for i, host in enumerate(HOSTS, start=1))
    return f"""
frontend {name}
    bind {BALANCER}:{port}
    default_backend {name}
backend {name}
    balance roundrobin
{servers}
"""


def _config(
    control: list[str],
    control_port: int,
    public_port: int,
    http_port: int,
    more_ports: tuple[int, ...] = (),
) -> str:
    servers = "\n".join(f"    server n{i} {address}" for i, address in enumerate(control, start=1))
    public = "\n".join(
        f"    server n{i} {host}:{public_port}" for i, host in enumerate(HOSTS, start=1)
    )
    http = "\n".join(f"    server n{i} {host}:{http_port}" for i, host in enumerate(HOSTS, start=1))
    more = "".join(_backend(f"public_{port}", port) for port in more_ports)
    return f"""
global
    maxconn 256
defaults
    mode tcp
    timeout connect 1s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch 1
frontend control
    bind {BALANCER}:{control_port}
    default_backend nodes
backend nodes
    balance roundrobin
{servers}
frontend public
    bind {BALANCER}:{public_port}
    default_backend public
backend public
    balance roundrobin
{public}
frontend http
    bind {BALANCER}:{http_port}
    default_backend http
backend http
    balance roundrobin
{http}
{more}"""


async def _node(
    etcd: EtcdServer, index: int, secret_file: Path, http_port: int
) -> tuple[Process, str]:
    host = HOSTS[index - 1]
    node = await Process.start(
        "serve",
        "--listen",
        f"{host}:0",
        "--public-host",
        host,
        "--http-listen",
        f"{host}:{http_port}",
        "--domain",
        "tunnel.test",
        "--cluster",
        etcd.url,
        "--node-id",
        f"n{index}",
        "--cluster-secret-file",
        str(secret_file),
        "--cluster-lease-ttl",
        "3",
    )
    listening = await node.line_with("listening on")
    await node.line_with(f"node n{index} of the cluster at {etcd.url}")
    return node, listening.rsplit(" ", 1)[1]


@attrs.frozen
class _Cluster:
    """Three nodes (name -> process and control address) behind a running HAProxy, which
    balances the control port, a public port, the shared HTTP port and a spare port (for a
    forward a test registers later) over them."""

    nodes: dict[str, tuple[Process, str]]
    control_port: int
    public_port: int
    http_port: int
    spare_port: int


@pytest.fixture
async def cluster(etcd: EtcdServer, tmp_path: Path) -> AsyncIterator[_Cluster]:
    """The nodes and the balancer, killed (SIGKILL) after the test, clients first: a test
    kills its own clients in its own ``finally``."""
    secret_file = tmp_path / "cluster-secret"
    secret_file.write_text("a secret only the nodes know\n")
    nodes: dict[str, tuple[Process, str]] = {}
    balancer: trio.Process | None = None
    try:
        http_port = _port_free_everywhere()
        for index in (1, 2, 3):
            nodes[f"n{index}"] = await _node(etcd, index, secret_file, http_port)
        control_port, public_port = _port_free_everywhere(), _port_free_everywhere()
        spare_port = _port_free_everywhere()
        config = tmp_path / "haproxy.cfg"
        control = [a for _, a in nodes.values()]
        config.write_text(_config(control, control_port, public_port, http_port, (spare_port,)))
        balancer = await trio.lowlevel.open_process(
            [_haproxy(), "-db", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in (control_port, public_port, http_port, spare_port):
            await until_listening(balancer, BALANCER, port)
        yield _Cluster(nodes, control_port, public_port, http_port, spare_port)
    finally:
        if balancer is not None and balancer.poll() is None:
            os.kill(balancer.pid, 9)
            with trio.CancelScope(shield=True):
                await balancer.wait()
        for process, _ in nodes.values():
            await process.kill()


async def _exchange(host: str, port: int, payload: bytes) -> bytes:
    return await send_and_read_all((host, port), payload)


async def _until_served(host: str, port: int, payload: bytes, seconds: float = 60) -> None:
    """Until a connection to ``host:port`` gets its bytes back (refused or reset meanwhile:
    nothing listens there yet, or the owner is not known yet)."""
    with trio.fail_after(seconds):
        while True:
            try:
                if await _exchange(host, port, payload) == payload:
                    return
            except (OSError, trio.BrokenResourceError):
                pass
            await trio.sleep(0.1)


def _forward_host(line: str, port: int) -> str | None:
    """The node's public host if ``line`` is the client's line for its remote forward of
    ``port``, on whichever node the balancer picked; else None."""
    return next((h for h in HOSTS if f"remote forward {h}:{port} " in line), None)


async def _forward_up(client: Process, port: int) -> str:
    """Until ``client`` says its remote forward of ``port`` is up; the node's host in it."""
    while True:
        host = _forward_host(await client.line_with("remote forward "), port)
        if host is not None:
            return host


async def _owner(etcd: EtcdServer, key: str) -> str:
    owners = await cluster_holders(etcd, key)
    assert len(owners) == 1, owners
    return owners[0]


async def _until_eof(stream: trio.SocketStream) -> None:
    while await stream.receive_some():
        pass


async def test_three_nodes_behind_haproxy_serve_every_connection_and_survive_a_kill(
    cluster: _Cluster, etcd: EtcdServer, echo_port: int
) -> None:
    nodes, control_port, public_port = cluster.nodes, cluster.control_port, cluster.public_port
    http_port = cluster.http_port
    client: Process | None = None
    try:
        client = await Process.start(
            "connect",
            f"{BALANCER}:{control_port}",
            "--backoff-max",
            "1",
            "-R",
            f"{public_port}:127.0.0.1:{echo_port}",
            "-R",
            f"app:80:127.0.0.1:{echo_port}",
        )
        forwarded: str | None = None
        routed = False
        with trio.fail_after(60):  # a hang detector; the two lines come in either order
            while forwarded is None or not routed:
                line = await client.line_with("")
                forwarded = forwarded or _forward_host(line, public_port)
                routed = routed or "name route http://app.tunnel.test" in line
        owner = await _owner(etcd, f"tcp/{public_port}")
        assert HOSTS[int(owner[1:]) - 1] == forwarded, (owner, forwarded)
        assert await _owner(etcd, "http/app.tunnel.test") == owner

        # every node serves the port (two of them relay it to the owner) ...
        for host in HOSTS:
            await _until_served(host, public_port, f"direct to {host}".encode())
        # ... so every connection through the balancer reaches the client, whichever node
        # it lands on (round robin: each node twice)
        for i in range(6):
            payload = f"through haproxy {i} ".encode() * 1000
            assert await _exchange(BALANCER, public_port, payload) == payload
        # and the name on the shared HTTP port: each node's listener routes it (two of them
        # by replaying the request head to the owner); the echo target sends the head back
        for host in (*HOSTS, BALANCER, BALANCER, BALANCER):
            head = f"GET /{host} HTTP/1.1\r\nHost: app.tunnel.test\r\n\r\n".encode()
            assert await _exchange(host, http_port, head) == head

        # a connection relayed by another node to the owner is live when the owner dies
        other = next(h for n, h in zip(nodes, HOSTS, strict=True) if n != owner)
        live = await trio.open_tcp_stream(other, public_port)
        await live.send_all(b"live")
        with trio.fail_after(10):
            got = b""
            while len(got) < 4:
                got += await live.receive_some()
        killed_at = trio.current_time()
        await nodes[owner][0].kill()
        with trio.fail_after(20), pytest.raises(trio.BrokenResourceError):
            await _until_eof(live)  # reset, never a clean end
        await live.aclose()

        # the client reconnects through the balancer to another node and restores its port
        # once the dead node's lease has expired; new connections work through it again
        await _until_served(BALANCER, public_port, b"after the kill")
        failover = trio.current_time() - killed_at
        new_owner = await _owner(etcd, f"tcp/{public_port}")
        assert new_owner != owner
        head = b"GET /after HTTP/1.1\r\nHost: app.tunnel.test\r\n\r\n"
        await _until_served(BALANCER, http_port, head)
        for name, host in zip(nodes, HOSTS, strict=True):
            if name != owner:
                await _until_served(host, public_port, f"survivor {name}".encode())
        for i in range(4):
            payload = f"again {i}".encode()
            assert await _exchange(BALANCER, public_port, payload) == payload
        print(f"failover through haproxy: served again {failover:.1f} s after the kill -9")
    finally:
        if client is not None:
            await client.kill()


async def _round(stream: trio.SocketStream, payload: bytes) -> None:
    """``payload`` over a held connection, and exactly it back (the echo target)."""
    with trio.fail_after(20):  # a hang detector
        await stream.send_all(payload)
        got = b""
        while len(got) < len(payload):
            chunk = await stream.receive_some()
            assert chunk, "the relayed connection ended"
            got += chunk
    assert got == payload


async def _connect_refused(control: str, port: int, echo_port: int) -> str:
    """A ``pytunnel connect`` through the balancer asking for ``port``: refused, its stderr."""
    with trio.fail_after(60):
        result = await trio.run_process(
            [*PYTUNNEL, "connect", control, "-R", f"{port}:127.0.0.1:{echo_port}"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "PYTUNNEL_TOKEN": TOKEN},
        )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr
    return stderr


async def test_the_engine_killed_and_restarted_under_traffic_through_haproxy(
    cluster: _Cluster, etcd: EtcdServer, echo_port: int
) -> None:
    """etcd is killed (SIGKILL) while connections through the balancer are relayed between
    nodes: they keep carrying bytes for longer than the nodes' leases, a new forward is
    refused with ``CLUSTER_UNAVAILABLE`` on whichever node the balancer picks, and once
    etcd is back everything recovers by itself: a new forward registers and its port is
    served through every node."""
    control_port, public_port = cluster.control_port, cluster.public_port
    late_port = cluster.spare_port
    clients: list[Process] = []
    live: list[trio.SocketStream] = []
    try:
        through = f"{BALANCER}:{control_port}"
        first = await Process.start(
            "connect", through, "--backoff-max", "1", "-R", f"{public_port}:127.0.0.1:{echo_port}"
        )
        clients.append(first)
        host = await _forward_up(first, public_port)
        owner = await _owner(etcd, f"tcp/{public_port}")
        assert HOSTS[int(owner[1:]) - 1] == host, (owner, host)
        for host in HOSTS:  # every node knows the owner (mirrors the port) before the outage
            await _until_served(host, public_port, f"before, via {host}".encode())
        # six held connections through the balancer: two land on each node, so four of them
        # are relayed over node links to the owner
        for i in range(6):
            stream = await trio.open_tcp_stream(BALANCER, public_port)
            live.append(stream)
            await _round(stream, f"hello {i} ".encode() * 100)

        await etcd.kill()
        stderr = await _connect_refused(through, late_port, echo_port)
        assert "[CLUSTER_UNAVAILABLE]" in stderr
        # traffic for longer than a lease (3 s): the nodes' leases are past renewing, the
        # relays do not care
        outage = trio.current_time()
        rounds = 0
        while trio.current_time() - outage < 6 or rounds < 4:
            for i, stream in enumerate(live):
                await _round(stream, f"during {rounds} on {i} ".encode() * 500)
            rounds += 1
            await trio.sleep(0.25)
        # a node that can no longer tell whether its lease lives refuses on its own
        stderr = await _connect_refused(through, late_port, echo_port)
        assert "[CLUSTER_UNAVAILABLE]" in stderr
        # new public connections to the port held before the outage still work: every node
        # keeps the table it had
        for i in range(3):
            payload = f"new during the outage {i}".encode()
            assert await _exchange(BALANCER, public_port, payload) == payload

        await etcd.start()  # the same data: its keys and leases come back with it
        restarted = trio.current_time()
        # nobody restarts anything: a new forward through the balancer registers (retried
        # while a node has not renewed yet) ...
        with trio.fail_after(90):
            while True:
                late = await Process.start(
                    "connect", through, "-R", f"{late_port}:127.0.0.1:{echo_port}"
                )
                clients.append(late)
                try:
                    await _forward_up(late, late_port)
                    break
                except Exited:  # refused, the node not back yet
                    await late.kill()
                    await trio.sleep(0.5)
        registered = trio.current_time() - restarted
        # ... and both ports are served through every node and the balancer
        for host in (*HOSTS, BALANCER):
            await _until_served(host, late_port, f"late, via {host}".encode())
            await _until_served(host, public_port, f"first, via {host}".encode())
        print(
            f"engine outage {restarted - outage:.1f} s: {rounds} rounds on 6 held connections; "
            f"a new forward registered {registered:.1f} s after the restart, served through "
            f"every node {trio.current_time() - restarted:.1f} s after it"
        )
        assert await _owner(etcd, f"tcp/{public_port}") == owner  # nothing moved
        # the connections held since before the outage never stopped
        for i, stream in enumerate(live):
            await _round(stream, f"after on {i} ".encode() * 500)
            await stream.send_eof()
            with trio.fail_after(20):
                assert await stream.receive_some() == b""  # a clean end, echoed through
    finally:
        for stream in live:
            await stream.aclose()
        for client in clients:
            await client.kill()


def _member_nodes(status: dict[str, Any], key: str) -> list[str]:
    """The nodes holding a member key of the group holding ``key``, one entry per member."""
    prefix = f"groups/{key}/"
    return sorted(
        name
        for name, node in status["nodes"].items()
        for held in node["holds"]
        if held.startswith(prefix)
    )


async def _answer(host: str, port: int) -> bytes | None:
    """The tag of the member that served one connection; ``None`` if it was reset."""
    try:
        return await _exchange(host, port, b"who?")
    except (OSError, trio.BrokenResourceError):
        return None


async def test_a_group_across_nodes_behind_haproxy_survives_a_members_node_killed(
    cluster: _Cluster, nursery: trio.Nursery, etcd: EtcdServer, tmp_path: Path
) -> None:
    """Two ``pytunnel connect --group`` clients through the balancer, on two different
    nodes, in one group on one port: connections through HAProxy (landing on any of the
    three nodes) reach both members. One member's node is killed (SIGKILL, by pid): the
    other member serves every connection from then on (a node that finds the dead node's
    link gone hands the connection to a member it can reach; only one relayed at the
    moment of the kill may be cut); once the dead node's lease has expired, none is."""
    key_file = tmp_path / "group-key"
    key_file.write_text("the group's own secret\n")
    nodes, control_port, public_port = cluster.nodes, cluster.control_port, cluster.public_port
    clients: dict[bytes, Process] = {}
    try:
        key = f"tcp/{public_port}"
        on_node: dict[bytes, str] = {}
        for tag, reconnect in ((b"X", "--no-reconnect"), (b"Y", "--reconnect")):
            client = clients[tag] = await Process.start(
                "connect",
                f"{BALANCER}:{control_port}",
                reconnect,
                "--backoff-max",
                "1",
                "--group",
                "web",
                "--group-key-file",
                str(key_file),
                "-R",
                f"{public_port}:127.0.0.1:{await tagged_service(nursery, tag)}",
            )
            line = await client.line_with("remote forward 127.0.0.")  # its node's address
            assert f":{public_port} " in line, line
            members = _member_nodes(await cluster_status(etcd), key)
            # round robin: the two clients' control connections went to two nodes
            new = set(members) - set(on_node.values())
            assert len(new) == 1, members
            on_node[tag] = new.pop()

        # every node serves the port: its own member directly, the other one's relayed
        with trio.fail_after(60):
            for host in HOSTS:
                seen: set[bytes | None] = set()
                while not {b"X", b"Y"} <= seen:
                    seen.add(await _answer(host, public_port))
        through = Counter([await _answer(BALANCER, public_port) for _ in range(12)])
        assert set(through) == {b"X", b"Y"}, through  # both members, none reset

        # X's node dies without a word; X's client (no reconnect) ends with it
        killed_at = trio.current_time()
        await nodes[on_node[b"X"]][0].kill()
        after: Counter[bytes | None] = Counter()
        with trio.fail_after(60):
            while on_node[b"X"] in _member_nodes(await cluster_status(etcd), key):
                for _ in range(10):  # between looks at the registry (a process each)
                    after[await _answer(BALANCER, public_port)] += 1
        expired = trio.current_time() - killed_at
        # never X's: the survivors leave X's node out from their first failed link to it,
        # and the connection that found it gone goes to Y's member instead of a reset; one
        # relayed to X's node at the moment of the kill may be cut (through HAProxy, a
        # reset may reach the client as an empty answer)
        assert set(after) <= {b"Y", b"", None}, after
        assert after[b""] + after[None] <= 1, after
        # its lease expired: every connection through the balancer, and to each surviving
        # node directly, is served by Y's member, none reset
        through = Counter([await _answer(BALANCER, public_port) for _ in range(9)])
        assert through == {b"Y": 9}, through
        for name, host in zip(nodes, HOSTS, strict=True):
            if name != on_node[b"X"]:
                assert Counter([await _answer(host, public_port) for _ in range(3)]) == {b"Y": 3}
        print(
            f"group member's node killed: {after[b'Y']} connections served by the other "
            f"member and {after[None] + after[b'']} cut until its lease expired {expired:.1f} s "
            "later"
        )
    finally:
        for client in clients.values():
            await client.kill()


@attrs.define
class _Racer:
    """A ``pytunnel connect -R`` whose outcome is awaited: its forward up (the line naming
    it) or its exit (status and stderr)."""

    process: trio.Process
    line: str = ""
    returncode: int | None = None
    stderr: str = ""

    @classmethod
    async def start(cls, *args: str) -> _Racer:
        process = await trio.lowlevel.open_process(
            [*PYTUNNEL, "connect", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTUNNEL_TOKEN": TOKEN},
        )
        return cls(process)

    async def outcome(self, port: int) -> None:
        """Until the forward of ``port`` is up, or the process has ended."""
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        pending = b""
        with trio.fail_after(60):  # a hang detector
            while True:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    break
                pending += chunk
                for line in pending.decode(errors="replace").splitlines():
                    if "remote forward 127.0.0." in line and f":{port} " in line:
                        self.line = line
                        return
            errors = b""
            while chunk := await self.process.stderr.receive_some():
                errors += chunk
            self.returncode = await self.process.wait()
            self.stderr = errors.decode(errors="replace")

    async def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, 9)
        with trio.CancelScope(shield=True):
            await self.process.wait()


async def test_two_clients_through_haproxy_racing_for_a_port_one_wins_one_is_refused(
    cluster: _Cluster, etcd: EtcdServer, echo_port: int
) -> None:
    """Two ``pytunnel connect -R PORT`` started together through the balancer, which hands
    their control connections to two different nodes (round robin: nothing else connects
    to the control port): exactly one forward comes up, the other client ends with one line,
    ``ADDRESS_IN_USE`` naming the winner's node, and nothing of it is left in the engine;
    the winner's port is served through every node and the balancer. Three rounds, so each
    pair of nodes races once; the port is given back when the winner ends."""
    control, port = f"{BALANCER}:{cluster.control_port}", cluster.spare_port
    key = f"tcp/{port}"
    racers: list[_Racer] = []
    try:
        for round_ in range(3):
            pair = [
                await _Racer.start(control, "-R", f"{port}:127.0.0.1:{echo_port}") for _ in range(2)
            ]
            racers.extend(pair)
            async with trio.open_nursery() as waiting:
                for racer in pair:
                    waiting.start_soon(racer.outcome, port)
            winners = [racer for racer in pair if racer.line]
            losers = [racer for racer in pair if not racer.line]
            outcomes = [(racer.line, racer.stderr) for racer in pair]
            assert len(winners) == 1, outcomes
            assert len(losers) == 1, outcomes
            owner = await _owner(etcd, key)
            assert f"remote forward {HOSTS[int(owner[1:]) - 1]}:{port} " in winners[0].line
            loser = losers[0]
            assert loser.returncode == 1, loser.stderr
            assert (
                f"[ADDRESS_IN_USE] port {port} is held by another client of the cluster "
                f"(node {owner})" in loser.stderr
            ), (round_, loser.stderr)
            assert "Traceback" not in loser.stderr
            assert await cluster_holders(etcd, key) == [owner]  # the loser left no claim
            for host in (*HOSTS, BALANCER):
                await _until_served(host, port, f"round {round_} via {host}".encode())

            await winners[0].kill()  # its session ends: the node gives the port back
            with trio.fail_after(30):  # a hang detector
                while await cluster_holders(etcd, key):
                    await trio.sleep(0.2)
    finally:
        for racer in racers:
            await racer.kill()


async def test_a_client_reconnecting_through_haproxy_to_another_node_replaces_its_ghost(
    cluster: _Cluster, nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """A ``pytunnel connect`` through a relay to the balancer (node A behind it) has its
    side of the connection reset while A's side stays open and quiet (A sees a healthy
    client); it reconnects through the balancer itself, which hands it to node B. B's
    registration of the client's identity reaches A through the engine: A drops the ghost
    and gives back its port, B restores it, and it is served through every node again, all
    long before A's heartbeat timeout (30 s) would have ended the ghost."""
    control = f"{BALANCER}:{cluster.control_port}"
    port = cluster.spare_port
    proxy, listening = await start_link_proxy(nursery, (BALANCER, cluster.control_port))
    client: Process | None = None
    try:
        client = await Process.start(
            "connect",
            f"127.0.0.1:{proxy.port}",
            control,
            "--client-id",
            "laptop",
            "--backoff-max",
            "1",
            "-R",
            f"{port}:127.0.0.1:{echo_port}",
        )
        await client.line_with("remote forward 127.0.0.")
        first = await _owner(etcd, f"tcp/{port}")
        assert await cluster_holders(etcd, "clients/laptop") == [first]
        await _until_served(BALANCER, port, b"before")

        proxy.reset_client_side()
        listening.cancel()  # the relay refuses from now on: the client goes to the balancer
        # a hang detector, and less than the nodes' heartbeat timeout: the ghost is dropped
        # because the engine told A, not because it fell silent
        with trio.fail_after(20):
            while (moved := await cluster_holders(etcd, "clients/laptop")) in ([first], []):
                await trio.sleep(0.2)
            assert len(moved) == 1, moved
            assert moved[0] != first, moved
            while await cluster_holders(etcd, f"tcp/{port}") != moved:
                await trio.sleep(0.2)
        assert proxy.ghosts  # A's end of the old connection was still open
        for host in (*HOSTS, BALANCER):
            await _until_served(host, port, f"after the move, via {host}".encode())
    finally:
        if client is not None:
            await client.kill()
        proxy.close()

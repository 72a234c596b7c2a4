"""``pytunnel serve --cluster``: real node processes on one real etcd, real clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

import pytest
import trio
from helpers import (
    EtcdServer,
    LinkProxy,
    closed_port,
    cluster_holders,
    cluster_status,
    needs_etcd,
    send_and_read_all,
)

PYTUNNEL = [sys.executable, "-m", "pytunnel"]
TOKEN = "cluster-cli-token"


async def _fails(*args: str, status: int = 1) -> str:
    """Run ``pytunnel ARGS`` (the client token in the environment), which must exit with
    ``status``; its stderr."""
    with trio.fail_after(30):
        result = await trio.run_process(
            [*PYTUNNEL, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "PYTUNNEL_TOKEN": TOKEN},
        )
    stderr = result.stderr.decode()
    assert result.returncode == status, stderr
    return stderr


class Exited(AssertionError):
    """The process ended before printing the line a test waited for."""


class Process:
    """A pytunnel process whose stdout lines are awaited with a deadline (a hang detector).

    Its stderr goes to an unnamed temporary file (a pipe nobody reads would fill up and block
    the process), so a process that exits early fails the test with its own last words.
    """

    def __init__(self, process: trio.Process, errors: IO[bytes]) -> None:
        self.process = process
        self._errors = errors
        self._pending = b""

    @classmethod
    async def start(cls, *args: str) -> Process:
        errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the process, in kill)
        process = await trio.lowlevel.open_process(
            [*PYTUNNEL, *args],
            stdout=subprocess.PIPE,
            stderr=errors,
            env={**os.environ, "PYTUNNEL_TOKEN": TOKEN},
        )
        return cls(process, errors)

    def stderr(self, tail: int = 4000) -> str:
        """The last ``tail`` characters the process has logged so far."""
        fd = self._errors.fileno()
        size = os.fstat(fd).st_size
        return os.pread(fd, tail, max(0, size - tail)).decode(errors="replace")

    async def line_with(self, text: str, seconds: float = 30) -> str:
        assert self.process.stdout is not None
        with trio.move_on_after(seconds):
            while True:
                while b"\n" in self._pending:
                    line, _, self._pending = self._pending.partition(b"\n")
                    if text in line.decode():
                        return line.decode()
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    status = await self.process.wait()
                    raise Exited(
                        f"the process exited ({status}) before saying {text!r}; its stderr "
                        f"ends with:\n{self.stderr()}"
                    )
                self._pending += chunk
        raise AssertionError(
            f"no line with {text!r} in {seconds} s; the process's stderr ends with:\n"
            f"{self.stderr()}"
        )

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
        with trio.CancelScope(shield=True):
            await self.process.wait()
        self._errors.close()


async def _node(etcd: EtcdServer, name: str, public_host: str, *extra: str) -> tuple[Process, str]:
    node = await Process.start(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--public-host",
        public_host,
        "--cluster",
        etcd.url,
        "--node-id",
        name,
        "--cluster-lease-ttl",
        "3",
        *extra,
    )
    listening = await node.line_with("listening on")
    await node.line_with(f"node {name} of the cluster at {etcd.url}")
    return node, listening.split("listening on ", 1)[1].split()[0]  # then " (TLS)", if so


def _free_port() -> int:
    with socket.socket() as one, socket.socket() as two:
        one.bind(("127.0.0.1", 0))
        port = int(one.getsockname()[1])
        two.bind(("127.0.0.2", port))
        return port


async def _echo(host: str, port: int, payload: bytes) -> bytes:
    return await send_and_read_all((host, port), payload)


@needs_etcd
async def test_two_nodes_one_port_and_the_port_follows_its_client_when_a_node_dies(
    etcd: EtcdServer, echo_port: int
) -> None:
    """Two ``pytunnel serve`` nodes on one etcd. A client on node A holds a port; a client on
    node B asking for it is refused with one line. Node A is killed (SIGKILL); its lease
    expires, the first client reconnects to B and gets its port back there."""
    port = _free_port()
    a, a_address = await _node(etcd, "a", "127.0.0.1")
    b, b_address = await _node(etcd, "b", "127.0.0.2")
    holder: Process | None = None
    try:
        holder = await Process.start(
            "connect", a_address, b_address, "-R", f"{port}:127.0.0.1:{echo_port}"
        )
        await holder.line_with(f"remote forward 127.0.0.1:{port}")
        assert await _echo("127.0.0.1", port, b"on a") == b"on a"

        stderr = await _fails("connect", b_address, "-R", f"{port}:127.0.0.1:{echo_port}")
        assert (
            f"[ADDRESS_IN_USE] port {port} is held by another client of the cluster (node a)"
            in stderr
        )
        assert "Traceback" not in stderr

        killed_at = trio.current_time()
        await a.kill()
        with trio.fail_after(60):  # a hang detector; the lease is 3 s
            while True:
                try:
                    if await _echo("127.0.0.2", port, b"on b") == b"on b":
                        break
                except (OSError, trio.BrokenResourceError):
                    pass  # nothing listens yet, or the forward is being restored
                await trio.sleep(0.1)
        failover = trio.current_time() - killed_at
        print(f"port back on node b {failover:.1f} s after node a was killed")
    finally:
        if holder is not None:
            await holder.kill()
        await a.kill()
        await b.kill()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cluster", "etcd://127.0.0.1:2379"], "--cluster needs --node-id NAME"),
        (["--node-id", "a"], "--node-id and --node-address are for a node of a --cluster"),
        (["--cluster", "redis://127.0.0.1:6379", "--node-id", "a"], "etcd://HOST:PORT"),
        (["--cluster", "etcd://127.0.0.1:2379", "--node-id", "a/b"], "[A-Za-z0-9._:-]"),
        (["--cluster", "etcd://127.0.0.1:2379", "--node-id", "edge 2"], "rule of client ids"),
        (["--cluster-secret-file", "/dev/null"], "--cluster-secret-file is for a node of a"),
        (
            [
                *("--cluster", "etcd://127.0.0.1:2379", "--node-id", "a"),
                *("--cluster-secret-file", "/dev/null"),
            ],
            "the cluster secret file is empty",
        ),
        (["--cluster-ca", "/dev/null"], "are for a --cluster"),
        (
            ["--cluster", "etcd://127.0.0.1:2379", "--node-id", "a", "--cluster-ca", "/dev/null"],
            "etcds://",
        ),
        (
            [
                *("--cluster", "etcds://127.0.0.1:2379", "--node-id", "a"),
                "--cluster-key",
                "/dev/null",
            ],
            "--cluster-key needs --cluster-cert",
        ),
        (
            ["--cluster", "etcd://127.0.0.1:2379", "--node-id", "a", "--cluster-user", "node"],
            "go together",
        ),
    ],
)
async def test_cluster_options_that_do_not_fit_are_one_usage_error(
    args: list[str], message: str
) -> None:
    with trio.fail_after(30):
        result = await trio.run_process(
            [*PYTUNNEL, "serve", "--listen", "127.0.0.1:0", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert message in stderr
    assert "Traceback" not in stderr


async def test_the_client_token_as_cluster_secret_is_a_usage_error(tmp_path: object) -> None:
    """A node link may name any public peer and reach any client's route: a secret every
    client holds would make every client a node."""
    import pathlib

    secret = pathlib.Path(str(tmp_path)) / "secret"
    secret.write_text(TOKEN + "\n")
    stderr = await _fails(
        *("serve", "--listen", "127.0.0.1:0"),
        *("--cluster", "etcd://127.0.0.1:2379", "--node-id", "a"),
        *("--cluster-secret-file", str(secret)),
        status=2,
    )
    assert "must not be the client token" in stderr
    assert TOKEN not in stderr
    assert "Traceback" not in stderr


@needs_etcd
@pytest.mark.slow
async def test_a_node_process_cut_off_from_the_engine_but_not_from_its_client(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """Node A reaches etcd through a relay that is cut (and then refuses), while its client
    stays connected: a new ``-R`` on A is refused with ``CLUSTER_UNAVAILABLE`` in one line,
    A's held port goes on serving; once A's lease has expired in etcd, a client of node B
    takes the port. When the relay lets A through again A rejoins by itself, finds the port
    lost and drops its client, so A stops serving it and only B's client does: the two
    held it at once only while A could not learn otherwise."""
    link = LinkProxy(("127.0.0.1", etcd.client_port))
    await link.start(nursery)
    through = f"etcd://127.0.0.1:{link.port}"
    port, other = _free_port(), _free_port()
    a = await Process.start(
        "serve",
        *("--listen", "127.0.0.1:0", "--public-host", "127.0.0.1"),
        *("--cluster", through, "--node-id", "a", "--cluster-lease-ttl", "3"),
    )
    b: Process | None = None
    clients: list[Process] = []
    try:
        a_address = (await a.line_with("listening on")).split("listening on ", 1)[1].split()[0]
        await a.line_with(f"node a of the cluster at {through}")
        b, b_address = await _node(etcd, "b", "127.0.0.2")
        holder = await Process.start(
            "connect", a_address, "--backoff-max", "1", "-R", f"{port}:127.0.0.1:{echo_port}"
        )
        clients.append(holder)
        await holder.line_with(f"remote forward 127.0.0.1:{port}")
        assert await cluster_holders(etcd, f"tcp/{port}") == ["a"]

        link.refusing = True
        link.cut()
        stderr = await _fails("connect", a_address, "-R", f"{other}:127.0.0.1:{echo_port}")
        assert "[CLUSTER_UNAVAILABLE]" in stderr
        assert "Traceback" not in stderr
        assert await _echo("127.0.0.1", port, b"still on a") == b"still on a"
        with trio.fail_after(60):  # a hang detector: A's lease (3 s) expires in etcd
            while await cluster_holders(etcd, f"tcp/{port}"):
                await trio.sleep(0.2)
        taker = await Process.start("connect", b_address, "-R", f"{port}:127.0.0.1:{echo_port}")
        clients.append(taker)
        await taker.line_with(f"remote forward 127.0.0.2:{port}")
        assert await cluster_holders(etcd, f"tcp/{port}") == ["b"]
        assert await _echo("127.0.0.2", port, b"on b") == b"on b"

        link.refusing = False  # healed: A renews, finds its lease gone, joins again
        with trio.fail_after(60):  # a hang detector
            while await _served("127.0.0.1", port, b"a still serves it"):
                await trio.sleep(0.2)
        assert set((await cluster_status(etcd))["nodes"]) == {"a", "b"}  # A is a node again
        assert await cluster_holders(etcd, f"tcp/{port}") == ["b"]
        assert await _echo("127.0.0.2", port, b"b keeps it") == b"b keeps it"
        assert holder.process.poll() is None  # suspended and retrying, as on one server
    finally:
        for client in clients:
            await client.kill()
        await a.kill()
        if b is not None:
            await b.kill()
        link.close()


@needs_etcd
async def test_cluster_status_shows_each_node_and_what_its_clients_hold(
    etcd: EtcdServer, echo_port: int
) -> None:
    port = _free_port()
    a, a_address = await _node(etcd, "a", "127.0.0.1")
    b, _ = await _node(etcd, "b", "127.0.0.2")
    client: Process | None = None
    try:
        client = await Process.start(
            "connect", a_address, "--client-id", "laptop", "-R", f"{port}:127.0.0.1:{echo_port}"
        )
        await client.line_with(f"remote forward 127.0.0.1:{port}")
        status = await cluster_status(etcd)
        assert set(status["nodes"]) == {"a", "b"}
        assert status["nodes"]["a"]["address"] == a_address
        held = status["nodes"]["a"]["holds"]
        assert set(held) == {"clients/laptop", f"tcp/{port}"}
        assert held["clients/laptop"] == held[f"tcp/{port}"]  # one session holds both
        assert status["nodes"]["b"]["holds"] == {}
        with trio.fail_after(30):
            text = await trio.run_process(
                [*PYTUNNEL, "cluster", "status", "--cluster", etcd.url], capture_stdout=True
            )
        lines = text.stdout.decode().splitlines()
        assert lines[0] == f"2 node(s) in the cluster at {etcd.url}"
        assert f"node a at {a_address}: 2 key(s)" in lines
        assert any(line.startswith(f"  tcp/{port}  a/") for line in lines)
    finally:
        if client is not None:
            await client.kill()
        await a.kill()
        await b.kill()


async def test_cluster_status_of_an_engine_that_does_not_answer_is_one_line() -> None:
    with trio.fail_after(30):
        result = await trio.run_process(
            [*PYTUNNEL, "cluster", "status", "--cluster", f"etcd://127.0.0.1:{closed_port()}"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert stderr.startswith("pytunnel: error: cluster engine unreachable")
    assert len(stderr.splitlines()) == 1


@needs_etcd
async def test_cluster_status_through_a_nodes_admin_api(
    etcd: EtcdServer, echo_port: int, tmp_path: Path
) -> None:
    """``cluster status --admin``: the registry as one node reads it, and that node's links;
    a server without ``--cluster`` answers one clear error."""
    port = _free_port()
    sock = tmp_path / "a.sock"
    a, a_address = await _node(etcd, "a", "127.0.0.1", "--admin", f"unix:{sock}")
    b, _ = await _node(etcd, "b", "127.0.0.2")
    lone = await Process.start("serve", "--listen", "127.0.0.1:0", "--admin", f"unix:{tmp_path}/l")
    client: Process | None = None
    try:
        await lone.line_with("listening on")
        client = await Process.start(
            "connect", a_address, "--client-id", "laptop", "-R", f"{port}:127.0.0.1:{echo_port}"
        )
        await client.line_with(f"remote forward 127.0.0.1:{port}")
        with trio.fail_after(30):
            out = await trio.run_process(
                [*PYTUNNEL, "cluster", "status", "--admin", f"unix:{sock}", "--json"],
                capture_stdout=True,
                capture_stderr=True,
            )
        status = json.loads(out.stdout)
        assert set(status["nodes"]) == {"a", "b"}
        assert set(status["nodes"]["a"]["holds"]) == {"clients/laptop", f"tcp/{port}"}
        assert status["links"] is None  # no --cluster-secret-file: this node relays nothing
        with trio.fail_after(30):
            text = await trio.run_process(
                [*PYTUNNEL, "cluster", "status", "--admin", f"unix:{sock}"], capture_stdout=True
            )
        lines = text.stdout.decode().splitlines()
        assert lines[0] == "2 node(s) in the cluster as node a sees it"
        assert f"node a at {a_address}: 2 key(s)" in lines
        with trio.fail_after(30):
            refused = await trio.run_process(
                [*PYTUNNEL, "cluster", "status", "--admin", f"unix:{tmp_path}/l"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert refused.returncode == 1
        assert refused.stderr.decode().strip() == (
            "pytunnel: error: this server is not a node of a cluster (started without --cluster)"
            " (HTTP 409)"
        )
    finally:
        if client is not None:
            await client.kill()
        for process in (a, b, lone):
            await process.kill()


async def _until_eof(stream: trio.SocketStream) -> None:
    while await stream.receive_some():
        pass


async def _served(host: str, port: int, payload: bytes) -> bool:
    try:
        with trio.fail_after(10):  # a hang detector
            return await _echo(host, port, payload) == payload
    except (OSError, trio.BrokenResourceError):
        return False  # nothing listens yet, or the connection was reset


@needs_etcd
@pytest.mark.slow
async def test_self_signed_nodes_link_with_a_bundle_of_their_certificates(
    etcd: EtcdServer, echo_port: int, tmp_path: Path
) -> None:
    """Nodes with ``--tls-self-signed`` (one certificate each, no CA): ``--cluster-tls-ca`` is
    a file of every node's certificate, each its own trust anchor, so a node links to the
    others and to nobody else. A node whose bundle lacks the owner's certificate cannot link
    to it: its connections for that port are reset, never served unverified."""
    import pytunnel

    certs = {}
    for name in ("a", "b", "c"):
        cert, _, fingerprint = await pytunnel.tls.ensure_self_signed(tmp_path / name)
        certs[name] = (cert.read_text(), fingerprint)
    every = tmp_path / "nodes.pem"
    every.write_text("".join(text for text, _ in certs.values()))
    without_a = tmp_path / "without-a.pem"
    without_a.write_text(certs["b"][0] + certs["c"][0])
    secret = tmp_path / "secret"
    secret.write_text("a secret only the nodes know\n")
    port = _free_port()
    with socket.socket() as probe:
        probe.bind(("127.0.0.3", port))  # the third node's public address must be free too
    processes: list[Process] = []
    try:
        for name, host, bundle in (
            ("a", "127.0.0.1", every),
            ("b", "127.0.0.2", every),
            ("c", "127.0.0.3", without_a),
        ):
            node, address = await _node(
                etcd,
                name,
                host,
                *("--tls-self-signed", "--tls-dir", str(tmp_path / name)),
                *("--cluster-secret-file", str(secret), "--cluster-tls-ca", str(bundle)),
            )
            processes.append(node)
            if name == "a":
                a_address = address
        client = await Process.start(
            "connect",
            a_address,
            *("--tls-fingerprint", certs["a"][1]),
            *("-R", f"{port}:127.0.0.1:{echo_port}"),
        )
        processes.append(client)
        await client.line_with(f"remote forward 127.0.0.1:{port}")
        assert await _served("127.0.0.1", port, b"at the owner")
        # b mirrors the port and relays over a TLS link that verified a's certificate
        with trio.fail_after(60):
            while not await _served("127.0.0.2", port, b"through b"):
                await trio.sleep(0.2)
        # c mirrors it too, but cannot verify a: accepted, then reset
        with trio.fail_after(60):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.3", port)
                    break
                except OSError:  # not mirrored yet
                    await trio.sleep(0.2)
        async with stream:
            await stream.send_all(b"through c")
            with trio.fail_after(30), pytest.raises(trio.BrokenResourceError):
                await _until_eof(stream)
        assert await _served("127.0.0.2", port, b"b still links")
    finally:
        for process in processes:
            await process.kill()


@needs_etcd
async def test_a_nodes_self_signed_certificate_names_its_node_address(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """So the other nodes' links, which check the host name, can verify it."""
    from cryptography import x509

    node, _ = await _node(
        etcd,
        "a",
        "127.0.0.1",
        *("--tls-self-signed", "--tls-dir", str(tmp_path / "tls")),
        *("--node-address", "edge-1.example.net:7000"),
    )
    try:
        cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.crt").read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["edge-1.example.net", "localhost"]
    finally:
        await node.kill()

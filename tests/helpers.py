"""Plain helpers shared by the test files: constants, loopback socket tricks, session pair
builders, resource counters and the one polling helper.

Nothing here is a fixture (fixtures live in ``conftest.py``, which imports from here), so a
test file imports what it uses by name and a reader sees where it comes from.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing
import trustme
from nginx_conf import NGINX

import pytunnel
from pytunnel.session import Role, Session, SessionConfig, open_session

SessionPair = tuple[Session, Session]

TOKEN = "test-token-5f1b"

#: where the Runner interoperability tests install ``@bluelibs/runner`` (kept between runs;
#: ``.ci/run`` points it into its temporary folder)
RUNNER_DIR = Path(os.environ.get("PYTUNNEL_NPM_RUNNER", "/tmp/pytunnel-npm-runner"))
RUNNER_VERSION = "5.5"


async def tcp_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of a real loopback TCP connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    try:
        port = listener.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            client_box: list[trio.SocketStream] = []

            async def dial() -> None:
                client_box.append(await trio.open_tcp_stream("127.0.0.1", port))

            nursery.start_soon(dial)
            server = await listener.accept()
        return client_box[0], server
    finally:
        await listener.aclose()


@asynccontextmanager
async def session_pair(
    transport: str = "memory", config: SessionConfig | None = None, **kw: object
) -> AsyncIterator[SessionPair]:
    """A client and a server session connected to each other (no handshake)."""
    config = config or SessionConfig(**kw)  # type: ignore[arg-type]
    a: trio.abc.Stream
    b: trio.abc.Stream
    if transport == "memory":
        a, b = trio.testing.memory_stream_pair()
    else:
        a, b = await tcp_stream_pair()
    async with (
        open_session(a, Role.CLIENT, config, name="client") as client,
        open_session(b, Role.SERVER, config, name="server") as server,
    ):
        yield client, server


async def open_pair(
    client: Session, server: Session, **kw: object
) -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
    """Open one stream from ``client`` and accept it on ``server``."""
    async with trio.open_nursery() as nursery:
        box: list[trio.abc.HalfCloseableStream] = []

        async def accept() -> None:
            incoming = await server.accept_stream()
            box.append(incoming.accept())

        nursery.start_soon(accept)
        opened = await client.open_stream(**kw)  # type: ignore[arg-type]
    return opened, box[0]


async def send_at_once_in_odd_sizes(
    pairs: list[tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]],
    payloads: list[bytes],
) -> list[bytes]:
    """Each payload on its own stream pair, all at once, in writes of odd sizes (so that
    frames and records are cut anywhere) ended with EOF; returns what each far end read."""
    received: dict[int, bytes] = {}

    async def send(i: int) -> None:
        data, pos, chunk = payloads[i], 0, 1 + 1000 * i
        while pos < len(data):
            await pairs[i][0].send_all(data[pos : pos + chunk])
            pos += chunk
            chunk = chunk * 3 % 40_000 + 1
        await pairs[i][0].send_eof()

    async def receive(i: int) -> None:
        parts = []
        while chunk := await pairs[i][1].receive_some():
            parts.append(chunk)
        received[i] = b"".join(parts)

    async with trio.open_nursery() as nursery:
        for i in range(len(pairs)):
            nursery.start_soon(send, i)
            nursery.start_soon(receive, i)
    return [received[i] for i in range(len(pairs))]


async def eight_streams_at_once(
    a: trio.abc.Stream, b: trio.abc.Stream, payloads: list[bytes]
) -> tuple[list[bytes], int]:
    """A session over ``a`` and ``b`` with a small write buffer, and one stream a payload
    sent all at once (see :func:`send_at_once_in_odd_sizes`): what each stream delivered,
    and the bytes the client wrote (inline and through its writer task)."""
    config = SessionConfig(write_buffer_high=32 * 1024, max_data_chunk=16 * 1024)
    async with (
        open_session(a, Role.CLIENT, config) as client,
        open_session(b, Role.SERVER, config) as server,
    ):
        pairs = [await open_pair(client, server, host="t", port=i + 1) for i in range(8)]
        received = await send_at_once_in_odd_sizes(pairs, payloads)
        written = client.bytes_written
        for mine, theirs in pairs:
            await mine.aclose()
            await theirs.aclose()
    return received, written


def live_tasks() -> list[trio.lowlevel.Task]:
    """Every live task in this run, walking the task tree from the root."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    tasks = []
    stack = [root]
    while stack:
        task = stack.pop()
        tasks.append(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return tasks


def coroutine_names(task: trio.lowlevel.Task) -> list[str]:
    """The coroutines a parked task is suspended in, outermost first. A coroutine compiled
    by mypyc (``relay_gen``, say) is named by its type and ends the list: it does not say
    what it awaits."""
    names: list[str] = []
    awaited: object = task.coro
    while awaited is not None:
        code = getattr(awaited, "cr_code", None) or getattr(awaited, "gi_code", None)
        if code is None:
            name = type(awaited).__name__
            if name.endswith("_gen"):
                names.append(name.removesuffix("_gen"))
            break
        names.append(code.co_name)
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return names


def count_tasks() -> int:
    """How many tasks are alive in this run."""
    return len(live_tasks())


def describe_tasks() -> str:
    """The live tasks by name and count, for the message of a leak check that failed."""
    names = collections.Counter(task.name for task in live_tasks())
    return ", ".join(f"{name} x{n}" for name, n in names.most_common())


def count_fds() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


async def wait_until(
    predicate: Callable[[], bool],
    seconds: float = 10,
    what: str | Callable[[], str] = "the condition never held",
) -> None:
    """Poll ``predicate`` until it holds, then return; fail with ``what`` after ``seconds``.

    A hang detector, not a timing claim: ``seconds`` is generous, and the state polled is
    owned by other tasks, the kernel or another process, so there is no event to wait on.
    ``what`` may be a callable so the message can report the state at the deadline.
    """
    with trio.move_on_after(seconds):
        while not predicate():
            await trio.sleep(0.01)
    assert predicate(), what() if callable(what) else what


async def tagged_service(nursery: trio.Nursery, tag: bytes) -> int:
    """A service answering every connection with ``tag`` once the peer has sent all it will
    (so a reply names the member that served it); its port."""

    async def answer(stream: trio.SocketStream) -> None:
        while await stream.receive_some():
            pass
        await stream.send_all(tag)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """The next ``size`` bytes of ``stream``, read a chunk at a time and never past them; an
    EOF before them fails the test."""
    got = bytearray()
    while len(got) < size:
        chunk = await stream.receive_some(size - len(got))
        assert chunk, f"EOF after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


async def read_all(stream: trio.abc.Stream) -> bytes:
    """Everything ``stream`` sends until EOF or a reset; 5 s is a hang detector."""
    out = b""
    with trio.fail_after(5):
        try:
            while chunk := await stream.receive_some():
                out += chunk
        except trio.BrokenResourceError:
            pass
    return out


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything ``stream`` sends until its EOF. Unlike :func:`read_all`, a reset raises and
    the deadline is the caller's, for bulk transfers that take longer than 5 s on a loaded
    machine and for tests in which only a clean EOF will do."""
    parts = []
    while chunk := await stream.receive_some():
        parts.append(chunk)
    return b"".join(parts)


async def echo_handler(stream: trio.SocketStream) -> None:
    """Echo until EOF, then half-close back (so half-close is visible end to end)."""
    try:
        async for chunk in stream:
            await stream.send_all(chunk)
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def closed_port() -> int:
    """A loopback port with nothing listening (bound then released).

    It is picked below the kernel's ephemeral range: a port from ``bind(0)`` could be handed
    out again, to another listener on port 0 or to an outgoing connection's local end, before
    the test binds it, and the test would fail with "address in use" for no fault of its own."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 16384), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether ``port`` on 127.0.0.1 can be bound right now (nothing listens on it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Blackhole:
    """A loopback port whose listen queue is full, so new connects hang (SYN dropped):
    the only way to get a real dial timeout without leaving loopback."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = int(self.listener.getsockname()[1])
        self.fillers: list[socket.socket] = []
        for _ in range(4):  # fill the accept queue; never accepted
            s = socket.socket()
            s.setblocking(False)
            with suppress(BlockingIOError):
                s.connect(("127.0.0.1", self.port))
            self.fillers.append(s)

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.listener.close()


class Crash:
    """Runs ``serve`` in its own nursery and records whatever it raised (instead of letting it
    tear down the test), so a test can assert that the server is still alive."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    async def serve(
        self, *, task_status: trio.TaskStatus[pytunnel.TunnelServer], **kw: Any
    ) -> None:
        try:
            await pytunnel.serve(0, token=TOKEN, task_status=task_status, **kw)
        except trio.Cancelled:
            raise
        except BaseException as exc:
            self.error = exc


#: The cluster tests' mark: they run on a real etcd, which CI installs.
needs_etcd = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="etcd is not installed (.ci/run installs etcd-server)"
)


async def udp_echo(*, task_status: trio.TaskStatus[int]) -> None:
    """A UDP echo service on loopback (``nursery.start`` gives its port); a request starting
    with b"Q" gets a DNS-like b"A" + rest answer."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, addr = await sock.recvfrom(65536)
            reply = b"A" + data[1:] if data.startswith(b"Q") else data
            await sock.sendto(reply, addr)


async def until_listening(process: trio.Process, host: str, port: int, seconds: float = 20) -> None:
    """Until ``host:port`` accepts a connection (closed at once), while ``process`` runs.

    A daemon started with ``open_process`` binds its ports some time after the call returns;
    a client started before that is refused, and a client refused on its first connect exits
    (as ``ssh`` does), so a test waits here instead of racing the bind.
    """
    with trio.fail_after(seconds):
        while True:
            assert process.poll() is None, f"{process.args!r} exited: {process.returncode}"
            try:
                await (await trio.open_tcp_stream(host, port)).aclose()
                return
            except OSError:
                await trio.sleep(0.05)


async def send_and_read_all(address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload`` then EOF, and return everything the service answers until its EOF
    (a small payload: sent before reading; errors come through as they are, ungrouped)."""
    with trio.fail_after(10):  # a hang detector
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            await stream.send_all(payload)
            await stream.send_eof()
            out = b""
            while chunk := await stream.receive_some():
                out += chunk
            return out


async def echo_once(address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload`` then EOF while reading concurrently (so a payload larger than the
    socket buffers cannot deadlock against an echo); return everything read."""
    stream = await trio.open_tcp_stream(*address)

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(payload), 1 << 20):
            await stream.send_all(view[i : i + (1 << 20)])
        await stream.send_eof()

    try:
        parts = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while chunk := await stream.receive_some():
                parts.append(chunk)
        return b"".join(parts)
    finally:
        await stream.aclose()


# --------------------------------------------------------------------------- name routes
# Services behind a name route, as (stream, peer) handlers: the router hands them the
# connection directly; serve_route_target puts one on a TCP port, for a tunnel to dial.


def http_service(name: str):  # type: ignore[no-untyped-def]
    """A service behind a route: answers every request on the connection with its name and
    the request's path (h11 on the routed stream, so the replayed head must be intact)."""

    async def serve(stream: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive_some()
                    except trio.BrokenResourceError:  # reset by the relay: the client left
                        return
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    body = f"{name} {event.target.decode()} from {peer[0]}\n".encode()
                    headers = [("content-length", str(len(body)))]
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
                    await stream.send_all(conn.send(h11.Data(data=body)))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                elif isinstance(event, h11.EndOfMessage):
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return

    return serve


async def raw_echo(stream: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> None:
    """A service that sends back every byte it gets, the request head included."""
    async with stream:
        async for chunk in stream:
            await stream.send_all(chunk)


def tls_service(ca: trustme.CA, name: str):  # type: ignore[no-untyped-def]
    """A service behind an SNI route that terminates TLS itself with its own certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)

    async def serve(stream: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        async with tls:
            try:
                request = await tls.receive_some()
                await tls.send_all(b"hello from " + name.encode() + b": " + request)
            except trio.BrokenResourceError:
                return

    return serve


async def tls_get(ca: trustme.CA, port: int, name: str | None) -> bytes:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if name is None:
        context.check_hostname = False
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, context, server_hostname=name)
    async with tls:
        with trio.fail_after(10):
            await tls.send_all(b"ping")
            return bytes(await tls.receive_some())


async def serve_route_target(
    nursery: trio.Nursery,
    service: Callable[[trio.abc.HalfCloseableStream, tuple[str, int]], Awaitable[None]],
) -> int:
    """Put a route handler on a loopback TCP port; returns the port."""

    async def handle(stream: trio.SocketStream) -> None:
        host, port = stream.socket.getpeername()[:2]
        await service(stream, (str(host), int(port)))

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


class LinkProxy:
    """A TCP relay between a client and the server, to break the link in chosen ways.

    ``reset_client_side()`` resets (RST, ``SO_LINGER`` 0) only the client-facing sockets and
    keeps the server-facing ones open and silent: the server still sees a healthy, quiet
    client, as after a NAT rebinding or a middlebox reset. ``cut()`` closes both sides.
    While ``refusing`` is set, new connections are closed at once.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.refusing = False
        self._links: list[tuple[trio.SocketStream, trio.SocketStream, trio.CancelScope]] = []
        self.ghosts: list[trio.SocketStream] = []

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
        )
        self.port = int(listeners[0].socket.getsockname()[1])

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.refusing:
            return  # serve_tcp closes it
        server = await trio.open_tcp_stream(*self.target)
        scope = trio.CancelScope()
        self._links.append((client, server, scope))
        with scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server)
                nursery.start_soon(self._pump, server, client)

    @staticmethod
    async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for chunk in source:
                await sink.send_all(chunk)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await sink.send_eof()

    @staticmethod
    def _reset(stream: trio.SocketStream) -> None:
        with contextlib.suppress(OSError):  # already closed by its own side: nothing to reset
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    def reset_client_side(self) -> None:
        links, self._links = self._links, []
        for client, server, scope in links:
            scope.cancel()
            self._reset(client)
            self.ghosts.append(server)  # open, and nobody reads or writes it any more

    def cut(self) -> None:
        links, self._links = self._links, []
        for client, server, scope in links:
            scope.cancel()
            self._reset(client)
            self._reset(server)

    def close(self) -> None:
        self.cut()
        for ghost in self.ghosts:
            ghost.socket.close()


async def start_link_proxy(
    nursery: trio.Nursery, target: tuple[str, int]
) -> tuple[LinkProxy, trio.CancelScope]:
    """A :class:`LinkProxy` to ``target`` running in ``nursery``, and the scope that stops
    it listening (``cancel()``: its address refuses from then on, as a dead node's would)."""
    proxy = LinkProxy(target)
    listening = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with listening:
            async with trio.open_nursery() as proxy_nursery:
                await proxy.start(proxy_nursery)
                task_status.started()
                await trio.sleep_forever()

    await nursery.start(run)
    return proxy, listening


class EtcdServer:
    """A private etcd (the cluster tests' engine) on loopback, in its own data directory.

    Started and stopped by pid only; ``kill`` and ``start`` again on the same directory and
    ports is an engine that went away and came back with its data (and leases).
    :meth:`members` makes the members of one multi-member etcd instead."""

    def __init__(self, data_dir: str, name: str = "test") -> None:
        self.data_dir = data_dir
        self.name = name
        self.client_port = closed_port()
        self.peer_port = closed_port()
        self.process: trio.Process | None = None
        self.initial_cluster = f"{name}=http://127.0.0.1:{self.peer_port}"

    @classmethod
    def members(cls, base_dir: str, count: int) -> list[EtcdServer]:
        """The members of one etcd of ``count`` members (start them all, then wait)."""
        members = [cls(f"{base_dir}/m{i}", f"m{i}") for i in range(count)]
        initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in members)
        for member in members:
            member.initial_cluster = initial
        return members

    #: what clients speak to it (a subclass with TLS flags says ``https``)
    scheme = "http"

    def extra(self) -> list[str]:
        """Flags of a subclass's own (TLS, authentication), after the common ones."""
        return []

    @property
    def url(self) -> str:
        return f"etcd{'s' if self.scheme == 'https' else ''}://127.0.0.1:{self.client_port}"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    async def start(self) -> None:
        await self.launch()
        await self.wait_healthy()

    async def launch(self) -> None:
        etcd = shutil.which("etcd")
        assert etcd is not None
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.process = await trio.lowlevel.open_process(
            [
                etcd,
                f"--name={self.name}",
                f"--data-dir={self.data_dir}",
                f"--listen-client-urls={self.endpoint}",
                f"--advertise-client-urls={self.endpoint}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster={self.initial_cluster}",
                *self.extra(),
                "--log-level=error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def wait_healthy(self) -> None:
        """Until this member serves (it has a leader); 30 s is a hang detector."""
        async with httpx.AsyncClient(timeout=1.0) as http:
            with trio.fail_after(30):
                while True:
                    assert self.process is not None
                    assert self.process.poll() is None, "etcd exited at start"
                    with suppress(httpx.HTTPError):
                        if (await http.get(f"{self.endpoint}/health")).status_code == 200:
                            return
                    await trio.sleep(0.1)

    async def kill(self) -> None:
        """SIGKILL by pid: the engine vanishes the way a crashed machine's would."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, 9)
            with trio.CancelScope(shield=True):
                await process.wait()


# ------------------------------------------------------------------ the command in subprocesses

#: how a test runs the real ``pytunnel`` command
PYTUNNEL = [sys.executable, "-m", "pytunnel"]


async def cluster_status(etcd: EtcdServer) -> dict[str, Any]:
    """What ``pytunnel cluster status --json`` reads from the engine (the real CLI)."""
    with trio.fail_after(30):
        out = await trio.run_process(
            [*PYTUNNEL, "cluster", "status", "--cluster", etcd.url, "--json"],
            capture_stdout=True,
            capture_stderr=True,
        )
    status: dict[str, Any] = json.loads(out.stdout)
    return status


async def cluster_holders(etcd: EtcdServer, key: str) -> list[str]:
    """The nodes whose clients hold ``key`` (none, one, or more if the registry were wrong)."""
    nodes = (await cluster_status(etcd))["nodes"]
    return sorted(name for name, node in nodes.items() if key in node["holds"])


class CliProcess:
    """A ``pytunnel`` subprocess.

    Its stdout lines are awaited with a deadline, so a hang fails the test instead of stopping
    the run; its stderr goes to an unnamed temporary file, so a test can read the log while
    the process runs (or wait for a line) without the pipe filling up and blocking it.
    """

    def __init__(
        self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        # kept open for the object's life: the log stays readable after the process ends
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        self.popen = subprocess.Popen(
            [*PYTUNNEL, *args],
            stdout=subprocess.PIPE,
            stderr=self._err,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
        self._pending = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stderr(self) -> str:
        """Everything the process has logged so far."""
        return os.pread(self._err.fileno(), os.fstat(self._err.fileno()).st_size, 0).decode(
            errors="replace"
        )

    def readline(self, timeout: float = 20) -> str:
        """The next stdout line, without its newline."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            ready, _, _ = select.select(
                [self.popen.stdout], [], [], max(0, deadline - time.monotonic())
            )
            if not ready:
                raise TimeoutError(f"no output line; stderr: {self.stderr}")
            chunk = os.read(self.popen.stdout.fileno(), 4096)
            if not chunk:
                raise EOFError(f"process exited; stderr: {self.stderr}")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def line_with(self, prefix: str, lines: int = 12, timeout: float = 20) -> str:
        """The first of the next ``lines`` stdout lines that starts with ``prefix``."""
        for _ in range(lines):
            line = self.readline(timeout)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting with {prefix!r} in {lines} lines")

    def wait_log(self, text: str, count: int = 1, timeout: float = 20) -> None:
        """Wait until ``text`` has been logged ``count`` times by the running process."""
        deadline = time.monotonic() + timeout
        while self.stderr.count(text) < count:
            assert time.monotonic() < deadline, f"no log {text!r}; stderr: {self.stderr}"
            assert self.popen.poll() is None, f"process exited; stderr: {self.stderr}"
            time.sleep(0.05)

    def wait(self, timeout: float = 20) -> int:
        """The exit code of a process that ends by itself within ``timeout``."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process still runs; stderr: {self.stderr}") from None

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10) -> int:
        """Send ``sig`` and return the exit code; a process that outlives it fails the test."""
        self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process did not exit after signal {sig}") from None
        finally:
            self.kill()

    def kill(self) -> None:
        """Kill the process if it still runs and reap it (idempotent)."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def address_in(line: str) -> tuple[str, int]:
    """The first ``IPv4:port`` in a line the command printed."""
    match = re.search(r"(\d+\.\d+\.\d+\.\d+):(\d+)", line)
    assert match, line
    return match.group(1), int(match.group(2))


def roundtrip(address: tuple[str, int], payload: bytes, timeout: float = 10) -> bytes:
    """Send ``payload``, half-close, and read until the other side closes (blocking)."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while data := s.recv(65536):
            out += data
        return out


class _ThreadedEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)
        with contextlib.suppress(OSError):
            self.request.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def threaded_echo() -> Iterator[tuple[str, int]]:
    """An echo service in threads, for tests that are not themselves Trio code (the CLI and
    sync API tests); it half-closes after echoing everything, so a relay's EOF is seen."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _ThreadedEcho)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[0], server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class NginxProcess:
    """A private nginx (see ``nginx_conf.py``) run by a Trio test: started from
    ``prefix/nginx.conf`` and awaited until ``port`` accepts, stopped by SIGTERM (then
    SIGKILL) however the test ends."""

    def __init__(self, prefix: Path, port: int) -> None:
        self.prefix = prefix
        self.port = port
        self.process: trio.Process | None = None

    async def start(self) -> None:
        assert NGINX is not None, "nginx is not installed"
        self.process = await trio.lowlevel.open_process(
            [NGINX, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with trio.fail_after(20):
            while not await self._listening():
                assert self.process.poll() is None, (self.prefix / "error.log").read_text()
                await trio.sleep(0.05)

    async def _listening(self) -> bool:
        try:
            await (await trio.open_tcp_stream("127.0.0.1", self.port)).aclose()
        except OSError:
            return False
        return True

    async def stop(self) -> None:
        if self.process is None:
            return
        with trio.CancelScope(shield=True):
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        self.process = None


@asynccontextmanager
async def running_nginx(prefix: Path, port: int) -> AsyncIterator[NginxProcess]:
    """An :class:`NginxProcess` for the body of an ``async with``."""
    nginx = NginxProcess(prefix, port)
    await nginx.start()
    try:
        yield nginx
    finally:
        await nginx.stop()


# ------------------------------------------------------------------ curl and raw HTTP exchanges

#: curl, the real HTTP client of the name-routing tests (``.ci/run`` installs it)
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (.ci/run installs it)")


async def curl(port: int, host: str, path: str = "/", *extra: str) -> tuple[int, str]:
    """GET ``http://host:port/path`` with curl, ``host`` resolved to 127.0.0.1 (as a public
    DNS name pointing at the server would be): the status code and the body."""
    assert CURL is not None
    result = await trio.run_process(
        [
            CURL,
            "-s",
            "--max-time",
            "10",
            "--resolve",
            f"{host}:{port}:127.0.0.1",
            "-w",
            "\n%{http_code}",
            *extra,
            f"http://{host}:{port}{path}",
        ],
        capture_stdout=True,
        check=False,
    )
    body, _, code = result.stdout.decode().rpartition("\n")
    return int(code), body


async def exchange(port: int, data: bytes, *, read_until_close: bool = True) -> bytes:
    """Send ``data`` to a loopback port and read the answer: to the end, or only as many
    bytes as were sent (for an echo behind a connection that stays open)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        out = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                out += chunk
                if not read_until_close and len(out) >= len(data):
                    break
        return out

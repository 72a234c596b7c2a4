"""Ingress as a module: a listener whose connections each take a slot and are carried."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest
import trio
import trio.testing

from pytunnel._ingress import serve_ingress
from pytunnel._listen import bind

pytestmark = pytest.mark.timeout(60)


async def _refusing(_conn: trio.SocketStream, admitted: bool) -> None:
    assert not admitted


async def test_ingress_without_a_slot_closes_the_connection() -> None:
    """A refused slot: the connection is accepted and closed at once, and nothing is
    released that was not taken."""
    released: list[bool] = []

    async def no_slot() -> bool:
        return False

    with trio.fail_after(30):
        [listener] = await bind("127.0.0.1", 0)
        port = listener.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                serve_ingress, listener, no_slot, _refusing, released.append, nursery
            )
            conn = await trio.open_tcp_stream("127.0.0.1", port)
            assert await conn.receive_some() == b""  # closed by the server side
            await conn.aclose()
            nursery.cancel_scope.cancel()
        await listener.aclose()
    assert released == [False]


async def test_ingress_waits_for_a_slot_before_accepting() -> None:
    """While no slot is free the connection stays in the backlog; once one is, it is
    accepted, carried in that slot, and the slot is given back."""
    free = trio.Event()
    carried: list[int] = []
    released: list[int] = []

    async def wait_slot() -> int:
        await free.wait()
        return 7

    async def carry(conn: trio.SocketStream, slot: int) -> None:
        carried.append(slot)
        await conn.send_all(b"hi")

    with trio.fail_after(30):
        [listener] = await bind("127.0.0.1", 0)
        port = listener.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_ingress, listener, wait_slot, carry, released.append, nursery)
            conn = await trio.open_tcp_stream("127.0.0.1", port)
            await trio.testing.wait_all_tasks_blocked()
            assert carried == []
            free.set()
            assert await conn.receive_some() == b"hi"
            assert await conn.receive_some() == b""
            await conn.aclose()
            nursery.cancel_scope.cancel()
        await listener.aclose()
    assert carried == [7]
    assert released == [7]


async def test_ingress_returns_quietly_on_a_listener_closed_under_it() -> None:
    """A port that goes offline or away between two connections ends the loop, not the
    session with an error."""

    async def slot() -> bool:
        return True

    async def carry(_conn: trio.SocketStream, _slot: bool) -> None:
        pass

    with trio.fail_after(30):
        [listener] = await bind("127.0.0.1", 0)
        listener.socket.close()
        async with trio.open_nursery() as nursery:
            await serve_ingress(listener, slot, carry, lambda _slot: None, nursery)


INGRESS_EMFILE = r"""
import errno, logging, os, resource, sys, trio, trio.testing
from pytunnel._ingress import serve_ingress
from pytunnel._listen import bind

logging.basicConfig(level=logging.WARNING)
COUNT = int(sys.argv[1])


async def main():
    go = trio.Event()
    held = 0
    carried = []

    async def reserve():
        nonlocal held
        await go.wait()  # the first slot only once every connection is in the backlog
        held += 1
        return held

    def release(slot):
        nonlocal held
        held -= 1

    async def carry(conn, slot):
        data = await conn.receive_some()
        await conn.send_all(data)
        assert await conn.receive_some() == b""  # until the client closes
        carried.append(data)

    with trio.fail_after(60):
        [listener] = await bind("127.0.0.1", 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_ingress, listener, reserve, carry, release, nursery)
            # exactly 3 descriptors free, whatever holes the numbers below the limit have:
            # the limit caps descriptor numbers, not their count
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (top + 16, hard))
            fillers = []
            try:
                while True:
                    fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
            for fd in fillers[-3:]:  # 3 at a time
                os.close(fd)
            baseline = len(os.listdir("/proc/self/fd"))
            print(listener.socket.getsockname()[1], flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)
            go.set()
            while len(carried) < COUNT or held:
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            fds = len(os.listdir("/proc/self/fd"))
            print(f"carried {len(set(carried))} held {held} fds {fds - baseline}", flush=True)
            nursery.cancel_scope.cancel()

trio.run(main)
"""


async def test_ingress_out_of_descriptors_mid_batch_loses_and_leaks_nothing(
    tmp_path: pathlib.Path,
) -> None:
    """Twelve connections waiting at once, descriptors for three: the batch stops at
    ``EMFILE`` (logged, slot given back) and the rest stay in the backlog, each served once a
    descriptor is free; at the end every slot is back and no descriptor is left open."""
    count = 12
    script = tmp_path / "ingress.py"
    script.write_text(INGRESS_EMFILE)
    log_path = tmp_path / "ingress.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with log_path.open("wb") as log_file:
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(script), str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=env,
        )
    assert proc.stdin is not None
    assert proc.stdout is not None
    out = b""
    try:
        with trio.fail_after(60):  # a hang detector
            while not out.endswith(b"\n"):
                out += await proc.stdout.receive_some(100)
            port = int(out)
            clients = [
                socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)
            ]
            await proc.stdin.send_all(b"go\n")
            for i, client in enumerate(clients):  # each closed frees a descriptor
                with client:
                    client.sendall(b"conn %02d" % i)
                    assert await trio.to_thread.run_sync(client.recv, 100) == b"conn %02d" % i
            out = b""
            while not out.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(100)
                assert chunk, log_path.read_text()
                out += chunk
            assert await proc.wait() == 0, log_path.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert out.decode().split() == ["carried", str(count), "held", "0", "fds", "0"]
    text = log_path.read_text()
    assert "accept failed (Too many open files); accepting again in 0.1 s" in text, (out, text)

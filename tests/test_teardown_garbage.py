"""A session's death breaks all its relays in one synchronous pass; that pass must leave no
garbage collector work behind it.

trio allocates a few objects to wake each relay's task (the error, its outcome, the bound
send) and keeps them until the task runs. If the pass left even one or two objects per relay
net, thousands of relays would push the youngest generation over its threshold again and
again, and the collections that follow can include a full one over every object of every
live relay, in the middle of the resets (docs/performance.md, "Teardown after a kill,
profiled"). So the pass releases at least as much as it allocates: this counts the young
generation's net growth over the step of the session's reader task that runs the pass, with
the process on the far side SIGKILLed, through real loopback sockets and a real process.
"""

from __future__ import annotations

import functools
import gc
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
from helpers import TOKEN, wait_until

import pytunnel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: Relayed connections broken in the pass: enough that one object per relay left over would
#: stand far above the pass's own constant allocations.
CONNS = 400
#: Hang detector, not a timing claim.
HANG = 60.0


class _ReaderSteps(trio.abc.Instrument):
    """The young generation's net growth (allocations less releases of tracked objects, as
    ``gc.get_count()[0]`` counts them while collections are off) over each step of a
    session's reader task."""

    def __init__(self) -> None:
        self.growth: list[int] = []
        self._before: int | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("Session._reader"):
            self._before = gc.get_count()[0]

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._before is not None:
            self.growth.append(gc.get_count()[0] - self._before)
            self._before = None


async def _open_proven(address: tuple[str, int], count: int) -> list[trio.SocketStream]:
    """``count`` connections through the forward at ``address``, each proven end to end."""
    conns = []
    for _ in range(count):
        conn = await trio.open_tcp_stream(*address)
        await conn.send_all(b"x")
        assert await conn.receive_some(1) == b"x"
        conns.append(conn)
    return conns


async def _measure_pass(
    kill: trio.Process,
    conns: list[trio.SocketStream],
    done: Callable[[], bool] = lambda: True,
) -> list[int]:
    """SIGKILL ``kill`` with collections off and the young generation's count high (so that
    releases are counted too: the count never goes below zero), wait until every connection
    saw its end and ``done()``, and return the reader steps' growth from the kill on."""
    steps = _ReaderSteps()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        ballast = [[] for _ in range(20 * CONNS)]  # noqa: F841 (raises the count)
        trio.lowlevel.add_instrument(steps)
        try:
            os.kill(kill.pid, signal.SIGKILL)
            for conn in conns:
                with trio.fail_after(HANG):
                    try:
                        while await conn.receive_some():
                            pass
                    except trio.BrokenResourceError:
                        pass
            await wait_until(done, HANG, lambda: "the survivor's session outlived the kill")
        finally:
            trio.lowlevel.remove_instrument(steps)
    finally:
        if was_enabled:
            gc.enable()
    return steps.growth


@asynccontextmanager
async def _pytunnel(pattern: str, *args: str) -> AsyncIterator[tuple[trio.Process, int]]:
    """A ``pytunnel`` process (the one the test SIGKILLs) and the port in the first of its
    output lines that ``pattern`` matches; killed if it still runs, and reaped, at the end."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "pytunnel", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        output = b""
        with trio.fail_after(30):
            while (found := re.search(pattern.encode(), output)) is None:
                chunk = await proc.stdout.receive_some()
                assert chunk, f"the process ended: {output!r}"
                output += chunk
        yield proc, int(found.group(1))
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_the_client_breaking_its_relays_after_a_server_kill_leaves_no_garbage(
    echo_port: int,
) -> None:
    serving = _pytunnel(
        r"listening on [\d.]+:(\d+)", "serve", "--listen", "127.0.0.1:0", "--token", TOKEN
    )
    async with (
        serving as (server, port),
        pytunnel.open_tunnel(("127.0.0.1", port), token=TOKEN) as tunnel,
    ):
        local = await tunnel.forward_local("127.0.0.1", echo_port)
        conns = await _open_proven(local.address, CONNS)
        growth = await _measure_pass(server, conns)
        for conn in conns:
            await conn.aclose()
    # the pass is the step with the most work by far; one object per relay left behind
    # would show as CONNS
    assert growth, "the session's reader never ran after the kill"
    assert max(growth) < CONNS // 2, f"the break pass grew the young generation by {max(growth)}"


async def test_the_server_breaking_its_relays_after_a_client_kill_leaves_no_garbage(
    nursery: trio.Nursery, echo_port: int
) -> None:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, connect_timeout=HANG)
    )
    host, port = server.address
    forward = f"0:127.0.0.1:{echo_port}"
    connecting = _pytunnel(
        r"local forward [\d.]+:(\d+)", "connect", f"{host}:{port}", "--token", TOKEN, "-L", forward
    )
    async with connecting as (client, local):
        conns = await _open_proven(("127.0.0.1", local), CONNS)
        # the connections the server's relays reset are its own, to the echo target; the
        # driver's (to the killed client) end with the client, and show only that it died
        growth = await _measure_pass(client, conns, lambda: server.session_count == 0)
        for conn in conns:
            await conn.aclose()
    assert growth, "the session's reader never ran after the kill"
    # here the pass still leaves about one object per relay: trio's four for waking the
    # relay's task against the three the stream lets go of (its direct writer, the taskless
    # direction's wake, the reset-on-break callback); it was two before the stream let go of
    # its writer. Bounded so that it cannot grow back unnoticed.
    assert max(growth) < CONNS * 3 // 2, (
        f"the break pass grew the young generation by {max(growth)}"
    )

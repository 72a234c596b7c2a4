"""Counters inside a running pytunnel process, for ``profile_bulk.py --counters``.

Bench-only: imported before the CLI starts (``install()``), it wraps a few functions of the
data path of a *pure-Python* tree (mypyc-compiled classes cannot be patched) with counters,
and writes them as JSON to ``$PYTUNNEL_COUNTERS/<pid>.json`` on ``SIGUSR1``. What it
counts is what a system-call count cannot tell: the size of each Data frame sent, the
window updates, which path queued a frame (a relay's direct writer or ``send_all``), how
often a sender waited for the write buffer or for window, the bytes per read and per write
on the session socket apart from those on the target sockets, and trio's task steps.

The wrappers cost a Python call each: read the counts, not the speed, of a counted run.
"""

from __future__ import annotations

import collections
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

C: collections.Counter[str] = collections.Counter()
#: Descriptors of session transports (their socket), to tell session I/O from target I/O.
SESSION_FDS: set[int] = set()


def _bucket(n: int) -> str:
    for limit, name in ((1024, "<1K"), (16384, "<16K"), (65536, "<64K"), (65537, "64K")):
        if n < limit:
            return name
    if n < 262144:
        return "<256K"
    return "256K" if n == 262144 else ">256K"


def dump(*_: Any) -> None:
    out = Path(os.environ["PYTUNNEL_COUNTERS"]) / f"{os.getpid()}.json"
    out.write_text(json.dumps(dict(C)))


def _written(data: Any, n: int) -> tuple[int, bool]:
    """What an ``os.write`` moved, and whether it took only part of ``data``."""
    return n, n < len(data)


def _read(size: int, got: bytes) -> tuple[int, bool]:
    """What an ``os.read`` moved, and whether it filled its ``size`` (more may wait)."""
    return len(got), len(got) == size


def _counted(
    real: Callable[[int, Any], Any],
    op: str,
    flag: str,
    outcome: Callable[[Any, Any], tuple[int, bool]],
) -> Callable[[int, Any], Any]:
    """``real`` (``os.read`` or ``os.write``) counting ``{kind}.{op}``, its bytes, its
    ``eagain`` and its ``flag`` per kind of descriptor (``session`` or ``target``), as
    ``outcome(argument, result)`` tells the bytes moved and whether to count ``flag``."""

    def counted(fd: int, arg: Any) -> Any:
        kind = "session" if fd in SESSION_FDS else "target"
        try:
            result = real(fd, arg)
        except BlockingIOError:
            C[f"{kind}.{op}.eagain"] += 1
            raise
        moved, flagged = outcome(arg, result)
        C[f"{kind}.{op}"] += 1
        C[f"{kind}.{op}.bytes"] += moved
        if flagged:
            C[f"{kind}.{op}.{flag}"] += 1
        return result

    return counted


def install() -> None:
    import trio

    from pytunnel import _relay, session
    from pytunnel._stream import MuxStream
    from pytunnel.protocol import mux

    os.write = _counted(os.write, "write", "partial", _written)
    os.read = _counted(os.read, "read", "full", _read)

    real_init = session.Session.__init__

    def init(self: Any, transport: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, transport, *args, **kwargs)
        sock = getattr(transport, "socket", None)
        if sock is not None:
            SESSION_FDS.add(sock.fileno())

    session.Session.__init__ = init  # type: ignore[method-assign]

    real_send_all = trio.SocketStream.send_all

    async def send_all(self: Any, data: Any) -> None:
        kind = "session" if self.socket.fileno() in SESSION_FDS else "target"
        C[f"{kind}.send_all"] += 1
        C[f"{kind}.send_all.bytes"] += len(data)
        await real_send_all(self, data)

    trio.SocketStream.send_all = send_all  # type: ignore[method-assign]

    real_append = mux.append_data_frame

    def append_data_frame(out: Any, stream_id: int, data: Any, limit: int) -> None:
        C["data_frames.sent"] += 1
        C["data_frames.sent.bytes"] += len(data)
        C["data_frames.sent." + _bucket(len(data))] += 1
        real_append(out, stream_id, data, limit)

    mux.append_data_frame = append_data_frame  # type: ignore[assignment]

    real_emit_control = mux.Multiplexer._emit_control

    def emit_control(self: Any, message: Any) -> None:
        C["control." + type(message).__name__] += 1
        real_emit_control(self, message)

    mux.Multiplexer._emit_control = emit_control  # type: ignore[method-assign]

    real_on_data = mux.Multiplexer._on_data

    def on_data(self: Any, msg: Any) -> Any:
        C["data_frames.received"] += 1
        C["data_frames.received." + _bucket(len(msg.data))] += 1
        return real_on_data(self, msg)

    mux.Multiplexer._on_data = on_data  # type: ignore[method-assign]

    real_data_to_send = mux.Multiplexer.data_to_send

    def data_to_send(self: Any) -> Any:
        data = real_data_to_send(self)
        C["queue.taken"] += 1
        C["queue.taken.bytes"] += len(data)
        return data

    mux.Multiplexer.data_to_send = data_to_send  # type: ignore[method-assign]

    real_feed = mux.Multiplexer.feed

    def feed(self: Any, data: Any) -> None:
        C["session.feed"] += 1
        C["session.feed.bytes"] += len(data)
        real_feed(self, data)

    mux.Multiplexer.feed = feed  # type: ignore[method-assign]

    real_session_send_data = session.Session.send_data

    def session_send_data(self: Any, stream_id: int, data: Any) -> None:
        C["queued_by.send_all"] += 1
        C["queued_by.send_all.bytes"] += len(data)
        real_session_send_data(self, stream_id, data)

    session.Session.send_data = session_send_data  # type: ignore[method-assign]

    real_nowait = session.Session.send_data_nowait

    def send_data_nowait(self: Any, stream_id: int, data: Any) -> int:
        n: int = real_nowait(self, stream_id, data)
        C["queued_by.direct"] += 1
        C["queued_by.direct.bytes"] += n
        if n == 0:
            C["queued_by.direct.none"] += 1
        elif n < len(data):
            C["queued_by.direct.partial"] += 1
        return n

    session.Session.send_data_nowait = send_data_nowait  # type: ignore[method-assign]

    real_has_room = session.Session.has_room

    def has_room(self: Any, size: int) -> bool:
        room: bool = real_has_room(self, size)
        if not room:
            C["sender.no_room"] += 1
        return room

    session.Session.has_room = has_room  # type: ignore[method-assign]

    real_kick = session.Session._kick_writer

    def kick(self: Any) -> None:
        C["kick"] += 1
        real_kick(self)

    session.Session._kick_writer = kick  # type: ignore[method-assign]

    real_senders = MuxStream._senders

    def senders(self: Any) -> Any:
        C["sender.window_wait"] += 1
        return real_senders(self)

    MuxStream._senders = senders  # type: ignore[method-assign]

    real_deliver = MuxStream.deliver_data

    def deliver_data(self: Any, data: bytes) -> None:
        before = self.bytes_delivered_directly
        real_deliver(self, data)
        taken = self.bytes_delivered_directly - before
        C["deliver"] += 1
        C["deliver.direct.bytes"] += taken
        if taken < len(data):
            C["deliver.buffered"] += 1
            C["deliver.buffered.bytes"] += len(data) - taken

    MuxStream.deliver_data = deliver_data  # type: ignore[method-assign]

    real_receive_some = MuxStream.receive_some

    async def receive_some(self: Any, max_bytes: int | None = None) -> bytes:
        got: bytes = await real_receive_some(self, max_bytes)
        C["stream.receive_some"] += 1
        C["stream.receive_some.bytes"] += len(got)
        return got

    MuxStream.receive_some = receive_some  # type: ignore[method-assign]

    real_send_rest = _relay._send_rest

    async def send_rest(sink: Any, chunk: Any, taken: int, paced: Any, ending: Any) -> None:
        C["relay.send_rest"] += 1
        C["relay.send_rest.bytes"] += len(chunk) - taken
        await real_send_rest(sink, chunk, taken, paced, ending)

    _relay._send_rest = send_rest  # type: ignore[assignment]

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            C["trio.task_steps"] += 1
            C["trio.steps." + task.name.rsplit(".", 1)[-1]] += 1

        def before_io_wait(self, timeout: float) -> None:
            C["trio.io_waits"] += 1

    real_run = session.Session._run
    added: list[bool] = []

    async def run(self: Any) -> None:
        if not added:
            added.append(True)
            trio.lowlevel.add_instrument(Steps())
        await real_run(self)

    session.Session._run = run  # type: ignore[method-assign]

    signal.signal(signal.SIGUSR1, dump)

"""Reading a plain TCP socket without trio's per-call machinery, for the two hot readers.

``trio.SocketStream.receive_some`` is correct for any caller: it detects two tasks receiving
at once, translates ``OSError`` into the stream errors through a context manager, tries the
read, raises and catches ``BlockingIOError`` when there is nothing, then waits. For a 64-byte
message that is a large part of what a process spends on it. A relay's pump and a session's
reader are each the only reader of their socket, and know something trio cannot: after a read
that returned less than it asked for, the socket is empty, so the next read can wait for
readability first instead of failing once. :class:`SocketReader` is that: a non-blocking read
and a wait, with the same errors ``receive_some`` raises.

A loop built on it must checkpoint on its own now and then (see :data:`MAX_STREAK`): a read
that finds data does not yield, so a socket that is always readable would otherwise keep its
reader running and every other task waiting.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Protocol

import trio

from .errors import caused_by

__all__ = [
    "MAX_STREAK",
    "DirectReader",
    "HasFileno",
    "PacedReads",
    "SocketReader",
    "raw_socket",
    "write_now",
]

#: Reads in a row without a wait after which a reader yields (``trio.lowlevel.checkpoint``):
#: a busy connection still lets the others run, and sees its cancellation, within this many
#: reads, while a connection that waits between messages never pays for the checkpoint.
MAX_STREAK = 8

# what trio.SocketStream reports as "we closed it" rather than as a broken connection
_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


class HasFileno(Protocol):
    def fileno(self) -> int: ...


def raw_socket(sock: object) -> HasFileno:
    """What to ask for a trio socket's descriptor once per read or write: the standard socket
    trio's wraps (its ``fileno`` is C; trio's is a Python method around it), or ``sock``
    itself if that is not there. Closing the trio socket closes that one: ``fileno()`` is -1
    then, as trio's is."""
    inner = getattr(sock, "_sock", None)
    if type(inner) is socket.socket:
        return inner
    assert hasattr(sock, "fileno")
    return sock


def write_now(sock: HasFileno, data: bytes | bytearray | memoryview) -> int:
    """What the socket takes of ``data`` without blocking: the bytes written, 0 when it would
    block, is closed or broke (a direct writer's contract: the caller falls back to
    ``send_all``, which waits, or reports the broken connection itself).

    The descriptor is asked for on every write: -1 once the socket was closed, never one a
    later socket reused."""
    fd = sock.fileno()
    if fd < 0:
        return 0
    try:
        return os.write(fd, data)
    except OSError:  # BlockingIOError included
        return 0


class DirectReader(Protocol):
    """Reads a source without trio's per-call machinery (:class:`SocketReader` for a plain
    socket): ``receive_nowait`` returns a chunk, ``b""`` at EOF, or ``None`` when nothing is
    there, and ``wait`` returns once there may be; both raise what ``receive_some`` raises."""

    def receive_nowait(self, max_bytes: int) -> bytes | None: ...

    async def wait(self) -> None: ...

    def fileno(self) -> int:
        """The descriptor ``wait`` waits on (-1 once closed): trio's ``notify_closing`` on
        it interrupts the wait with ``ClosedResourceError``, which is how a wrapper ends a
        wait without a cancel scope around each one."""
        ...


class PacedReads:
    """The read loop both hot readers share, over a :class:`DirectReader`: after a short read
    (the source was emptied) a wait first instead of a read that fails, and a checkpoint
    after :data:`MAX_STREAK` reads in a row that found data, so a source that is always
    readable keeps its reader neither running for ever nor deaf to its cancellation.

    ``streak`` may be reset by a caller that checkpoints on its own between reads."""

    __slots__ = ("_drained", "_reader", "streak")

    def __init__(self, reader: DirectReader) -> None:
        self._reader = reader
        self._drained = False
        self.streak = 0

    async def receive_some(self, max_bytes: int) -> bytes:
        """The next chunk of at most ``max_bytes`` (``b""`` at EOF), as ``receive_some``."""
        reader = self._reader
        while True:
            if self._drained:
                await reader.wait()
                self.streak = 0
            elif self.streak >= MAX_STREAK:
                await trio.lowlevel.checkpoint()
                self.streak = 0
            got = reader.receive_nowait(max_bytes)
            if got is not None:
                break
            self._drained = True
        self._drained = len(got) < max_bytes
        self.streak += 1
        return got


class SocketReader:
    """Non-blocking reads of one trio socket, for its only reader.

    :meth:`receive_nowait` returns what ``receive_some`` would (``b""`` at EOF) or ``None``
    when nothing is there yet; :meth:`wait` returns once the socket may be readable. Both
    raise ``ClosedResourceError`` once the socket was closed here and ``BrokenResourceError``
    (its ``__cause__`` the ``OSError``) when the connection broke, as ``receive_some`` does.
    """

    __slots__ = ("_sock",)

    def __init__(self, sock: trio.socket.SocketType) -> None:
        # asked for its descriptor on every read: the standard socket's answer costs no
        # Python call
        self._sock: HasFileno = raw_socket(sock)

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        # the descriptor is read each time: -1 once closed, never one reused by someone else
        fd = self._sock.fileno()
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _CLOSED_ERRNOS:
                raise caused_by(
                    trio.ClosedResourceError("this socket was already closed"), None
                ) from None
            raise caused_by(
                trio.BrokenResourceError(f"socket connection broken: {exc}"), exc
            ) from exc

    def fileno(self) -> int:
        return self._sock.fileno()

    async def wait(self) -> None:
        """Until the socket is readable (data, EOF or an error to read); a checkpoint."""
        fd = self._sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("this socket was already closed")
        # the descriptor, not the socket: trio would ask the socket for it again; closing the
        # socket still wakes the wait (trio keys its waits by descriptor)
        await trio.lowlevel.wait_readable(fd)


def socket_reader(stream: object) -> SocketReader | None:
    """A :class:`SocketReader` for a plain ``trio.SocketStream`` on POSIX (where ``os.read``
    reads a socket), else ``None``."""
    if isinstance(stream, trio.SocketStream) and os.name == "posix":
        return SocketReader(stream.socket)
    return None

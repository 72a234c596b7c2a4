"""stdin and stdout as one trio stream, for ``pytunnel connect --stdio HOST:PORT``.

That makes pytunnel usable as an OpenSSH ``ProxyCommand`` (as ``ssh -W`` and chisel's
``stdio:`` remote are): ssh talks to our stdin and stdout, and we relay them to one stream
through the tunnel.

stdout carries the relayed bytes, so nothing else may write to it: :func:`take_stdio` moves
the process's stdout to a private descriptor and points descriptor 1 at stderr, so a stray
print lands in the log instead of corrupting the stream, and closing our copy is a real EOF for
the reader (no other descriptor keeps the pipe open).
"""

from __future__ import annotations

import os

import trio

from .._relay import RelayStats, relay

__all__ = ["open_stdio_stream", "relay_stdio", "take_stdio"]


def take_stdio() -> tuple[int, int]:
    """Take stdin and stdout for a relay: ``(stdin, stdout)`` descriptors of our own, with
    descriptor 1 now writing to stderr (see the module docstring)."""
    stdin = os.dup(0)
    stdout = os.dup(1)
    os.dup2(2, 1)
    return stdin, stdout


def open_stdio_stream(
    stdin: int, stdout: int
) -> trio.StapledStream[trio.lowlevel.FdStream, trio.lowlevel.FdStream]:
    """A stream that receives from descriptor ``stdin`` and sends to ``stdout``, owning
    both (trio's ``FdStream``: set non-blocking, closed with the stream). Its ``send_eof``
    closes ``stdout``, so the reader there sees the end while stdin is still read."""
    return trio.StapledStream(trio.lowlevel.FdStream(stdout), trio.lowlevel.FdStream(stdin))


async def relay_stdio(
    remote: trio.abc.HalfCloseableStream, stdin: int, stdout: int, *, idle_timeout: float
) -> RelayStats:
    """Relay descriptors ``stdin``/``stdout`` (owned from now on) to ``remote`` until both
    directions ended or either broke; everything is closed on return."""
    try:
        local = open_stdio_stream(stdin, stdout)
    except BaseException:
        os.close(stdin)
        os.close(stdout)
        await trio.aclose_forcefully(remote)
        raise
    stats = RelayStats()
    await relay(local, remote, idle_timeout=idle_timeout, stats=stats, name="stdio")
    return stats

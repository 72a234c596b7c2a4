"""``pytunnel connect`` on a terminal: a live table of the forwards, redrawn every 2 s.

Shown only when stdout is a terminal (pipes, systemd and CI get the plain lines and logs) and
not ``--quiet``. It reads the tunnel's public state and the forwards' counters, like
``pytunnel status``; the current rate is the difference between two redraws. While the link is
down it says so, and since when; log lines printed meanwhile scroll above the table. Before
the first connection, :func:`show_waiting` says which server it waits for, since when.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

import pytunnel

from ._declared import DeclaredForwards, bind_of

#: Seconds between redraws: often enough to follow a transfer, rare enough to cost nothing.
REFRESH = 2.0


def _size(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    raise AssertionError  # pragma: no cover


class LiveView:
    """What the table shows, and what it needs to remember between redraws (the counters of
    the last one, for the rates; when the link last changed)."""

    def __init__(self, tunnel: pytunnel.Tunnel, forwards: DeclaredForwards, server: str) -> None:
        self.tunnel = tunnel
        self.forwards = forwards
        self.server = server
        self._last: dict[str, tuple[float, int, int]] = {}
        self._connected = tunnel.connected
        self._since = time.time()

    def render(self) -> Group:
        now = time.time()
        tunnel = self.tunnel
        if tunnel.connected != self._connected:
            self._connected, self._since = tunnel.connected, now
        since = time.strftime("%H:%M:%S", time.localtime(self._since))
        server = tunnel.server or self.server  # with several addresses, the one reached
        if tunnel.connected:
            rtt = f", rtt {tunnel.rtt * 1000:.1f} ms" if tunnel.rtt is not None else ""
            head = Text(f"link up to {server} since {since}{rtt}", style="green")
        else:
            head = Text(f"link down since {since}: reconnecting to {server}", style="bold yellow")
        head.append(f"  reconnects {tunnel.reconnects}", style="dim")
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("id", "name", "kind", "bind", "target", "status", "conns"):
            table.add_column(column)
        for column in ("out", "in", "rate"):
            table.add_column(column, justify="right")
        table.add_column("last error")
        for entry in self.forwards.running:
            forward = entry.forward
            stats = forward.stats
            then, out, back = self._last.get(entry.id, (now, stats.bytes_out, stats.bytes_in))
            elapsed = max(now - then, 1e-9)
            rate = (stats.bytes_out - out + stats.bytes_in - back) / elapsed if now > then else 0
            self._last[entry.id] = (now, stats.bytes_out, stats.bytes_in)
            status = forward.status.value
            style = {"active": "green", "error": "red", "suspended": "yellow"}.get(status, "")
            table.add_row(
                entry.id,
                entry.declared.name or "-",
                forward.kind.name.lower(),
                bind_of(forward),
                "socks" if forward.kind is pytunnel.ForwardKind.DYNAMIC else forward.target,
                Text(status, style=style),
                f"{stats.active_connections}/{stats.total_connections}",
                _size(stats.bytes_out),
                _size(stats.bytes_in),
                f"{_size(rate)}/s",
                _last_error(forward),
            )
        return Group(head, table)


def _last_error(forward: pytunnel.Forward) -> str:
    if forward.status in (pytunnel.ForwardStatus.ERROR, pytunnel.ForwardStatus.OFFLINE):
        return forward.reason
    errors = forward.stats.errors
    return ", ".join(f"{k} x{v}" for k, v in sorted(errors.items())) or "-"


async def show_live(tunnel: pytunnel.Tunnel, forwards: DeclaredForwards, server: str) -> None:
    """Redraw the table every :data:`REFRESH` seconds until cancelled."""
    view = LiveView(tunnel, forwards, server)
    console = Console(file=sys.stdout)
    with Live(view.render(), console=console, auto_refresh=False, redirect_stderr=True) as live:
        # log handlers hold the stderr they were made with; point them at the live console's
        # proxy so a log line scrolls above the table instead of through it
        moved = _repoint_logs(sys.stderr)
        try:
            while True:
                await trio.sleep(REFRESH)
                live.update(view.render(), refresh=True)
        finally:
            _repoint_logs(None, moved)


class _Waiting:
    """A line that says what the command waits for, since when and for how long; rendered
    afresh at each refresh, so the count of seconds moves while nothing else does."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since = time.time()

    def __rich__(self) -> Text:
        since = time.strftime("%H:%M:%S", time.localtime(self.since))
        waited = time.time() - self.since
        return Text(f"{self.what} since {since} ({waited:.0f} s)", style="bold yellow")


@contextlib.contextmanager
def show_waiting(what: str) -> Iterator[None]:
    """Say ``what`` the command waits for (the first connection to the server) until the
    block ends, then take the line away.

    The line is redrawn by rich's own refresh thread: the block is one ``await`` of the
    event loop (entering ``open_tunnel``), with no task of its own to redraw it."""
    console = Console(file=sys.stdout)
    with Live(
        _Waiting(what),
        console=console,
        refresh_per_second=2,
        transient=True,
        redirect_stderr=True,
    ):
        moved = _repoint_logs(sys.stderr)
        try:
            yield
        finally:
            _repoint_logs(None, moved)


def _repoint_logs(
    stream: Any, restore: list[tuple[logging.StreamHandler[Any], Any]] | None = None
) -> list[tuple[logging.StreamHandler[Any], Any]]:
    if restore is not None:
        for handler, original in restore:
            handler.setStream(original)
        return []
    moved: list[tuple[logging.StreamHandler[Any], Any]] = []
    for each in logging.getLogger().handlers:
        if isinstance(each, logging.StreamHandler) and each.stream is sys.__stderr__:
            moved.append((each, each.setStream(stream)))
    return moved

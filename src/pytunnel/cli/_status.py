"""``connect --status-interval``: a periodic summary of every forward and of the link.

Reads only the tunnel's public state; never changes it.
"""

from __future__ import annotations

import trio

import pytunnel

from ._output import say


def format_status(tunnel: pytunnel.Tunnel) -> list[str]:
    """One compact line per forward: status, connections, bytes each way, errors."""
    lines = []
    for fwd in sorted(tunnel.forwards, key=lambda f: (f.kind, f.listen_port)):
        stats = fwd.stats
        errors = ",".join(f"{k}={v}" for k, v in sorted(stats.errors.items())) or "-"
        dropped = f" dropped={stats.datagrams_dropped}" if fwd.kind.udp else ""
        limit = f" limit={fwd.limit / 1e6:g}MB/s" if fwd.limit is not None else ""
        member = f" group={fwd.group[0]}" if fwd.group is not None else ""
        lines.append(
            f"status {fwd.kind} {pytunnel.format_target(*fwd.address)} -> {fwd.target}: "
            f"{fwd.status.value} conns={stats.active_connections}/{stats.total_connections} "
            f"out={stats.bytes_out} in={stats.bytes_in} errors={errors}{dropped}{limit}{member}"
        )
    link = "up" if tunnel.connected else "down"
    rtt = f"{tunnel.rtt * 1000:.1f} ms" if tunnel.rtt is not None else "-"
    lines.append(f"status link {link} rtt={rtt} reconnects={tunnel.reconnects}")
    return lines


async def print_status(tunnel: pytunnel.Tunnel, interval: float) -> None:
    """Print :func:`format_status` every ``interval`` seconds, until cancelled."""
    while True:
        await trio.sleep(interval)
        for line in format_status(tunnel):
            say(line)

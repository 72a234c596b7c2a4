"""Session throughput over real loopback TCP, against a plain trio socket copy in the same run.

Every case builds a fresh TCP connection on 127.0.0.1 (both ends in this process, in one
``trio.run``, so the numbers are the CPU cost of *both* ends on one core) and moves bulk bytes
one way:

* ``plain``          -- trio ``SocketStream`` to ``SocketStream``: ``send_all`` of ``--chunk``
  byte chunks, the receiver loops ``receive_some(--recv-size)``. The baseline.
* ``session x1``     -- the same bytes through ONE stream of a pytunnel session
  (``open_session`` with ``Role.CLIENT`` / ``Role.SERVER``, no handshake).
* ``session x8``     -- the same total split over 8 streams sending in parallel.

A case stops after ``--mib`` MiB or ``--seconds`` seconds, whichever comes first (the sender
then sends EOF/Fin and the receiver's clock stops at EOF), so each measurement is bounded in
bytes and time. Cases are interleaved and repeated ``--repeat`` times; the table shows the
median, the spread, and the ratio to the plain copy's median. MB/s means 10**6 bytes/s of
application payload.

Modes:

    bench_session.py                 # plain vs session x1 vs session x8 (the table)
    bench_session.py --window-sweep  # session x1 for window 64K..16M
    bench_session.py --chunk-sweep   # session x1 for max_data_chunk 16K/64K/256K
    bench_session.py --wbh-sweep     # session x1 for write_buffer_high 64K..4M
    bench_session.py --profile       # cProfile (or --profiler pyinstrument) of session x1
    bench_session.py --latency       # 64-byte echo round trips: plain vs session stream
    --quick                          # 64 MiB / 2 s per case, 1 repeat (rough)

Session parameters can be fixed for any mode with --window, --max-data-chunk,
--write-buffer-high and --receive-size.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import shlex
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from pytunnel.session import Role, SessionConfig, open_session

KiB = 1024
MiB = 1024 * KiB
#: Hard ceiling for one case on top of --seconds (setup, drain, teardown).
CASE_SLACK = 30.0


def parse_size(text: str) -> int:
    """``65536``, ``64K``, ``64KiB``, ``1M``, ``16MiB`` -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t.endswith("K"):
        mult, t = KiB, t[:-1]
    elif t.endswith("M"):
        mult, t = MiB, t[:-1]
    value = int(float(t) * mult)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text}")
    return value


def fmt_size(n: int) -> str:
    if n % MiB == 0:
        return f"{n // MiB} MiB"
    if n % KiB == 0:
        return f"{n // KiB} KiB"
    return f"{n} B"


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of a loopback TCP connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    try:
        port = listener.socket.getsockname()[1]
        box: list[trio.SocketStream] = []

        async def dial() -> None:
            box.append(await trio.open_tcp_stream("127.0.0.1", port))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dial)
            server = await listener.accept()
        return box[0], server
    finally:
        for lst in listeners:
            await lst.aclose()


# --------------------------------------------------------------------------- copy loops


async def pump(
    stream: trio.abc.SendStream, total: int, chunk: bytes, deadline: float, sent: list[int]
) -> None:
    """Send ``total`` bytes in ``chunk`` pieces or until ``deadline``, then EOF."""
    n = 0
    size = len(chunk)
    max_iters = total // size + 1
    for _ in range(max_iters):
        if n >= total or trio.current_time() >= deadline:
            break
        piece = chunk if total - n >= size else chunk[: total - n]
        await stream.send_all(piece)
        n += len(piece)
    sent[0] += n
    await stream.send_eof()  # type: ignore[attr-defined]


async def drain(stream: trio.abc.ReceiveStream, recv_size: int, got: list[int], limit: int) -> None:
    """Receive until EOF; ``limit`` bounds the number of reads."""
    n = 0
    for _ in range(limit):
        data = await stream.receive_some(recv_size)
        if not data:
            break
        n += len(data)
    else:
        raise RuntimeError("drain: read limit reached before EOF")
    got[0] += n


def read_limit(total: int) -> int:
    # Even 1-byte reads could not exceed this; a generous bound that still ends the loop.
    return total + 1000


class DelayStream(trio.abc.HalfCloseableStream):
    """Delivers what ``inner`` receives ``delay`` seconds late: a one-way latency line.

    Used with ``--rtt-ms`` to see the window's effect once a round trip costs more than a few
    microseconds (half the RTT is added on each end's receive side). A background task reads
    eagerly from ``inner``; the session's flow-control window is what bounds the bytes held.
    """

    def __init__(self, inner: trio.SocketStream, delay: float) -> None:
        self._inner = inner
        self._delay = delay
        self._send, self._recv = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        self._rest = b""

    async def run(self) -> None:
        """The reader; start it in a nursery that outlives the stream's use."""
        try:
            for _ in range(10**8):  # bounded; ends at EOF or close well before
                try:
                    data = await self._inner.receive_some(256 * KiB)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                self._send.send_nowait((trio.current_time() + self._delay, data))
                if not data:
                    break
        finally:
            self._send.close()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._rest:
            try:
                when, self._rest = await self._recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return b""
            await trio.sleep_until(when)
            if not self._rest:
                return b""
        n = len(self._rest) if max_bytes is None else max_bytes
        data, self._rest = self._rest[:n], self._rest[n:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()
        self._recv.close()


# --------------------------------------------------------------------------- cases


async def case_plain(args: argparse.Namespace, streams: int) -> tuple[int, float, float]:
    """``streams`` independent plain TCP connections (1 is the baseline)."""
    pairs = [await tcp_pair() for _ in range(streams)]
    chunk = b"x" * args.chunk
    sent, got = [0], [0]
    per = args.bytes // streams
    try:
        with trio.fail_after(args.seconds + CASE_SLACK):
            start = trio.current_time()
            cpu0 = time.process_time()
            deadline = start + args.seconds
            async with trio.open_nursery() as nursery:
                for a, b in pairs:
                    nursery.start_soon(pump, a, per, chunk, deadline, sent)
                    nursery.start_soon(drain, b, args.recv_size, got, read_limit(per))
            elapsed = trio.current_time() - start
            cpu = time.process_time() - cpu0
    finally:
        for a, b in pairs:
            await a.aclose()
            await b.aclose()
    assert got[0] == sent[0], (got, sent)
    return got[0], elapsed, cpu


def session_config(args: argparse.Namespace, **override: int) -> SessionConfig:
    kw: dict[str, int] = {}
    for name in ("window", "max_data_chunk", "write_buffer_high", "receive_size"):
        value = override.get(name, getattr(args, name))
        if value is not None:
            kw[name] = value
    if kw.get("max_data_chunk", 0) + 64 > SessionConfig().max_frame_size:
        kw["max_frame_size"] = kw["max_data_chunk"] + 1024
    return SessionConfig(**kw)


def _tls_contexts() -> tuple[Any, Any]:
    """A throwaway CA and certificate (trustme, a test dependency) for the TLS cases."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


#: The TLS transports the ``--tls`` cases compare: trio.SSLStream (memory BIOs, what the
#: control connection used before issue 12 and still uses over non-socket streams) and
#: TLSSocketStream (OpenSSL on the socket, what ``tls_connect``/``tls_accept`` pick over TCP).
TLS_KINDS = ("ssl-stream", "socket")


async def tls_pair(
    sock_a: trio.SocketStream, sock_b: trio.SocketStream, kind: str
) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """Both ends of ``sock_a``/``sock_b`` wrapped in TLS of ``kind``, handshake done."""
    from pytunnel._tls_stream import wrap_socket_stream

    server_ctx, client_ctx = _tls_contexts()
    tls_a: Any
    tls_b: Any
    if kind == "ssl-stream":
        tls_a = trio.SSLStream(sock_a, client_ctx, server_hostname="localhost")
        tls_b = trio.SSLStream(sock_b, server_ctx, server_side=True)
    else:
        tls_a = wrap_socket_stream(
            sock_a, client_ctx, server_side=False, server_hostname="localhost"
        )
        tls_b = wrap_socket_stream(sock_b, server_ctx, server_side=True)
    async with trio.open_nursery() as handshakes:
        handshakes.start_soon(tls_a.do_handshake)
        handshakes.start_soon(tls_b.do_handshake)
    return tls_a, tls_b


async def case_session(
    args: argparse.Namespace, streams: int, config: SessionConfig, *, tls: str | None = None
) -> tuple[int, float, float]:
    """``streams`` streams of one session, each sending total/streams bytes client -> server.

    ``tls``: the session runs inside TLS of that kind (``TLS_KINDS``) on both ends (the
    control connection's TLS), handshake done before the clock starts."""
    sock_a, sock_b = await tcp_pair()
    a: trio.abc.Stream = sock_a
    b: trio.abc.Stream = sock_b
    if tls:
        a, b = await tls_pair(sock_a, sock_b, tls)
    chunk = b"x" * args.chunk
    sent, got = [0], [0]
    per = args.bytes // streams
    with trio.fail_after(args.seconds + CASE_SLACK):
        async with trio.open_nursery() as delay_nursery:
            if args.rtt_ms > 0:
                a = DelayStream(sock_a, args.rtt_ms / 2000)
                b = DelayStream(sock_b, args.rtt_ms / 2000)
                delay_nursery.start_soon(a.run)
                delay_nursery.start_soon(b.run)
            result = await _session_body(args, streams, config, a, b, per, chunk, sent, got)
            delay_nursery.cancel_scope.cancel()
    assert got[0] == sent[0], (got, sent)
    return result


async def _session_body(
    args: argparse.Namespace,
    streams: int,
    config: SessionConfig,
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    per: int,
    chunk: bytes,
    sent: list[int],
    got: list[int],
) -> tuple[int, float, float]:
    async with (
        open_session(a, Role.CLIENT, config, name="client") as client,
        open_session(b, Role.SERVER, config, name="server") as server,
    ):
        senders = []
        receivers = []
        for _ in range(streams):
            async with trio.open_nursery() as nursery:
                box: list[Any] = []

                async def accept(box: list[Any] = box) -> None:
                    box.append((await server.accept_stream()).accept())

                nursery.start_soon(accept)
                senders.append(await client.open_stream("bench", 0, 0))
            receivers.append(box[0])
        start = trio.current_time()
        cpu0 = time.process_time()
        deadline = start + args.seconds
        async with trio.open_nursery() as nursery:
            for s, r in zip(senders, receivers, strict=True):
                nursery.start_soon(pump, s, per, chunk, deadline, sent)
                nursery.start_soon(drain, r, args.recv_size, got, read_limit(per))
        elapsed = trio.current_time() - start
        cpu = time.process_time() - cpu0
        for s, r in zip(senders, receivers, strict=True):
            await s.aclose()
            await r.aclose()
    return got[0], elapsed, cpu


# --------------------------------------------------------------------------- latency

PING_SIZE = 64


async def _ping_loop(
    client: trio.abc.Stream, server: trio.abc.Stream, rounds: int, deadline: float
) -> int:
    """Client sends PING_SIZE bytes, server echoes them; returns round trips completed."""
    msg = b"p" * PING_SIZE
    done = 0

    async def echo() -> None:
        for _ in range(rounds * PING_SIZE + 1):  # bounded: each turn moves >= 1 byte
            data = await server.receive_some(PING_SIZE)
            if not data:
                return
            await server.send_all(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        for _ in range(rounds):
            if trio.current_time() >= deadline:
                break
            await client.send_all(msg)
            need = PING_SIZE
            for _ in range(PING_SIZE):  # bounded: each read returns >= 1 byte
                data = await client.receive_some(need)
                if not data:
                    raise RuntimeError("echo ended early")
                need -= len(data)
                if not need:
                    break
            done += 1
        await client.send_eof()  # type: ignore[attr-defined]
    return done


async def case_ping_plain(
    args: argparse.Namespace, _streams: int = 1, _config: SessionConfig | None = None
) -> tuple[int, float, float]:
    a, b = await tcp_pair()
    try:
        with trio.fail_after(args.seconds + CASE_SLACK):
            start, cpu0 = trio.current_time(), time.process_time()
            n = await _ping_loop(a, b, args.pings, start + args.seconds)
            return n, trio.current_time() - start, time.process_time() - cpu0
    finally:
        await a.aclose()
        await b.aclose()


async def case_ping_session(
    args: argparse.Namespace, _streams: int, config: SessionConfig, *, tls: str | None = None
) -> tuple[int, float, float]:
    sock_a, sock_b = await tcp_pair()
    a: trio.abc.Stream = sock_a
    b: trio.abc.Stream = sock_b
    if tls:
        a, b = await tls_pair(sock_a, sock_b, tls)
    with trio.fail_after(args.seconds + CASE_SLACK):
        async with (
            open_session(a, Role.CLIENT, config, name="client") as client,
            open_session(b, Role.SERVER, config, name="server") as server,
        ):
            async with trio.open_nursery() as nursery:
                box: list[Any] = []

                async def accept() -> None:
                    box.append((await server.accept_stream()).accept())

                nursery.start_soon(accept)
                c = await client.open_stream("bench", 0, 0)
            start, cpu0 = trio.current_time(), time.process_time()
            n = await _ping_loop(c, box[0], args.pings, start + args.seconds)
            result = n, trio.current_time() - start, time.process_time() - cpu0
            await c.aclose()
            await box[0].aclose()
    return result


async def run_latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Round trips of PING_SIZE bytes: plain sockets against one session stream."""
    from _quiet import wait_quiet

    cfg = session_config(args)
    cases: list[Case] = [
        ("plain trio sockets", lambda: case_ping_plain(args)),
        ("session stream", lambda: case_ping_session(args, 1, cfg)),
    ]
    if args.tls:
        for kind in TLS_KINDS:
            cases.append(
                (
                    f"session stream over TLS ({kind})",
                    lambda kind=kind: case_ping_session(args, 1, cfg, tls=kind),
                )
            )
    us: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _name, fn in cases:  # warm-up
        await fn()
    for rep in range(args.repeat):
        for name, fn in cases:
            if args.quiet_wait > 0:
                wait_quiet(args.quiet_wait)
            n, elapsed, _cpu = await fn()
            us[name].append(elapsed / max(n, 1) * 1e6)
            each = us[name][-1]
            print(f"  [{rep + 1}/{args.repeat}] {name:<36} {n} round trips, {each:.1f} us each")
    print(f"\nLatency: {PING_SIZE}-byte echo round trips ({args.pings} per sample)")
    header = f"{'case':<36}{'us/round trip':>15}{'min..max':>16}{'vs plain':>10}"
    print(header)
    print("-" * len(header))
    base = statistics.median(us[cases[0][0]])
    rows = []
    for name, vals in us.items():
        med = statistics.median(vals)
        spread = f"{min(vals):.1f}..{max(vals):.1f}"
        print(f"{name:<36}{med:>15.1f}{spread:>16}{med / base:>9.2f}x")
        rows.append({"case": name, "us_per_round_trip": med, "samples": vals})
    return rows


# --------------------------------------------------------------------------- driver

Case = tuple[str, Callable[[], Awaitable[tuple[int, float, float]]]]


async def run_cases(
    cases: list[Case], args: argparse.Namespace
) -> dict[str, dict[str, list[float]]]:
    """Run every case ``repeat`` times, interleaved; return MB/s and MB/CPU-s samples per case.

    Before each sample, wait (at most ``--quiet-wait`` s) for other processes to leave the CPUs.
    """
    from _quiet import wait_quiet

    samples: dict[str, dict[str, list[float]]] = {
        name: {"wall": [], "cpu": [], "busy": []} for name, _ in cases
    }
    repeat = args.repeat
    full = args.bytes
    args.bytes = min(full, 16 * MiB)
    try:
        for _name, fn in cases:  # warm-up (not recorded): cattrs' lazily generated hooks etc.
            await fn()
    finally:
        args.bytes = full
    for rep in range(repeat):
        for name, fn in cases:
            busy = wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
            nbytes, elapsed, cpu = await fn()
            rate = nbytes / elapsed / 1e6
            samples[name]["wall"].append(rate)
            samples[name]["cpu"].append(nbytes / max(cpu, 1e-6) / 1e6)
            samples[name]["busy"].append(busy)
            print(
                f"  [{rep + 1}/{repeat}] {name:<36} {nbytes / MiB:7.1f} MiB in {elapsed:5.2f} s"
                f" = {rate:7.1f} MB/s  (cpu {cpu:5.2f} s, others busy {busy:4.0%} before)",
                flush=True,
            )
            await trio.sleep(0.05)  # let the kernel settle the closed sockets
    return samples


def print_table(
    title: str, samples: dict[str, dict[str, list[float]]], base_name: str
) -> list[dict[str, Any]]:
    """Median MB/s (wall clock) and MB per CPU-second, with ratios to ``base_name``.

    ``ratio`` is median/median; ``paired`` is the median over repetitions of (this sample /
    the baseline sample of the same repetition), which cancels slow drifts in machine speed
    since the cases of one repetition run back to back.
    """
    base_wall = statistics.median(samples[base_name]["wall"])
    base_cpu = statistics.median(samples[base_name]["cpu"])
    print()
    print(title)
    header = (
        f"{'case':<36}{'MB/s':>9}{'min..max':>13}{'ratio':>8}{'paired':>8}"
        f"{'MB/CPU-s':>11}{'ratio':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for name, d in samples.items():
        wall, cpu = statistics.median(d["wall"]), statistics.median(d["cpu"])
        paired = statistics.median(
            a / b for a, b in zip(d["wall"], samples[base_name]["wall"], strict=True)
        )
        spread = f"{min(d['wall']):.0f}..{max(d['wall']):.0f}"
        print(
            f"{name:<36}{wall:>9.1f}{spread:>13}{wall / base_wall:>7.2f}x{paired:>7.2f}x"
            f"{cpu:>11.1f}{cpu / base_cpu:>7.2f}x"
        )
        rows.append(
            {
                "case": name,
                "mb_per_s": wall,
                "ratio": wall / base_wall,
                "paired_ratio": paired,
                "mb_per_cpu_s": cpu,
                "cpu_ratio": cpu / base_cpu,
                "samples": d,
            }
        )
    busy = [b for d in samples.values() for b in d["busy"]]
    contended = sum(b >= 0.10 for b in busy)
    print(
        f"(ratio = median / median of '{base_name}'; paired = median of per-repetition ratios;"
        f" {contended} of {len(busy)} samples started while other processes used >= 10% of the"
        f" CPUs, max {max(busy, default=0):.0%})"
    )
    return rows


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    plain_name = "plain trio socket copy"
    if args.rtt_ms > 0:
        plain_name += " (no added RTT)"
        print(f"session cases run with {args.rtt_ms:g} ms of added round-trip time")
    plain: Case = (plain_name, lambda: case_plain(args, 1))
    sweep: list[tuple[str, list[int]]] = []
    if args.window_sweep:
        sweep.append(("window", args.windows))
    if args.chunk_sweep:
        sweep.append(("max_data_chunk", args.chunks))
    if args.wbh_sweep:
        sweep.append(("write_buffer_high", args.wbhs))
    if args.receive_size_sweep:
        sweep.append(("receive_size", args.receive_sizes))

    if args.latency:
        out["latency"] = await run_latency(args)
        return out

    if not sweep:
        cfg = session_config(args)
        print(f"session config: {cfg}")
        cases: list[Case] = [
            plain,
            ("session, 1 stream", lambda: case_session(args, 1, cfg)),
            ("session, 8 streams", lambda: case_session(args, 8, cfg)),
        ]
        if args.plain8:
            cases.append(("plain, 8 sockets in parallel", lambda: case_plain(args, 8)))
        if args.tls:
            for kind in TLS_KINDS:
                for n in (1, 8):
                    cases.append(
                        (
                            f"session over TLS ({kind}), {n} stream{'s' if n > 1 else ''}",
                            lambda kind=kind, n=n: case_session(args, n, cfg, tls=kind),
                        )
                    )
        samples = await run_cases(cases, args)
        out["main"] = print_table("Throughput (one-way bulk)", samples, plain[0])
        return out

    for param, values in sweep:
        cases = [plain]
        for v in values:
            cfg = session_config(args, **{param: v})
            cases.append(
                (f"session x1 {param}={fmt_size(v)}", lambda cfg=cfg: case_session(args, 1, cfg))
            )
        shown = [fmt_size(v) for v in values]
        print(f"\nsweep over {param}: {shown} (others: {session_config(args)})")
        samples = await run_cases(cases, args)
        out[param] = print_table(f"Sweep: {param}", samples, plain[0])
    return out


def run_profile(args: argparse.Namespace) -> None:
    cfg = session_config(args)
    what = args.profile_case
    print(f"profiling {what}, {fmt_size(args.bytes)} / {args.seconds}s, config {cfg}")

    async def one() -> None:
        if what == "plain":
            nbytes, elapsed, _ = await case_plain(args, 1)
        else:
            nbytes, elapsed, _ = await case_session(args, 8 if what == "session8" else 1, cfg)
        print(f"  {nbytes / MiB:.1f} MiB in {elapsed:.2f} s = {nbytes / elapsed / 1e6:.1f} MB/s")

    if args.profiler == "pyinstrument":
        from pyinstrument import Profiler  # type: ignore[import-not-found]

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
        trio.run(one)
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False, show_all=False))
        return
    prof = cProfile.Profile()
    prof.enable()
    trio.run(one)
    prof.disable()
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(args.top)
        print(f"\n=== top {args.top} by {key} ===")
        text = buf.getvalue()
        print(text[text.find("   ncalls") :] if "   ncalls" in text else text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=float, default=256, help="MiB per case (default 256)")
    parser.add_argument("--seconds", type=float, default=6.0, help="time cap per case")
    parser.add_argument("--repeat", type=int, default=3, help="repeats per case (median)")
    parser.add_argument("--chunk", type=parse_size, default=64 * KiB, help="sender send_all size")
    parser.add_argument("--recv-size", type=parse_size, default=64 * KiB, help="receive_some size")
    parser.add_argument("--quick", action="store_true", help="64 MiB / 2 s per case, 1 repeat")
    parser.add_argument("--plain8", action="store_true", help="also 8 plain sockets in parallel")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also the session over TLS, trio.SSLStream and TLSSocketStream side by side "
        "(1 and 8 streams; with --latency, round trips)",
    )
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=0.0,
        help="add this round-trip latency to the session cases (not to plain), in-process",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="before each sample wait up to this many s for other processes to go idle (0: off)",
    )
    g = parser.add_argument_group("session config (default: SessionConfig defaults)")
    g.add_argument("--window", type=parse_size)
    g.add_argument("--max-data-chunk", type=parse_size)
    g.add_argument("--write-buffer-high", type=parse_size)
    g.add_argument("--receive-size", type=parse_size)
    parser.add_argument(
        "--latency",
        action="store_true",
        help=f"instead: {PING_SIZE}-byte echo round trips, plain sockets vs a session stream",
    )
    parser.add_argument("--pings", type=int, default=5000, help="round trips per latency sample")
    s = parser.add_argument_group("sweeps (single stream)")
    s.add_argument("--window-sweep", action="store_true")
    s.add_argument(
        "--windows",
        type=lambda t: [parse_size(x) for x in t.split(",")],
        default=[64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB],
    )
    s.add_argument("--chunk-sweep", action="store_true", help="sweep max_data_chunk")
    s.add_argument(
        "--chunks",
        type=lambda t: [parse_size(x) for x in t.split(",")],
        default=[16 * KiB, 64 * KiB, 256 * KiB],
    )
    s.add_argument("--wbh-sweep", action="store_true", help="sweep write_buffer_high")
    s.add_argument(
        "--wbhs",
        type=lambda t: [parse_size(x) for x in t.split(",")],
        default=[64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB],
    )
    s.add_argument("--receive-size-sweep", action="store_true", help="sweep receive_size")
    s.add_argument(
        "--receive-sizes",
        type=lambda t: [parse_size(x) for x in t.split(",")],
        default=[64 * KiB, 256 * KiB, 1 * MiB],
    )
    p = parser.add_argument_group("profiling")
    p.add_argument("--profile", action="store_true", help="profile one run (--profile-case)")
    p.add_argument("--profiler", choices=["cprofile", "pyinstrument"], default="cprofile")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--profile-case", choices=["session1", "session8", "plain"], default="session1")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.mib, args.seconds, args.repeat = 64, 2.0, 1
    args.seconds = min(max(args.seconds, 0.1), 60.0)
    args.repeat = min(max(args.repeat, 1), 9)
    args.bytes = int(args.mib * MiB)

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"python {platform.python_version()}  trio {trio.__version__}  "
        f"per case: {args.mib:g} MiB or {args.seconds:g} s, repeat {args.repeat}, "
        f"send chunk {fmt_size(args.chunk)}, receive_some {fmt_size(args.recv_size)}"
    )
    if args.profile:
        run_profile(args)
        return 0
    t0 = time.perf_counter()
    results = trio.run(main_async, args)
    print(f"\ntotal wall time {time.perf_counter() - t0:.1f} s")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": sys.argv, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

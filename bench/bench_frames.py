"""Micro-benchmark of the framing layer: encode_message and FrameDecoder.

Measures, for 64 KiB ``Data`` frames and for small control frames (``WindowUpdate``, ``Fin``,
``Ping``), frames per second and MB/s (1 MB = 10**6 bytes, counting whole frames on the wire,
header included) for:

* ``encode``        -- ``encode_message(msg)``
* ``decode``        -- ``FrameDecoder.receive_data(frame)`` + ``next_message()``, one frame per read
* ``decode-stream`` -- the decoder fed a long byte stream in ``--read-size`` pieces (default
  256 KiB, the session's ``receive_size``), taking out every complete message after each read
* ``roundtrip``     -- encode then decode the same message

Each measurement runs for ``--seconds`` (bounded also by ``--max-iters`` operations) and is
repeated ``--repeat`` times; the table shows the median (and the min..max spread).

    python bench/bench_frames.py            # full run, ~1.5 s per measurement
    python bench/bench_frames.py --quick    # ~0.3 s per measurement, 1 repeat

``msgpack-only`` is a reference: ``packb``+``unpackb`` of the same dict without cattrs or framing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack

from pytunnel.protocol.frames import FrameDecoder, encode_message
from pytunnel.protocol.messages import Data, Fin, Message, Ping, WindowUpdate

KiB = 1024
#: Operations per timing batch: the clock is read only between batches.
BATCH = {"data": 16, "control": 512}


def measure(
    op: Callable[[int], int], batch: int, seconds: float, max_iters: int
) -> tuple[int, float]:
    """Call ``op(batch)`` until ``seconds`` have passed or ``max_iters`` ops ran.

    ``op(n)`` performs ``n`` operations and returns how many it did. Returns (ops, elapsed).
    """
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while done < max_iters:
        done += op(batch)
        if time.perf_counter() >= deadline:
            break
    return done, time.perf_counter() - start


def make_cases(read_size: int) -> list[tuple[str, str, Message]]:
    payload = bytes(range(256)) * (64 * KiB // 256)
    assert len(payload) == 64 * KiB
    return [
        ("Data 64 KiB", "data", Data(1, payload)),
        ("WindowUpdate", "control", WindowUpdate(1, 512 * KiB)),
        ("Fin", "control", Fin(1)),
        ("Ping", "control", Ping(2**40 + 12345)),
    ]


def op_encode(msg: Message) -> Callable[[int], int]:
    def run(n: int) -> int:
        for _ in range(n):
            encode_message(msg)
        return n

    return run


def op_decode(msg: Message) -> Callable[[int], int]:
    frame = encode_message(msg)
    dec = FrameDecoder(max_frame_size=1024 * KiB)

    def run(n: int) -> int:
        for _ in range(n):
            dec.receive_data(frame)
            if dec.next_message() is None:
                raise AssertionError("frame did not decode")
        return n

    return run


def op_decode_stream(msg: Message, read_size: int) -> Callable[[int], int]:
    """Decode a pre-built stream of frames delivered in ``read_size`` reads.

    A batch is ``n`` frames; the stream is cut at ``read_size`` boundaries independent of frame
    boundaries, as a socket would deliver it.
    """
    frame = encode_message(msg)
    per_stream = max(1, (4 * read_size) // len(frame) + 1)
    stream = frame * per_stream
    reads = [stream[i : i + read_size] for i in range(0, len(stream), read_size)]

    def run(n: int) -> int:
        done = 0
        while done < n:
            dec = FrameDecoder(max_frame_size=1024 * KiB)
            got = 0
            for chunk in reads:
                dec.receive_data(chunk)
                while dec.next_message() is not None:
                    got += 1
            if got != per_stream:
                raise AssertionError(f"decoded {got} of {per_stream}")
            done += got
        return done

    return run


def op_roundtrip(msg: Message) -> Callable[[int], int]:
    dec = FrameDecoder(max_frame_size=1024 * KiB)

    def run(n: int) -> int:
        for _ in range(n):
            dec.receive_data(encode_message(msg))
            if dec.next_message() is None:
                raise AssertionError("frame did not decode")
        return n

    return run


def op_raw_msgpack(msg: Message) -> Callable[[int], int]:
    """Reference: msgpack packb+unpackb of an equivalent plain dict, no cattrs, no framing."""
    from pytunnel.protocol.messages import converter

    obj = converter.unstructure(msg, Message)

    def run(n: int) -> int:
        for _ in range(n):
            msgpack.unpackb(msgpack.packb(obj), raw=False)
        return n

    return run


def op_send_data(msg: Message) -> Callable[[int], int]:
    """``Multiplexer.send_data`` of the payload (what the session really calls, with the Data
    fast path); the queued bytes are dropped after each call."""
    from pytunnel.protocol import mux

    m = mux.Multiplexer(mux.Role.CLIENT)
    sid = msg.stream  # type: ignore[union-attr]
    m._streams[sid] = mux._Stream(sid, mux._Phase.OPEN, 2**31 - 1, 2**20)
    send = mux.Multiplexer.send_data
    payload = memoryview(msg.data)  # type: ignore[union-attr]

    def run(n: int) -> int:
        for _ in range(n):
            m._streams[sid].send_window = 2**31 - 1
            send(m, sid, payload)
            m.data_to_send()
        return n

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="time per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="repeats per measurement (median)")
    parser.add_argument("--max-iters", type=int, default=5_000_000, help="op cap per measurement")
    parser.add_argument("--read-size", type=int, default=256 * KiB, help="decode-stream read size")
    parser.add_argument("--quick", action="store_true", help="0.3 s per measurement, 1 repeat")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.repeat = 0.3, 1
    args.seconds = min(max(args.seconds, 0.05), 10.0)
    args.repeat = min(max(args.repeat, 1), 9)

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"python {platform.python_version()}  msgpack {'.'.join(map(str, msgpack.version))}  "
        f"seconds={args.seconds} repeat={args.repeat} read_size={args.read_size}"
    )

    ops: list[tuple[str, Callable[[Message], Callable[[int], int]]]] = [
        ("encode", op_encode),
        ("decode", op_decode),
        ("decode-stream", lambda m: op_decode_stream(m, args.read_size)),
        ("roundtrip", op_roundtrip),
        ("msgpack-only", op_raw_msgpack),
    ]
    data_ops: list[tuple[str, Callable[[Message], Callable[[int], int]]]] = [
        ("mux.send_data", op_send_data),
    ]
    results: list[dict[str, Any]] = []
    header = f"{'frame':<14}{'op':<16}{'bytes':>7}{'frames/s':>13}{'MB/s':>10}   spread (frames/s)"
    print(header)
    print("-" * len(header))
    for label, kind, msg in make_cases(args.read_size):
        frame_len = len(encode_message(msg))
        for op_name, factory in ops + (data_ops if kind == "data" else []):
            rates = []
            for _ in range(args.repeat):
                op = factory(msg)
                count, elapsed = measure(op, BATCH[kind], args.seconds, args.max_iters)
                rates.append(count / elapsed)
            rate = statistics.median(rates)
            mbps = rate * frame_len / 1e6
            print(
                f"{label:<14}{op_name:<16}{frame_len:>7}{rate:>13,.0f}{mbps:>10,.1f}"
                f"   {min(rates):,.0f}..{max(rates):,.0f}",
                flush=True,
            )
            results.append(
                {
                    "frame": label,
                    "op": op_name,
                    "frame_bytes": frame_len,
                    "frames_per_s": rate,
                    "mb_per_s": mbps,
                    "samples": rates,
                }
            )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": sys.argv, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

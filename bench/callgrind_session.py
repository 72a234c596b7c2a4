"""A bounded session workload for ``valgrind --tool=callgrind``: instructions, not seconds.

Wall-clock figures on a shared machine move with whatever else runs; the instruction count of
the same script over the same code does not. This runs one fixed workload, both session ends
in one process over real loopback TCP (one ``trio.run``):

* ``ping``  -- ``--count`` 64-byte echo round trips on one stream (the latency path);
* ``bulk``  -- ``--count`` chunks of ``--chunk`` bytes one way on one stream, then Fin;
* ``bulk8`` -- the same chunks over 8 streams sending at once (``--count`` a multiple of 8),
  where frames of several streams used to share one write of the writer task.

Run it twice with different counts and subtract, so that start-up, imports and the session's
setup cancel out and what is left is the cost per message::

    for n in 500 1500; do
      PYTHONPATH=src valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$n \\
          python bench/callgrind_session.py ping --count $n 2>&1 | grep 'Collected'
    done
    # (I(1500) - I(500)) / 1000 = instructions per round trip (both ends)

``bench/callgrind_ab.sh OLD NEW`` does this for two commits and prints the table.

``--tls ssl-stream`` / ``--tls socket`` runs the session over TLS: ``trio.SSLStream``
(memory BIOs) or ``TLSSocketStream`` (OpenSSL on the socket, what ``tls_connect`` and
``tls_accept`` pick over TCP). Callgrind counts user-space instructions only: the socket
variant makes more, smaller system calls, whose kernel time this does not see.
"""

from __future__ import annotations

import argparse

import trio
import trio.testing
from bench_session import tls_pair

from pytunnel.session import Role, open_session

PING = b"p" * 64


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    box: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:

        async def dial() -> None:
            box.append(await trio.open_tcp_stream("127.0.0.1", port))

        nursery.start_soon(dial)
        server = await listener.accept()
    await listener.aclose()
    return box[0], server


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> None:
    got = 0
    while got < size:
        chunk = await stream.receive_some(size - got)
        if not chunk:
            raise RuntimeError("stream ended early")
        got += len(chunk)


async def _bulk(
    mine: trio.abc.HalfCloseableStream, theirs: trio.abc.HalfCloseableStream, count: int, chunk: int
) -> None:
    payload = bytes(chunk)
    async with trio.open_nursery() as nursery:

        async def sink() -> None:
            total = 0
            while data := await theirs.receive_some():
                total += len(data)
            if total != count * chunk:
                raise RuntimeError(f"received {total} of {count * chunk} bytes")

        nursery.start_soon(sink)
        for _ in range(count):
            await mine.send_all(payload)
        await mine.send_eof()
    await mine.aclose()
    await theirs.aclose()


async def run(mode: str, count: int, chunk: int, tls: str = "none") -> None:
    sock_a, sock_b = await _tcp_pair()
    a: trio.abc.Stream = sock_a
    b: trio.abc.Stream = sock_b
    if tls != "none":
        a, b = await tls_pair(sock_a, sock_b, tls)
    async with (
        open_session(a, Role.CLIENT) as client,
        open_session(b, Role.SERVER) as server,
        trio.open_nursery() as nursery,
    ):
        box: list[trio.abc.HalfCloseableStream] = []

        async def accept() -> None:
            box.append((await server.accept_stream()).accept())

        if mode == "bulk8":
            pairs = []
            for i in range(8):
                nursery.start_soon(accept)
                mine = await client.open_stream("t", i + 1)
                while len(box) <= i:
                    await trio.testing.wait_all_tasks_blocked()
                pairs.append((mine, box[i]))
            async with trio.open_nursery() as senders:
                for mine, theirs in pairs:
                    senders.start_soon(_bulk, mine, theirs, count // 8, chunk)
            nursery.cancel_scope.cancel()
            return
        nursery.start_soon(accept)
        mine = await client.open_stream("t", 1)
        while not box:
            await trio.testing.wait_all_tasks_blocked()
        theirs = box[0]
        if mode == "ping":

            async def echo() -> None:
                while data := await theirs.receive_some():
                    await theirs.send_all(data)

            nursery.start_soon(echo)
            for _ in range(count):
                await mine.send_all(PING)
                await _receive_exactly(mine, len(PING))
        else:
            await _bulk(mine, theirs, count, chunk)
        await mine.aclose()
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["ping", "bulk", "bulk8"])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=64 * 1024, help="bytes per bulk send_all")
    parser.add_argument(
        "--tls", choices=["none", "ssl-stream", "socket"], default="none", help="TLS under it"
    )
    args = parser.parse_args()
    trio.run(run, args.mode, args.count, args.chunk, args.tls)


if __name__ == "__main__":
    main()

"""Bandwidth limits (``_ratelimit``): the token bucket and the limited stream in virtual time,
then a limited forward over real sockets, and the rate syntax of ``--limit``."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from helpers import echo_once

import pytunnel
from pytunnel._ratelimit import LimitedStream, TokenBucket, parse_rate
from pytunnel.cli._status import format_status

KIB = 1024


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("10MB/s", 10_000_000),
        ("500KiB/s", 512_000),
        ("100Mbit/s", 12_500_000),
        ("8kbit", 1000),
        ("2.5mb", 2_500_000),
        ("4096", 4096),
        ("1 GB/s", 1e9),
        ("3GiB", 3 * 1024**3),
        ("100Mbps", 12_500_000),
        ("64kb/s", 64_000),
    ],
)
def test_rates_read_as_people_write_them(text: str, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)
    assert pytunnel.parse_rate is parse_rate


@pytest.mark.parametrize(
    "text", ["", "fast", "10XB/s", "-1MB/s", "1e6", "MB/s", "10 MB / s", "5 M B"]
)
def test_a_bad_rate_names_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="is not a rate: write a number with B, KB, MB"):
        parse_rate(text)


def test_a_zero_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="more than zero"):
        parse_rate("0MB/s")


@pytest.mark.parametrize("rate", [0, -5, float("inf"), float("nan")])
def test_a_bucket_needs_a_positive_finite_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="positive number of bytes per second"):
        TokenBucket(rate)
    with pytest.raises(ValueError, match="positive number of bytes"):
        TokenBucket(1000, burst=rate)


def test_the_default_burst_is_a_tenth_of_a_second_and_at_least_16_kib() -> None:
    assert TokenBucket(1_000_000).burst == 100_000
    assert TokenBucket(1000).burst == 16 * KIB
    assert TokenBucket(1000, burst=5).burst == 5


async def test_a_bucket_paces_to_its_rate(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(16 * KIB)  # burst: 16 KiB, one second's worth
    start = trio.current_time()
    for _ in range(10):
        await bucket.take(16 * KIB)
    # the first piece is the full bucket, each other one waits a second
    assert trio.current_time() - start == pytest.approx(9.0)


async def test_an_idle_bucket_saves_up_only_its_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(16 * KIB)
    await bucket.take(16 * KIB)
    await trio.sleep(60)  # a minute idle earns one burst, not sixty seconds' worth
    start = trio.current_time()
    await bucket.take(16 * KIB)
    await bucket.take(16 * KIB)
    assert trio.current_time() - start == pytest.approx(1.0)


async def test_a_new_rate_applies_to_the_next_piece(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(16 * KIB)
    await bucket.take(16 * KIB)
    bucket.rate = 32 * KIB
    start = trio.current_time()
    await bucket.take(16 * KIB)
    assert trio.current_time() - start == pytest.approx(0.5)


async def test_connections_sharing_a_bucket_take_turns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(16 * KIB)
    order: list[str] = []

    async def sender(name: str) -> None:
        for _ in range(4):
            await bucket.take(16 * KIB)
            order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender, "a")
        nursery.start_soon(sender, "b")
    assert sorted(order) == ["a"] * 4 + ["b"] * 4
    # neither runs ahead by more than one piece: the lock serves waiters in turn
    for i in range(len(order)):
        prefix = order[: i + 1]
        assert abs(prefix.count("a") - prefix.count("b")) <= 1


async def test_a_limited_stream_delivers_every_byte_at_the_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = trio.testing.memory_stream_pair()
    limited = LimitedStream(a, TokenBucket(256 * KIB))
    assert limited.paced
    payload = bytes(range(256)) * 4096  # 1 MiB
    got = bytearray()
    start = trio.current_time()

    async def receive() -> None:
        while len(got) < len(payload):
            got.extend(await b.receive_some())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await limited.send_all(payload)
    assert got == payload
    # 1 MiB at 256 KiB/s, the first 25.6 KiB (the burst) at once
    assert trio.current_time() - start == pytest.approx((1024 - 25.6) / 256, rel=0.02)
    await limited.send_eof()
    assert await b.receive_some() == b""
    await limited.aclose()


async def test_a_cancelled_wait_takes_no_tokens(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(16 * KIB)
    await bucket.take(16 * KIB)
    with trio.move_on_after(0.25):
        await bucket.take(16 * KIB)
    start = trio.current_time()
    await bucket.take(16 * KIB)  # still due one second after the first piece
    assert trio.current_time() - start == pytest.approx(0.75)


# --------------------------------------------------------------------------- through a tunnel


async def test_a_limited_forward_carries_every_byte_no_faster_than_its_limit(
    tunnel: pytunnel.Tunnel, echo_port: int
) -> None:
    rate = 200_000
    forward = await tunnel.forward_local("127.0.0.1", echo_port, limit=rate)
    assert forward.limit == rate
    payload = bytes(range(256)) * 1200  # 307,200 bytes each way
    start = trio.current_time()
    with trio.fail_after(60):
        assert await echo_once(forward.address, payload) == payload
    elapsed = trio.current_time() - start
    # a lower bound only (load makes it slower, never faster): beyond the first burst of
    # 20,000 bytes, the bytes out cannot pass faster than the limit
    assert elapsed >= (len(payload) - 20_000) / rate * 0.95
    assert f"limit={rate / 1e6:g}MB/s" in format_status(tunnel)[0]


async def test_a_limit_can_be_lifted_for_new_connections(
    tunnel: pytunnel.Tunnel, echo_port: int
) -> None:
    forward = await tunnel.forward_local("127.0.0.1", echo_port, limit=1000)
    forward.set_limit(None)
    assert forward.limit is None
    with trio.fail_after(30):  # 1 MB at 1 kB/s would take 17 minutes
        assert await echo_once(forward.address, bytes(1_000_000)) == bytes(1_000_000)
    assert "limit=" not in format_status(tunnel)[0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"limit": 1000, "protocol": "udp"}, "TCP forwards only"),
        ({"limit": 0}, "positive number of bytes per second"),
        ({"limit": float("inf")}, "positive number of bytes per second"),
    ],
)
async def test_a_limit_is_refused_where_it_cannot_apply(
    tunnel: pytunnel.Tunnel, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await tunnel.forward_local("127.0.0.1", 9, **options)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        await tunnel.forward_remote("127.0.0.1", 9, **options)  # type: ignore[arg-type]
    assert tunnel.forwards == []

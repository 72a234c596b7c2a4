"""Admission of control connections (``_admission.py``): the failed-authentication throttle,
the pending-handshake slots and deadlines, and the file-descriptor limit that sizes the
stream budget; in virtual time where the throttle alone is the subject, against a real server
over loopback otherwise."""

from __future__ import annotations

import functools
import logging
import resource
import subprocess
import sys
import textwrap

import pytest
import trio
import trio.testing
from helpers import TOKEN, count_fds, read_all

import pytunnel
from pytunnel._admission import AuthThrottle, _fit_fd_limit
from pytunnel._handshake import client_handshake
from pytunnel.protocol.frames import FrameDecoder, encode_message
from pytunnel.protocol.messages import Challenge, GoAway, Hello

pytestmark = pytest.mark.timeout(180)

# ----------------------------------------------------------------- failed-authentication throttle


def test_auth_throttle_is_a_decaying_budget(autojump_clock: trio.testing.MockClock) -> None:
    """In virtual time: a burst is throttled, the penalty ends on time, a slow trickle of
    failures is never throttled, and old failures are forgiven."""

    async def main() -> None:
        throttle = AuthThrottle(burst=10, interval=6.0)
        for _ in range(10):
            assert throttle.blocked_for("10.1.1.1") == 0
            throttle.failure("10.1.1.1")
        # the 11th attempt within the burst is refused, and told for how long
        wait = throttle.blocked_for("10.1.1.1")
        assert 5.9 < wait <= 6.0
        assert throttle.blocked_for("10.1.1.2") == 0  # other addresses are not affected
        await trio.sleep(wait)
        assert throttle.blocked_for("10.1.1.1") == 0  # the penalty ends, it is not a ban
        throttle.failure("10.1.1.1")
        assert 5.9 < throttle.blocked_for("10.1.1.1") <= 6.0  # one more costs one interval
        # a failure every interval, forever (a stale client under a supervisor): never
        # throttled, however long it goes on
        for _ in range(200):
            assert throttle.blocked_for("10.2.2.2") == 0
            throttle.failure("10.2.2.2")
            await trio.sleep(6.0)
        # after a long quiet spell the whole burst is back
        await trio.sleep(60.0)
        for _ in range(10):
            assert throttle.blocked_for("10.1.1.1") == 0
            throttle.failure("10.1.1.1")
        assert throttle.blocked_for("10.1.1.1") > 0

    trio.run(main, clock=autojump_clock)


def test_concurrent_failed_handshakes_each_cost_a_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Handshakes admitted together while one token was left all fail on their own account:
    eight concurrent wrong guesses run the address into debt (at most one burst, so the
    penalty still ends), and concurrency buys no guesses that sequential attempts would not
    get."""

    async def main() -> None:
        throttle = AuthThrottle(burst=1, interval=6.0)
        for _ in range(8):  # all admitted before the first failed
            throttle.failure("10.3.3.3")
        assert throttle.blocked_for("10.3.3.3") == pytest.approx(2 * 6.0)  # one burst of debt
        await trio.sleep(12.0)
        assert throttle.blocked_for("10.3.3.3") == 0

    trio.run(main, clock=autojump_clock)


def test_auth_throttle_table_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    async def main() -> None:
        throttle = AuthThrottle(burst=1, interval=60.0, max_entries=100)
        for i in range(1000):
            throttle.failure(f"10.0.{i // 256}.{i % 256}")
        assert len(throttle._buckets) == 100
        assert throttle.blocked_for("10.0.3.231") > 0  # the newest are kept

    trio.run(main, clock=autojump_clock)


async def test_rate_limited_refusal_says_when_to_retry_and_then_serves(
    nursery: trio.Nursery,
) -> None:
    """Against a real server: after the burst, the refusal carries the retry time, the client
    surfaces it in its typed error, and the right token is served once that time has passed."""
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(
            pytunnel.serve, 0, token=TOKEN, auth_failure_burst=3, auth_failure_interval=2
        )
    )

    async def attempt(token: str) -> None:
        stream = await trio.open_tcp_stream(*server.address, local_address="127.0.0.3")
        await client_handshake(stream, token, max_frame_size=2**20)
        await stream.aclose()

    for _ in range(3):
        with pytest.raises(pytunnel.AuthenticationError):
            await attempt("wrong")
    with pytest.raises(pytunnel.RateLimitedError) as info:
        await attempt(TOKEN)  # the right token, but the address is in its penalty
    retry_after = info.value.retry_after
    assert retry_after is not None
    assert 0 < retry_after <= 2.0
    assert f"retry in {retry_after:.1f} s" in str(info.value)
    # another address is unaffected, through the public client API
    async with pytunnel.open_tunnel(server.address, token=TOKEN, reconnect=False) as tunnel:
        assert tunnel.connected
    # waiting as told is enough: the right token is served at once
    await trio.sleep(retry_after)
    with trio.fail_after(5):
        await attempt(TOKEN)


# ----------------------------------------------------------------- pre-authentication slots


async def test_one_address_cannot_hold_the_handshake_slots(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """200 idle connections from one address: most are turned away at once, the few admitted
    are dropped at the first-frame deadline, and a client from another address authenticates
    straight away throughout."""
    caplog.set_level(logging.INFO)
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(
            pytunnel.serve, 0, token=TOKEN, first_frame_timeout=2.0, handshake_timeout=60
        )
    )
    fds = count_fds()
    idle: list[trio.SocketStream] = []
    with trio.fail_after(30):
        for _ in range(200):
            idle.append(await trio.open_tcp_stream(*server.address))
        while not server.pending_handshakes:
            await trio.sleep(0.01)
    # the flood holds what one address may hold, and no more ...
    assert server.pending_handshakes <= server.config.max_handshakes_per_address
    # ... so a client from another address is served at once
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(*server.address, local_address="127.0.0.2")
        await client_handshake(stream, TOKEN, max_frame_size=2**20)
    await stream.aclose()
    # every flood connection ends: turned away with SERVER_BUSY at once, or, if admitted,
    # dropped at the first-frame deadline long before the handshake deadline (60 s);
    # read_all's 5 s is a generous hang detector, not a timing assertion
    busy = admitted = 0
    for s in idle:
        answer = FrameDecoder().feed(await read_all(s))
        if answer:
            assert isinstance(answer[0], GoAway)
            assert answer[0].code == pytunnel.ErrorCode.SERVER_BUSY
            busy += 1
        else:
            admitted += 1
        await s.aclose()
    assert admitted >= server.config.max_handshakes_per_address
    assert busy >= 100  # most were never admitted at all
    with trio.fail_after(5):
        while server.pending_handshakes or count_fds() > fds:
            await trio.sleep(0.01)
    turned_away = [r for r in caplog.records if "turning away connections from" in r.getMessage()]
    # logged once per episode (an episode ends when the address drops below its cap),
    # not once per connection
    assert 1 <= len(turned_away) < 10


async def test_first_frame_deadline_does_not_cut_a_slow_but_started_handshake(
    nursery: trio.Nursery,
) -> None:
    """The first-frame deadline is about the Hello only: a client that sent it has the
    whole handshake deadline for the rest."""
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(
            pytunnel.serve, 0, token=TOKEN, first_frame_timeout=0.3, handshake_timeout=30
        )
    )
    stream = await trio.open_tcp_stream(*server.address)
    await stream.send_all(encode_message(Hello((1,), b"n" * 32)))
    decoder = FrameDecoder()
    with trio.fail_after(5):
        while not (messages := decoder.feed(await stream.receive_some())):
            pass
    assert isinstance(messages[0], Challenge)
    await trio.sleep(1.0)  # well past the first-frame deadline: still connected
    assert server.pending_handshakes == 1
    await stream.aclose()


# ----------------------------------------------------------------- file-descriptor limit


def test_serve_raises_the_fd_limit_and_sizes_max_streams_from_it() -> None:
    """With a soft limit of 600 and a hard limit of 1000, serve() raises the soft limit to
    1000 and lowers the default stream budget to fit (1000 - 128 pending - 256 headroom)."""
    script = textwrap.dedent(
        """
        import functools, logging, resource, trio, pytunnel
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        async def main():
            async with trio.open_nursery() as nursery:
                server = await nursery.start(functools.partial(pytunnel.serve, 0, token="t"))
                soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                print(soft, server.config.max_streams, flush=True)
                nursery.cancel_scope.cancel()
        trio.run(main)
        """
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (600, 1000))

    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit,
    )
    assert out.stdout.split() == ["1000", "616"], out.stderr
    assert "INFO file descriptors: limit 1000; max_streams lowered from 16384 to 616" in out.stderr


def test_an_explicit_max_streams_over_the_fd_limit_is_capped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    config = pytunnel.ServerConfig(token="t", max_streams=5000)
    assert _fit_fd_limit(config, 4096).max_streams == 4096 - 128 - 256
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert _fit_fd_limit(config, 100_000).max_streams == 5000
    assert _fit_fd_limit(config, None).max_streams == 5000


async def test_pending_handshake_limit(nursery: trio.Nursery) -> None:
    server = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, max_pending_handshakes=3)
    )
    silent = [await trio.open_tcp_stream(*server.address) for _ in range(3)]
    await trio.sleep(0.1)
    with pytest.raises(pytunnel.ServerBusyError) as info:
        await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    assert info.value.code == pytunnel.ErrorCode.SERVER_BUSY
    for s in silent:
        await s.aclose()
    await trio.sleep(0.1)
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    assert tunnel.connected

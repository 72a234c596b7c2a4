"""The authenticated handshake: tokens, versions, slow peers, hostile first frames."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from helpers import tcp_stream_pair

import pytunnel
from pytunnel import (
    AuthenticationError,
    ClientConfig,
    ConnectError,
    ErrorCode,
    HandshakeTimeoutError,
    RemoteProtocolError,
    VersionMismatchError,
)
from pytunnel._handshake import (
    client_handshake,
    open_client_session,
    open_server_session,
    server_handshake,
)
from pytunnel.errors import LocalProtocolError
from pytunnel.protocol import handshake as hs
from pytunnel.protocol.frames import FrameDecoder, encode_message
from pytunnel.protocol.messages import (
    Auth,
    Challenge,
    GoAway,
    Hello,
    Message,
    Welcome,
    converter,
)

TOKEN = "correct horse battery staple"
CLIENT_PROOF_WITH_ID = "7a8ba2dfc77151509e8ea949b1eafc0fdb5a29b420052402b8ad5d90178455e0"
SERVER_PROOF_WITH_ID = "b5b10b3e10bb7015386359db008b35167528d2aeb08d321c1a0a2a48e5df7fa6"


async def _server(stream: trio.abc.Stream, token: str, errors: list[BaseException]) -> None:
    try:
        async with open_server_session(stream, token, peer="test") as session:
            incoming = await session.accept_stream()
            s = incoming.accept()
            await s.send_all(await s.receive_some())
            await s.aclose()
    except Exception as exc:
        errors.append(exc)


async def test_handshake_then_traffic_over_tcp() -> None:
    a, b = await tcp_stream_pair()
    errors: list[BaseException] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_server, b, TOKEN, errors)
            async with open_client_session(a, TOKEN) as session:
                stream = await session.open_stream()
                await stream.send_all(b"ping")
                assert await stream.receive_some() == b"ping"
    assert errors == []


async def test_wrong_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    a, b = await tcp_stream_pair()
    errors: list[BaseException] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_server, b, TOKEN, errors)
            with pytest.raises(AuthenticationError) as info:
                async with open_client_session(a, "wrong-secret-token"):
                    pass  # pragma: no cover
    assert info.value.code == 1002
    assert len(errors) == 1
    assert isinstance(errors[0], AuthenticationError)
    assert errors[0].code == ErrorCode.AUTHENTICATION_FAILED
    # the connection is closed on the server side too
    with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):  # noqa: PT012 - loops until the closed connection shows
        for _ in range(100):
            await a.send_all(b"x" * 1000)
    text = caplog.text + str(info.value) + str(errors[0])
    assert "authentication failed" in caplog.text
    assert TOKEN not in text
    assert "wrong-secret-token" not in text


async def test_server_must_prove_the_token() -> None:
    """Mutual authentication: an impostor server that lacks the token is detected."""
    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def impostor() -> None:
                # accepts anything: answers with a Welcome computed from a different token
                with pytest.raises(AuthenticationError):
                    await server_handshake(b, "other token", max_frame_size=2**20)

            nursery.start_soon(impostor)
            with pytest.raises(AuthenticationError):
                await client_handshake(a, TOKEN, max_frame_size=2**20)


async def test_version_mismatch_is_typed_on_both_sides() -> None:
    a, b = trio.testing.memory_stream_pair()
    server_errors: list[BaseException] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def server() -> None:
                try:
                    await server_handshake(b, TOKEN, max_frame_size=2**20)
                except VersionMismatchError as exc:
                    server_errors.append(exc)

            nursery.start_soon(server)
            with pytest.raises(VersionMismatchError) as info:
                await client_handshake(a, TOKEN, max_frame_size=2**20, versions=(99,))
    assert info.value.code == ErrorCode.UNSUPPORTED_VERSION
    assert "99" in str(info.value)
    assert len(server_errors) == 1


async def test_silent_client_is_dropped(autojump_clock: trio.abc.Clock) -> None:
    """Slow-loris: a client that connects and says nothing is dropped after 10 s."""
    a, b = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with pytest.raises(HandshakeTimeoutError):
        await server_handshake(b, TOKEN, max_frame_size=2**20)
    assert trio.current_time() - start == pytest.approx(10)
    with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
        await a.send_all(b"late")


async def test_trickling_client_is_dropped(autojump_clock: trio.abc.Clock) -> None:
    """A client sending one byte every second still hits the overall deadline."""
    a, b = trio.testing.memory_stream_pair()
    frame = encode_message(GoAway(0, "x" * 500))

    async def trickle() -> None:
        for byte in frame:
            await trio.sleep(1)
            try:
                await a.send_all(bytes([byte]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        with pytest.raises(HandshakeTimeoutError):
            await server_handshake(b, TOKEN, max_frame_size=2**20, timeout=5)


async def test_client_gives_up_on_silent_server(autojump_clock: trio.abc.Clock) -> None:
    a, _b = trio.testing.memory_stream_pair()
    with pytest.raises(HandshakeTimeoutError):
        await client_handshake(a, TOKEN, max_frame_size=2**20)


async def test_large_preauth_frame_is_rejected() -> None:
    """Before authentication, frames are capped at 4 KiB: no big allocation for strangers."""
    a, b = trio.testing.memory_stream_pair()
    await a.send_all((64 * 1024).to_bytes(4, "big"))
    with trio.fail_after(10), pytest.raises(RemoteProtocolError) as info:
        await server_handshake(b, TOKEN, max_frame_size=2**20)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    # the server said why before closing
    decoder = FrameDecoder()
    messages = decoder.feed(await a.receive_some())
    assert isinstance(messages[0], GoAway)
    assert messages[0].code == ErrorCode.FRAME_TOO_LARGE


async def test_wrong_first_message_is_rejected() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(encode_message(GoAway(0, "")))
    with trio.fail_after(10), pytest.raises(RemoteProtocolError) as info:
        await server_handshake(b, TOKEN, max_frame_size=2**20)
    assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE


async def test_connection_closed_mid_handshake() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(b"\x00\x00")
    await a.aclose()
    with trio.fail_after(10), pytest.raises(RemoteProtocolError) as info:
        await server_handshake(b, TOKEN, max_frame_size=2**20)
    assert info.value.code == ErrorCode.TRUNCATED_FRAME
    a, b = trio.testing.memory_stream_pair()
    await a.aclose()
    with trio.fail_after(10), pytest.raises(ConnectError):
        await server_handshake(b, TOKEN, max_frame_size=2**20)


# ----------------------------------------------------------------------------- client identity


async def _receive_one(stream: trio.abc.Stream, decoder: FrameDecoder) -> object:
    while (message := decoder.next_message()) is None:
        decoder.receive_data(await stream.receive_some())
    return message


async def test_client_identity_reaches_the_server() -> None:
    a, b = await tcp_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            results = []

            async def serve() -> None:
                results.append(await server_handshake(b, TOKEN, max_frame_size=65536))

            nursery.start_soon(serve)
            mine = await client_handshake(a, TOKEN, max_frame_size=65536, client_id="laptop-1")
    assert mine.client_id == "laptop-1"
    assert results[0].client_id == "laptop-1"
    await a.aclose()
    await b.aclose()


async def test_swapped_client_identity_fails_authentication() -> None:
    """The identity is bound into the client's proof: an on-path peer that replaces it (to
    take over another client's session and ports) makes the proof wrong."""
    a, b = await tcp_stream_pair()
    errors: list[BaseException] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                try:
                    await server_handshake(b, TOKEN, max_frame_size=65536)
                except AuthenticationError as exc:
                    errors.append(exc)

            nursery.start_soon(serve)
            decoder = FrameDecoder(4096)
            nonce = hs.new_nonce()
            await a.send_all(encode_message(Hello((1,), nonce)))
            challenge = await _receive_one(a, decoder)
            assert isinstance(challenge, Challenge)
            mac = hs.client_proof(TOKEN.encode(), 1, nonce, challenge.nonce, "alice")
            await a.send_all(encode_message(Auth(mac, 65536, client_id="mallory")))
            reply = await _receive_one(a, decoder)
    assert isinstance(reply, GoAway)
    assert reply.code == ErrorCode.AUTHENTICATION_FAILED
    assert len(errors) == 1
    await a.aclose()


async def test_server_proof_covers_the_client_identity() -> None:
    """A server (or impostor) whose proof ignores the identity the client sent is refused."""
    a, b = await tcp_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def fake_server() -> None:
                decoder = FrameDecoder(4096)
                hello = await _receive_one(b, decoder)
                assert isinstance(hello, Hello)
                server_nonce = hs.new_nonce()
                await b.send_all(encode_message(Challenge(1, server_nonce)))
                auth = await _receive_one(b, decoder)
                assert isinstance(auth, Auth)
                assert auth.client_id == "laptop-1"
                proof = hs.server_proof(TOKEN.encode(), 1, hello.nonce, server_nonce)  # no id
                await b.send_all(encode_message(Welcome(proof, 65536)))

            nursery.start_soon(fake_server)
            with pytest.raises(AuthenticationError):
                await client_handshake(a, TOKEN, max_frame_size=65536, client_id="laptop-1")
    await b.aclose()


def test_client_identity_proof_vector() -> None:
    """Published in docs/protocol.md; without an identity the proofs are unchanged."""
    key = TOKEN.encode()
    client_nonce, server_nonce = bytes(range(32)), bytes(range(32, 64))
    assert hs.client_proof(key, 1, client_nonce, server_nonce, "") == bytes.fromhex(
        "672ee45daff96176a7538d8a8ec9ad170ee4b73aa4f830839010ba1682551b6a"
    )
    assert hs.client_proof(key, 1, client_nonce, server_nonce, "laptop-1") == bytes.fromhex(
        CLIENT_PROOF_WITH_ID
    )
    assert hs.server_proof(key, 1, client_nonce, server_nonce, "laptop-1") == bytes.fromhex(
        SERVER_PROOF_WITH_ID
    )


@pytest.mark.parametrize("bad", ["has space", "new\nline", "x" * 65, "é"])
def test_malformed_client_identity_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="client_id"):
        Auth(bytes(32), 4096, client_id=bad)
    with pytest.raises(ValueError, match="client_id"):
        ClientConfig(token=TOKEN, client_id=bad)
    with pytest.raises(ValueError, match="client_id"):
        ClientConfig(token=TOKEN, client_id="")


# ----------------------------------------------------------------------------- sans-IO


CLIENT_NONCE = bytes(range(32))
SERVER_NONCE = bytes(range(32, 64))


def _machines(
    client_token: bytes = b"tok", server_token: bytes = b"tok", client_id: str = ""
) -> tuple[hs.ClientHandshake, hs.ServerHandshake]:
    client = hs.ClientHandshake(
        client_token, max_frame_size=65536, client_id=client_id, nonce=CLIENT_NONCE
    )
    server = hs.ServerHandshake(
        server_token, max_frame_size=131072, peer="test", nonce=SERVER_NONCE
    )
    return client, server


def test_handshake_machines_complete_against_each_other_without_io() -> None:
    client, server = _machines(client_id="laptop-1")
    version = max(hs.SUPPORTED_VERSIONS)
    hello = client.start()
    assert hello == Hello(hs.SUPPORTED_VERSIONS, CLIENT_NONCE)
    assert server.expecting == "Hello"
    step = server.receive(hello)
    assert step == hs.Step(send=Challenge(version, SERVER_NONCE))
    assert server.expecting == "Auth"
    step = client.receive(step.send)
    proof = hs.client_proof(b"tok", version, CLIENT_NONCE, SERVER_NONCE, "laptop-1")
    assert step == hs.Step(send=Auth(proof, 65536, "laptop-1"))
    done = server.receive(step.send)
    assert done.result == hs.Authenticated(version, 65536, "laptop-1")
    assert isinstance(done.send, Welcome)
    assert client.receive(done.send) == hs.Step(
        result=hs.Authenticated(version, 131072, "laptop-1")
    )
    assert client.state is server.state is hs.HandshakeState.DONE
    with pytest.raises(LocalProtocolError):
        server.receive(hello)  # a finished handshake expects nothing


@pytest.mark.parametrize(
    "first",
    [Auth(bytes(32), 4096), Welcome(bytes(32), 4096), Challenge(1, bytes(32)), GoAway(0, "")],
    ids=lambda m: type(m).__name__,
)
def test_server_machine_wants_hello_first_and_stays_failed(first: Any) -> None:
    """Any message but Hello first is UNEXPECTED_MESSAGE; the failure is sticky."""
    _, server = _machines()
    with pytest.raises(RemoteProtocolError) as info:
        server.receive(first)
    assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE
    assert server.state is hs.HandshakeState.ERROR
    with pytest.raises(RemoteProtocolError) as again:
        server.receive(Hello((1,), CLIENT_NONCE))
    assert again.value is info.value
    assert server.refusal(info.value) == GoAway(
        ErrorCode.UNEXPECTED_MESSAGE, "expected Hello, got " + type(first).__name__
    )


def test_server_machine_refuses_a_wrong_token_and_says_no_more() -> None:
    client, server = _machines(client_token=b"wrong")
    auth = client.receive(server.receive(client.start()).send).send
    with pytest.raises(AuthenticationError, match="client test sent a wrong token proof") as info:
        server.receive(auth)
    assert server.refusal(info.value) == GoAway(
        ErrorCode.AUTHENTICATION_FAILED, "authentication failed"
    )


def test_server_machine_binds_the_client_id_into_the_proof() -> None:
    """An Auth whose identity was swapped in transit fails: the proof covers it."""
    client, server = _machines(client_id="alice")
    auth = client.receive(server.receive(client.start()).send).send
    assert isinstance(auth, Auth)
    with pytest.raises(AuthenticationError):
        server.receive(Auth(auth.mac, auth.max_frame_size, "mallory"))


def test_server_machine_refuses_without_a_common_version() -> None:
    _, server = _machines()
    with pytest.raises(VersionMismatchError) as info:
        server.receive(Hello((7, 8), CLIENT_NONCE))
    assert server.refusal(info.value).code == ErrorCode.UNSUPPORTED_VERSION


def test_client_machine_checks_version_order_and_server_proof() -> None:
    client, _ = _machines()
    with pytest.raises(LocalProtocolError):
        client.receive(Challenge(1, SERVER_NONCE))  # before start()
    client.start()
    with pytest.raises(VersionMismatchError, match="server chose version 99"):
        client.receive(Challenge(99, SERVER_NONCE))
    client, _ = _machines()
    client.start()
    with pytest.raises(RemoteProtocolError) as info:
        client.receive(Welcome(bytes(32), 4096))
    assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE
    client, _ = _machines()
    client.start()
    client.receive(Challenge(1, SERVER_NONCE))
    with pytest.raises(AuthenticationError, match="could not prove"):
        client.receive(Welcome(bytes(32), 4096))  # an impostor's proof
    client, _ = _machines()
    client.start()
    with pytest.raises(pytunnel.ServerBusyError):
        client.receive(GoAway(ErrorCode.SERVER_BUSY, "busy"))
    assert client.state is hs.HandshakeState.ERROR


# ----------------------------------------------------------------------------- version 2


def _early_machines(
    client_versions: tuple[int, ...] = hs.SUPPORTED_VERSIONS,
    server_versions: tuple[int, ...] = hs.SUPPORTED_VERSIONS,
) -> tuple[hs.ClientHandshake, hs.ServerHandshake]:
    client = hs.ClientHandshake(
        b"tok", max_frame_size=65536, versions=client_versions, early_window=1000
    )
    server = hs.ServerHandshake(
        b"tok", max_frame_size=65536, versions=server_versions, early_window=2000
    )
    return client, server


def _run(
    client: hs.ClientHandshake, server: hs.ServerHandshake
) -> tuple[Auth, Welcome, hs.Authenticated, hs.Authenticated]:
    auth = client.receive(server.receive(client.start()).send).send
    done = server.receive(auth)
    assert isinstance(auth, Auth)
    assert isinstance(done.send, Welcome)
    ours = client.receive(done.send).result
    assert ours is not None
    assert done.result is not None
    return auth, done.send, ours, done.result


def test_version_2_handshake_exchanges_the_early_windows() -> None:
    """Each side announces what the other may send on a stream before its Accept."""
    auth, welcome, client_result, server_result = _run(*_early_machines())
    assert (auth.early_window, welcome.early_window) == (1000, 2000)
    assert client_result.version == server_result.version == 2
    assert client_result.peer_early_window == 2000  # the client may send 2000 early bytes
    assert server_result.peer_early_window == 1000


@pytest.mark.parametrize(
    "versions",
    [((1,), hs.SUPPORTED_VERSIONS), (hs.SUPPORTED_VERSIONS, (1,))],
    ids=["old client, new server", "new client, old server"],
)
def test_a_version_1_peer_sees_no_early_window_on_the_wire(
    versions: tuple[tuple[int, ...], tuple[int, ...]],
) -> None:
    auth, welcome, client_result, server_result = _run(*_early_machines(*versions))
    assert client_result.version == server_result.version == 1
    assert auth.early_window == welcome.early_window == 0
    assert "early_window" not in converter.unstructure(auth, Message)
    assert "early_window" not in converter.unstructure(welcome, Message)
    assert client_result.peer_early_window == server_result.peer_early_window == 0


def test_an_early_window_in_a_version_1_handshake_is_invalid() -> None:
    """Only version 2 has the field: a peer that sends it in version 1 breaks the protocol."""
    client, server = _early_machines(server_versions=(1,))
    auth = client.receive(server.receive(client.start()).send).send
    assert isinstance(auth, Auth)
    with pytest.raises(RemoteProtocolError) as info:
        server.receive(attrs.evolve(auth, early_window=5))
    assert info.value.code == ErrorCode.INVALID_FIELD
    client, server = _early_machines(client_versions=(1,))
    auth = client.receive(server.receive(client.start()).send).send
    welcome = server.receive(auth).send
    assert isinstance(welcome, Welcome)
    with pytest.raises(RemoteProtocolError) as info:
        client.receive(attrs.evolve(welcome, early_window=5))
    assert info.value.code == ErrorCode.INVALID_FIELD

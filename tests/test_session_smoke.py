from conftest import open_pair, session_pair


async def test_roundtrip(transport: str) -> None:
    async with session_pair(transport) as (client, server):
        a, b = await open_pair(client, server, host="example", port=80, tag=7)
        await a.send_all(b"hello")
        assert await b.receive_some() == b"hello"
        await b.send_all(b"world")
        await b.send_eof()
        assert await a.receive_some() == b"world"
        assert await a.receive_some() == b""
        await a.aclose()
        await b.aclose()
        assert await client.ping() >= 0


def test_the_session_namespace_holds_the_multiplexer_api() -> None:
    import pytunnel
    import pytunnel.session
    from pytunnel import _session

    for name in ("IncomingStream", "MuxStream", "Session", "SessionConfig", "StreamSlot"):
        assert getattr(pytunnel.session, name) is getattr(_session, name)
    assert pytunnel.session.open_session is _session.open_session
    assert _session.StreamResetError is pytunnel.errors.StreamResetError

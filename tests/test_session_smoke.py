from helpers import open_pair, session_pair


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
    from pytunnel import _incoming, _stream

    assert pytunnel.session.MuxStream is _stream.MuxStream
    assert pytunnel.session.IncomingStream is _incoming.IncomingStream
    assert pytunnel.session.StreamSlot is _incoming.StreamSlot
    assert pytunnel.session.SessionConfig is pytunnel.SessionConfig
    for name in pytunnel.session.__all__:
        assert getattr(pytunnel.session, name) is not None
    assert not hasattr(pytunnel, "open_session")  # the lower layer has its own namespace

"""A synchronous face for harnesses that are not Trio (plain pytest, unittest, asyncio).

The tunnel runs in a background thread with its own Trio loop; these context managers drive
it through ``trio.from_thread``. Errors raised in the Trio thread reach the caller as the same
typed exceptions. Stopping is bounded in time and never hangs, even with connections open
(the complaint about sshtunnel's ``stop()``): leaving a block cancels everything under it.

    with pytunnel.sync.open_server(token="t") as server:
        with pytunnel.sync.open_tunnel(server.address, token="t") as tunnel:
            with tunnel.forward_local("db.internal", 5432) as fwd:
                psycopg.connect(port=fwd.port, ...)
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from .client import ClientConfig, Forward, ForwardStatus, Tunnel, connect_tunnel
from .server import ServerConfig, TunnelServer, serve

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .client import ClientOptions
    from .server import ServerOptions

__all__ = ["SyncForward", "SyncServer", "SyncTunnel", "open_server", "open_tunnel"]

_T = TypeVar("_T")
#: How long stopping may take before the background thread is abandoned (it is a daemon).
STOP_TIMEOUT = 5.0


class _Portal:
    """A Trio loop in a daemon thread, and a way to run coroutines in it from outside."""

    def __init__(self, name: str) -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:  # pragma: no cover - trio failed to start
            raise self._error

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the caller by its next call
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await trio.sleep_forever()

    def run(self, afn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        try:
            return trio.from_thread.run(afn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            self._raise_crash()
            raise

    def _raise_crash(self) -> None:
        """If the loop died of an error, that error (not RunFinishedError) is the news."""
        self._thread.join(STOP_TIMEOUT)
        if self._error is not None:
            raise self._error

    def run_sync(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            return trio.from_thread.run_sync(
                functools.partial(fn, *args, **kwargs), trio_token=self._token
            )
        except trio.RunFinishedError:
            self._raise_crash()
            raise

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Cancel everything in the loop and wait (bounded) for the thread to end."""
        if self._thread.is_alive() and self._nursery is not None:
            with contextlib.suppress(trio.RunFinishedError):  # already gone: nothing to stop
                trio.from_thread.run_sync(self._nursery.cancel_scope.cancel, trio_token=self._token)
        self._thread.join(timeout)


class SyncForward:
    """A forward seen from a plain thread; a context manager that closes it."""

    def __init__(self, portal: _Portal, forward: Forward) -> None:
        self._portal = portal
        self.forward = forward

    @property
    def address(self) -> tuple[str, int]:
        return self.forward.address

    @property
    def port(self) -> int:
        return self.forward.listen_port

    @property
    def status(self) -> ForwardStatus:
        return self.forward.status

    def set_faults(self, direction: str = "both", **settings: object) -> None:
        """Set faults on this forward (see ``pytunnel.testing.Faults.set``), from any thread."""
        self._portal.run_sync(self.forward.faults.set, direction, **settings)

    def clear_faults(self, direction: str = "both") -> None:
        self._portal.run_sync(self.forward.faults.clear, direction)

    def reset_connections(self) -> int:
        """Reset every connection of this forward now."""
        return self._portal.run_sync(self.forward.faults.reset_connections)

    def close(self) -> None:
        self._portal.run(self.forward.aclose)

    def __enter__(self) -> SyncForward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SyncTunnel:
    """A connected tunnel client driven from a plain thread."""

    def __init__(self, portal: _Portal, tunnel: Tunnel) -> None:
        self._portal = portal
        self.tunnel = tunnel

    @property
    def connected(self) -> bool:
        return self.tunnel.connected

    def forward_local(self, target_host: str, target_port: int, **options: Any) -> SyncForward:
        """Like ``Tunnel.forward_local``; use as ``with tunnel.forward_local(...) as fwd:``."""
        forward = self._portal.run(
            functools.partial(self.tunnel.forward_local, target_host, target_port, **options)
        )
        return SyncForward(self._portal, forward)

    def forward_remote(self, target_host: str, target_port: int, **options: Any) -> SyncForward:
        """Like ``Tunnel.forward_remote``."""
        forward = self._portal.run(
            functools.partial(self.tunnel.forward_remote, target_host, target_port, **options)
        )
        return SyncForward(self._portal, forward)

    def forward_dynamic(self, **options: Any) -> SyncForward:
        """Like ``Tunnel.forward_dynamic`` (a SOCKS proxy)."""
        forward = self._portal.run(functools.partial(self.tunnel.forward_dynamic, **options))
        return SyncForward(self._portal, forward)


class SyncServer:
    """A running server driven from a plain thread."""

    def __init__(self, server: TunnelServer) -> None:
        self.server = server

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    @property
    def port(self) -> int:
        return self.server.port


@contextmanager
def open_tunnel(
    address: str | tuple[str, int],
    *,
    token: str | bytes | None = None,
    config: ClientConfig | None = None,
    **options: Unpack[ClientOptions],
) -> Iterator[SyncTunnel]:
    """``with pytunnel.sync.open_tunnel("host:7000", token=...) as tunnel:`` in any thread.

    The arguments of :func:`pytunnel.open_tunnel`."""
    portal = _Portal("pytunnel-client")
    try:

        async def start() -> Tunnel:
            return await connect_tunnel(
                portal.nursery, address, token=token, config=config, **options
            )

        yield SyncTunnel(portal, portal.run(start))
    finally:
        portal.stop()


@contextmanager
def open_server(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    token: str | bytes | None = None,
    config: ServerConfig | None = None,
    **options: Unpack[ServerOptions],
) -> Iterator[SyncServer]:
    """A tunnel server in a background thread (port 0: any free port) for one block.

    The arguments of :func:`pytunnel.open_server`."""
    portal = _Portal("pytunnel-server")
    try:

        async def start() -> TunnelServer:
            server: TunnelServer = await portal.nursery.start(
                functools.partial(serve, port, host=host, token=token, config=config, **options)
            )
            return server

        yield SyncServer(portal.run(start))
    finally:
        portal.stop()

"""Small helpers shared by the I/O layers."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Generic, TypeVar

import trio

from .errors import caused_by

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]

__all__ = ["Episodes", "aclose_all", "implements", "owned", "unwrap_cancelled"]

#: (class, protocol) -> whether instances of the class implement the protocol.
_IMPLEMENTS: dict[tuple[type, object], bool] = {}


def implements(obj: object, protocol: object) -> bool:
    """``isinstance(obj, protocol)`` for a ``runtime_checkable`` protocol, remembered per
    class.

    The check itself walks the protocol's members on every call (15-45 us each here), and
    the relay asks several of them of both streams of every connection: a sizeable part of
    what a new connection costs. The protocols asked this way are made of methods and
    properties, which the class decides, so one answer per class is the answer.
    """
    key = (type(obj), protocol)
    found = _IMPLEMENTS.get(key)
    if found is None:
        found = _IMPLEMENTS[key] = isinstance(obj, protocol)  # type: ignore[arg-type]
    return found


def close_now(resource: trio.abc.AsyncResource) -> bool:
    """Close ``resource`` at once, without a checkpoint, if it can be (a plain
    ``trio.SocketStream``, or anything with a ``close_now()`` saying it could: a mux stream,
    the relay's wrappers around either); ``False`` if it must be closed with ``aclose``.

    What ``trio.aclose_forcefully`` costs is a cancel scope and the resource's own
    checkpoint, a scheduler pass each; every relayed connection closes two or three streams,
    some of them twice (the relay, then the connection's owner), so it is a measurable part
    of a short connection. The close itself is the same either way.
    """
    if type(resource) is trio.SocketStream:
        resource.socket.close()
        return True
    close = getattr(resource, "close_now", None)
    return close is not None and bool(close())


def send_eof_now(stream: trio.abc.AsyncResource) -> bool:
    """Half-close ``stream`` at once, as ``send_eof`` would, without its checkpoint, if it can
    be (see :func:`close_now`): ``False`` if ``send_eof`` must be awaited. Raises what
    ``send_eof`` raises: ``ClosedResourceError`` once closed here, ``BrokenResourceError``
    (its ``__cause__`` the ``OSError``) when the connection broke."""
    if type(stream) is trio.SocketStream:
        sock = stream.socket
        if sock.fileno() < 0:
            raise trio.ClosedResourceError("this socket was already closed")
        if not sock.did_shutdown_SHUT_WR:
            try:
                sock.shutdown(trio.socket.SHUT_WR)
            except OSError as exc:
                raise caused_by(
                    trio.BrokenResourceError(f"socket connection broken: {exc}"), exc
                ) from exc
        return True
    send_eof = getattr(stream, "send_eof_now", None)
    return send_eof is not None and bool(send_eof())


async def aclose_all(*resources: trio.abc.AsyncResource) -> None:
    """Close every resource, even when the caller is being cancelled.

    ``trio.aclose_forcefully`` re-raises ``Cancelled`` when an *outer* scope is cancelled, so a
    plain sequence of them stops at the first and leaks the rest (a socket left open after its
    relay ended). Each trio resource does its closing before its first checkpoint, so calling
    every one and re-raising the first exception afterwards closes them all. What can be
    closed at once (:func:`close_now`) is, with no checkpoint.
    """
    error: BaseException | None = None
    for resource in resources:
        try:
            if close_now(resource):
                continue
            await trio.aclose_forcefully(resource)
        except BaseException as exc:
            if error is None:
                error = exc
    if error is not None:
        raise error


_R = TypeVar("_R", bound=trio.abc.AsyncResource)


async def owned(resource: _R, handler: Callable[[_R], Awaitable[object]]) -> None:
    """Run ``handler(resource)`` and close the resource afterwards, whatever happened.

    A connection handed to a handler task belongs to that task: if the task is cancelled while
    it still waits (for a dial at the far end, say), the connection must not outlive it.
    Closing twice is harmless, so handlers may close it themselves as usual.
    """
    try:
        await handler(resource)
    finally:
        await trio.aclose_forcefully(resource)


@contextlib.contextmanager
def unwrap_cancelled() -> Iterator[None]:
    """Let a cancellation leave a public context manager as the ``Cancelled`` it is.

    Under an outer cancellation every task of a nursery raises ``Cancelled`` and the nursery
    groups them; a caller that catches ``trio.Cancelled`` (or a cancel scope above it) would
    see a ``BaseExceptionGroup`` instead. A group made only of ``Cancelled`` is collapsed to
    its first one; anything else is re-raised untouched.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        cancelled, rest = group.split(trio.Cancelled)
        if rest is None and cancelled is not None:
            leaf: BaseException = cancelled
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            raise caused_by(leaf, None) from None
        raise


_K = TypeVar("_K", bound=Hashable)


class Episodes(Generic[_K]):
    """Refusals counted by episode, so that a storm is logged once, not once per refusal.

    An episode of ``key`` starts with its first refusal (the one to log) and lasts until
    :meth:`end`; what ends it (back under a cap, a slot admitted again) is the caller's rule.
    """

    def __init__(self) -> None:
        self._refused: dict[_K, int] = {}

    def refuse(self, key: _K) -> bool:
        """Count one refusal of ``key``; true for the first of its episode."""
        count = self._refused.get(key, 0)
        self._refused[key] = count + 1
        return count == 0

    def end(self, key: _K) -> int:
        """End the episode of ``key``; how many refusals it counted (0: none was running)."""
        return self._refused.pop(key, 0)

"""Small helpers shared by the I/O layers."""

from __future__ import annotations

import trio

__all__ = ["aclose_all"]


async def aclose_all(*resources: trio.abc.AsyncResource) -> None:
    """Close every resource, even when the caller is being cancelled.

    ``trio.aclose_forcefully`` re-raises ``Cancelled`` when an *outer* scope is cancelled, so a
    plain sequence of them stops at the first and leaks the rest (a socket left open after its
    relay ended). Each trio resource does its closing before its first checkpoint, so calling
    every one and re-raising the first exception afterwards closes them all.
    """
    error: BaseException | None = None
    for resource in resources:
        try:
            await trio.aclose_forcefully(resource)
        except BaseException as exc:
            if error is None:
                error = exc
    if error is not None:
        raise error

"""Running a command's body under trio: signals end it cleanly, a startup failure is one line.

Knows nothing about the commands' options; each command hands over an async function.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable

import trio

import pytunnel

from ._output import fail

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]


def startup_error(exc: BaseException) -> pytunnel.TunnelError | OSError | None:
    """The typed error behind ``exc``, looking through exception groups (nurseries wrap
    what a task raised): the first TunnelError or OSError if the group holds nothing else,
    ``None`` if it holds anything else (a bug, whose traceback must not be hidden)."""
    if isinstance(exc, BaseExceptionGroup):
        found: pytunnel.TunnelError | OSError | None = None
        for inner in exc.exceptions:
            typed = startup_error(inner)
            if typed is None:
                return None
            found = found or typed
        return found
    if isinstance(exc, (pytunnel.TunnelError, OSError)):
        return exc
    return None


_ERRNO_CODES = {
    errno.EADDRINUSE: pytunnel.ErrorCode.ADDRESS_IN_USE,
    errno.EACCES: pytunnel.ErrorCode.PERMISSION_DENIED,
    errno.EPERM: pytunnel.ErrorCode.PERMISSION_DENIED,
}


def describe(error: pytunnel.TunnelError | OSError) -> str:
    """``[CODE_NAME] message``: the error code's name, or for an OS error the matching
    code's name if there is one, else the errno's."""
    if isinstance(error, pytunnel.TunnelError):
        return str(error)
    code = _ERRNO_CODES.get(error.errno or 0)
    if code is not None:
        name = code.name
    elif isinstance(error, ssl.SSLError):
        name = pytunnel.ErrorCode.TLS_FAILED.name
    else:
        name = errno.errorcode.get(error.errno or 0, "OS_ERROR")
    reason = error.strerror or str(error)
    if error.filename is not None:
        reason = f"{error.filename}: {reason}"
    return f"[{name}] {reason}"


#: glibc's ``mallopt`` parameters (``<malloc.h>``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations at least this large get pages of their own (glibc's default is 128 KiB).
MMAP_THRESHOLD = 1 << 20
#: Free memory at the top of the heap kept for reuse instead of given back at once.
TRIM_THRESHOLD = 4 << 20


def tune_allocator() -> bool:
    """Have glibc's allocator keep the relay's large buffers instead of returning them to
    the kernel after each use; whether it was done.

    The session reads its socket 256 KiB at a time, and TLS and the relays hand on buffers
    of that size: above glibc's default thresholds every one of them is its own ``mmap``
    (or grows and trims the heap), so each read costs page faults and zeroed pages in the
    kernel. Measured on bulk through TLS: 90,000-220,000 minor page faults per GiB
    received, down to about 7,000 with these thresholds; plain bulk through ``-L`` 8 %
    less CPU per GB (docs/performance.md, "The allocator's thresholds"). The cost is up to
    ``TRIM_THRESHOLD`` of freed memory kept per process. A threshold set in the
    environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or their tunables in
    ``GLIBC_TUNABLES``) is left as it is: ``mallopt`` would override it; other C libraries,
    and platforms without ``mallopt``, are left alone.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    tunables = _glibc_tunables()
    done = False
    for name, param, value in (
        ("mmap_threshold", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("trim_threshold", _M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ):
        if f"MALLOC_{name.upper()}_" not in os.environ and name not in tunables:
            done = bool(mallopt(param, value)) or done
    return done


def _glibc_tunables() -> set[str]:
    """The ``glibc.malloc.*`` tunables named in ``GLIBC_TUNABLES`` (``name=value`` pairs
    separated by colons), without their prefix."""
    names = set()
    for item in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, _ = item.partition("=")
        if name.startswith("glibc.malloc."):
            names.add(name.removeprefix("glibc.malloc."))
    return names


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` under trio; SIGINT/SIGTERM end it cleanly with status 0, a TunnelError
    or OSError (however deeply nested in exception groups) ends it with one line on stderr
    and status 1. The allocator is tuned first (:func:`tune_allocator`)."""
    tune_allocator()
    failure: list[pytunnel.TunnelError | OSError] = []

    async def wrapper() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:
                        logging.getLogger("pytunnel").info(
                            "received %s, shutting down", signal.Signals(signum).name
                        )
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch)
                try:
                    await main()
                except (pytunnel.TunnelError, OSError, BaseExceptionGroup) as exc:
                    typed = startup_error(exc)
                    if typed is None:
                        raise
                    failure.append(typed)
                nursery.cancel_scope.cancel()

    trio.run(wrapper)
    if failure:
        fail(describe(failure[0]))

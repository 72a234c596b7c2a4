"""TLS on a TCP socket with OpenSSL doing the socket I/O itself.

``trio.SSLStream`` works over any stream, so it drives OpenSSL through memory BIOs from
Python: every record is copied between the socket, a BIO and a Python buffer, and every
``receive_some`` returns at most one 16 KiB record, so a bulk transfer pays a full round of
Python (and a scheduler pass) per record. When the control connection is a plain
``trio.SocketStream``, :class:`TLSSocketStream` hands the socket's descriptor to a
non-blocking ``ssl.SSLSocket`` instead: OpenSSL reads and writes the socket directly, one
``receive_some`` decrypts every record already available up to ``max_bytes``, and one
``send_all`` encrypts its whole buffer in one call. Trio only waits for readiness
(``wait_readable`` / ``wait_writable``) when OpenSSL says it wants to read or write. The
session reads it as it reads a plain socket (``receive_nowait`` / ``wait``, the
``pytunnel._direct.DirectReader`` protocol) and writes it inline (``send_nowait``).

The semantics are ``trio.SSLStream``'s with ``https_compatible=False``, which is what the
session was written against: ``receive_some`` returns ``b""`` only after the peer's
``close_notify``; a connection that ends without one (a truncation) raises
``BrokenResourceError``, never a clean EOF; ``aclose`` sends our ``close_notify`` once,
without waiting for the peer's, then closes the socket (a cancelled, i.e. forceful, close
sends nothing, as ``trio.SSLStream``'s); every ``OSError`` (``ssl.SSLError`` included)
becomes ``BrokenResourceError`` with the original as ``__cause__``; ``ClosedResourceError``
means we closed it.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["TLSSocketStream", "wrap_socket_stream"]

#: Plaintext bytes per ``receive_some`` when the caller gives no ``max_bytes``: sixteen full
#: TLS records (the session asks for its own ``receive_size``).
DEFAULT_RECEIVE_SIZE = 256 * 1024

#: Plaintext bytes per ``SSL_write`` call. OpenSSL cuts them into 16 KiB records itself; a
#: bound keeps the buffer a retry after ``SSLWantWriteError`` must repeat (OpenSSL requires
#: the same bytes again) small next to the socket buffer.
_WRITE_CHUNK = 256 * 1024

#: When the other direction already waits on the socket for the readiness we need (a rare
#: renegotiation-style want: a read that must write, a write that must read), trio allows
#: only one waiter per descriptor and direction, so we poll at this interval instead.
_SHARED_WAIT_POLL = 0.005


#: At most this many 64 KiB reads of unread bytes before closing (see _discard_unread).
_DISCARD_READS = 4


def wrap_socket_stream(
    stream: trio.SocketStream,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
) -> TLSSocketStream:
    """Move ``stream``'s socket into a :class:`TLSSocketStream` (handshake not started).

    ``stream`` is unusable afterwards (its socket is detached, not closed): the returned
    stream owns the descriptor and closes it. Raises what ``SSLContext.wrap_socket`` raises
    (``ValueError`` for a bad ``server_hostname``, ``OSError``); the descriptor is closed
    then.
    """
    trio_socket = stream.socket
    family, kind, proto = trio_socket.family, trio_socket.type, trio_socket.proto
    fd = trio_socket.detach()
    plain = socket.socket(family, kind, proto, fileno=fd)
    try:
        plain.setblocking(False)
        tls = context.wrap_socket(
            plain,
            server_side=server_side,
            server_hostname=server_hostname,
            do_handshake_on_connect=False,
            # a TCP EOF without close_notify must raise, never look like a clean end
            suppress_ragged_eofs=False,
        )
    except BaseException:
        plain.close()
        raise
    return TLSSocketStream(tls)


class TLSSocketStream(trio.abc.Stream):
    """A TLS connection over a non-blocking ``ssl.SSLSocket``; build it with
    :func:`wrap_socket_stream` and run :meth:`do_handshake` before anything else.

    One task may send while another receives (the session's writer and reader); two
    concurrent senders or receivers raise ``BusyResourceError``, as on any trio stream.
    """

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self._tls = tls
        # ssl.SSLSocket's read and write are Python wrappers around its private _SSLSocket's
        # (a closed check and EOF suppression, which suppress_ragged_eofs=False turns off):
        # called per record, the wrappers cost more than they check. The public methods are
        # the fallback where the private object is missing.
        obj = getattr(tls, "_sslobj", None)
        self._read: Callable[[int, memoryview], int] = (
            obj.read if obj is not None else tls.read  # type: ignore[assignment]
        )
        self._write: Callable[[memoryview], int] = obj.write if obj is not None else tls.write
        self._closed = False
        #: Set after an error or an interrupted write: OpenSSL's state is unknown, so every
        #: later operation raises and ``aclose`` sends no ``close_notify``.
        self._broken: BaseException | None = None
        self._handshook = False
        self._sending = False
        self._receiving = False
        #: Which task waits on the descriptor for what, so the other direction never waits
        #: on the same readiness (trio allows one waiter each).
        self._waiting_readable = False
        self._waiting_writable = False
        #: Plaintext an inline :meth:`send_nowait` left half-written inside OpenSSL (it took
        #: the record, the socket did not): the next write must repeat exactly these bytes.
        self._half_written = 0
        #: Decrypted records land here first; grown to the largest ``max_bytes`` asked for
        #: (allocated on the first read, so an idle stream holds none).
        self._scratch = bytearray()
        #: The last read stopped because OpenSSL wanted to write (a renegotiation-style
        #: want): what the reader waits for is writability, not readability.
        self._read_wants_write = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self._broken else "open"
        return f"<TLSSocketStream {state} fd={self._tls.fileno()}>"

    # -------------------------------------------------------------- information

    @property
    def ssl_object(self) -> ssl.SSLSocket:
        """The underlying ``ssl.SSLSocket``, for inspection only (``version()``,
        ``cipher()``...); reading or writing it directly would desynchronise this stream."""
        return self._tls

    def getpeercert(self, binary_form: bool = False) -> Any:
        """``ssl.SSLSocket.getpeercert``: the peer's certificate, as ``trio.SSLStream``
        forwards it."""
        return self._tls.getpeercert(binary_form)

    def selected_alpn_protocol(self) -> str | None:
        return self._tls.selected_alpn_protocol()

    def version(self) -> str | None:
        return self._tls.version()

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed)."""
        return self._tls.fileno()

    # -------------------------------------------------------------- helpers

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream was closed")
        if self._broken is not None:
            raise trio.BrokenResourceError("the TLS stream is broken") from self._broken

    def _fail(self, exc: BaseException) -> trio.BrokenResourceError:
        """Mark the stream broken by ``exc`` and return the error to raise."""
        if self._broken is None:
            self._broken = exc
        error = trio.BrokenResourceError(f"TLS connection failed: {exc}")
        error.__cause__ = exc
        return error

    async def _wait_readable(self) -> None:
        if self._waiting_readable:
            await trio.sleep(_SHARED_WAIT_POLL)
            return
        self._waiting_readable = True
        try:
            await trio.lowlevel.wait_readable(self._tls)
        finally:
            self._waiting_readable = False

    async def _wait_writable(self) -> None:
        if self._waiting_writable:
            await trio.sleep(_SHARED_WAIT_POLL)
            return
        self._waiting_writable = True
        try:
            await trio.lowlevel.wait_writable(self._tls)
        finally:
            self._waiting_writable = False

    def _after_close(self) -> None:
        """Raise ``ClosedResourceError`` if the stream was closed while we waited."""
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream was closed")

    # -------------------------------------------------------------- handshake

    async def do_handshake(self) -> None:
        """Run the TLS handshake; raises ``BrokenResourceError`` (``__cause__`` the
        ``ssl.SSLError`` or ``OSError``). A cancelled handshake leaves the stream broken."""
        self._check()
        if self._handshook:
            await trio.lowlevel.checkpoint()
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        try:
            while True:
                try:
                    self._tls.do_handshake()
                except ssl.SSLWantReadError:
                    waited = True
                    await self._wait_readable()
                except ssl.SSLWantWriteError:
                    waited = True
                    await self._wait_writable()
                else:
                    break
                self._after_close()
        except OSError as exc:
            raise self._fail(exc) from exc
        except BaseException as exc:
            if not isinstance(exc, trio.ClosedResourceError):
                self._fail(exc)
            raise
        self._handshook = True
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    # -------------------------------------------------------------- receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Decrypt up to ``max_bytes`` of plaintext: every record already available, after
        waiting for the first one if none is. ``b""`` after the peer's ``close_notify``."""
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._check()
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            data = self._receive_nowait(max_bytes)
            if data is None:
                while True:
                    await self._wait_for_read()
                    data = self._receive_nowait(max_bytes)
                    if data is not None:
                        return data
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    # The session's reader reads through these two (``pytunnel._direct.DirectReader``, driven
    # by ``PacedReads``) instead of ``receive_some``: no coroutine and no checkpoint per
    # read, and after a short read (OpenSSL found the socket empty) a wait for readability
    # first instead of a read that fails.

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        """What :meth:`receive_some` would return now without waiting (``b""`` after the
        peer's ``close_notify``), or ``None`` when no whole record is there yet. Raises as
        :meth:`receive_some` does. For the stream's only reader; it is no checkpoint."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._check()
        return self._receive_nowait(max_bytes)

    async def wait(self) -> None:
        """Return once :meth:`receive_nowait` may find something (a checkpoint): the socket
        turned readable, or writable when OpenSSL's read wanted to write."""
        self._check()
        await self._wait_for_read()

    async def _wait_for_read(self) -> None:
        if self._read_wants_write:
            await self._wait_writable()
        else:
            await self._wait_readable()
        self._after_close()

    def _receive_nowait(self, max_bytes: int) -> bytes | None:
        read = self._read
        scratch = self._scratch
        if len(scratch) < max_bytes:
            scratch = self._scratch = bytearray(max_bytes)
        filled = 0
        ended = False
        view = memoryview(scratch)
        try:
            while filled < max_bytes:
                try:
                    got = read(max_bytes - filled, view[filled:])
                except ssl.SSLWantReadError:
                    # nothing buffered in OpenSSL either (pending() is 0 when it wants
                    # to read): the socket is empty
                    self._read_wants_write = False
                    break
                except ssl.SSLWantWriteError:
                    self._read_wants_write = True
                    break
                if not got:  # close_notify: a clean end of the stream
                    ended = True
                    break
                filled += got
        except OSError as exc:
            if not filled:
                view.release()
                raise self._fail(exc) from exc
            # hand over what was decrypted; the error comes back on the next call
            self._broken = exc
        if not filled:
            view.release()
            return b"" if ended else None
        # a copy: the caller may keep (slices of) what it gets, the scratch is reused
        with view, view[:filled] as piece:
            return piece.tobytes()

    # -------------------------------------------------------------- sending

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt and write as much of ``data`` as the socket takes now, without waiting;
        returns how many bytes of ``data`` were handed over for good.

        The rest (``data[returned:]``) must be what is written next, by this method or by
        :meth:`send_all`, byte for byte: a record OpenSSL encrypted but could not write yet
        is retried from those bytes (OpenSSL's rule for ``SSL_write``). Any error leaves
        everything to the next call, which raises it. For the session's inline writes; only
        one task may write at a time.
        """
        if self._closed or self._broken is not None or not self._handshook or self._sending:
            return 0
        view = memoryview(data)
        pos = 0
        write = self._write
        try:
            while pos < len(view):
                # a record left half-written last time is retried with the same bytes
                piece = view[pos : pos + (self._half_written or _WRITE_CHUNK)]
                try:
                    pos += write(piece)
                except ssl.SSLWantWriteError:
                    # OpenSSL may hold part of ``piece``: the caller's next write starts
                    # with it, which is the retry OpenSSL asks for
                    self._half_written = len(piece)
                    break
                self._half_written = 0
        except ssl.SSLWantReadError:
            pass
        except OSError as exc:
            self._broken = exc
        return pos

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and write it all. A cancelled ``send_all`` may have written part
        of ``data``; the stream is broken then (as ``trio.SSLStream`` may be)."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._check()
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            await self._send(data)
        finally:
            self._sending = False

    async def _send(self, data: bytes | bytearray | memoryview) -> None:
        write = self._write
        waited = False
        with memoryview(data) as view:
            total = len(view)
            pos = 0
            try:
                while pos < total:
                    half = self._half_written
                    size = half if half else _WRITE_CHUNK
                    if half and total - pos < half:
                        raise RuntimeError("send_nowait's unwritten bytes were not repeated")
                    piece = view[pos : pos + size]
                    try:
                        written = write(piece)
                    except ssl.SSLWantWriteError:
                        self._half_written = len(piece)
                        waited = True
                        await self._wait_writable()
                        self._after_close()
                        continue
                    except ssl.SSLWantReadError:
                        self._half_written = len(piece)
                        waited = True
                        await self._wait_readable()
                        self._after_close()
                        continue
                    self._half_written = 0
                    pos += written
            except OSError as exc:
                raise self._fail(exc) from exc
            except BaseException as exc:
                if self._half_written and not isinstance(exc, trio.ClosedResourceError):
                    self._fail(exc)  # OpenSSL holds a record we will never complete
                raise
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await self._wait_writable()
        finally:
            self._sending = False
        self._after_close()

    # -------------------------------------------------------------- closing

    async def aclose(self) -> None:
        """Send our ``close_notify`` (once, not waiting for the peer's) and close the
        socket. When cancelled, or after an error, the socket is just closed."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._broken is None and self._handshook:
                await trio.lowlevel.checkpoint_if_cancelled()
                await self._close_notify()
        finally:
            self._close_socket()
        await trio.lowlevel.checkpoint()

    async def _close_notify(self) -> None:
        if self._half_written:
            return  # a record must be finished first; the peer will see a truncation
        while True:
            try:
                self._tls.unwrap()
            except ssl.SSLWantWriteError:
                # the alert did not fit in the socket buffer: wait, as trio.SSLStream's
                # aclose waits for its transport's send_all
                if self._closed:
                    return
                try:
                    await self._wait_writable()
                except trio.ClosedResourceError:
                    return
                continue
            except (ssl.SSLWantReadError, OSError, ValueError):
                # WantRead: sent, the peer's close_notify has not come (we do not wait for
                # it); OSError: the peer is gone already; either way we are done
                return
            return

    def _close_socket(self) -> None:
        if self._closed:
            return
        self._closed = True
        tls = self._tls
        if tls.fileno() >= 0:
            self._discard_unread()
            trio.lowlevel.notify_closing(tls)
        tls.close()

    def _discard_unread(self) -> None:
        """Read and drop what the peer sent that OpenSSL did not read. Closing a socket with
        unread bytes makes the kernel answer with a reset instead of a FIN, and a reset can
        destroy what we sent last before the peer reads it: the alert that tells a client
        speaking plaintext that this is a TLS server (``trio.SSLStream`` had always read
        everything into its BIO, so its alerts arrived). Non-blocking and bounded."""
        raw_recv = socket.socket.recv  # the descriptor's bytes, not OpenSSL's plaintext
        for _ in range(_DISCARD_READS):
            try:
                if len(raw_recv(self._tls, 65536)) < 65536:
                    return
            except OSError:  # BlockingIOError: nothing (more) unread
                return

"""TLS for the control connection: contexts, certificate pinning, self-signed certificates.

The session runs unchanged on top of the TLS stream. Over a plain TCP connection that is a
:class:`~pytunnel._tls_stream.TLSSocketStream` (OpenSSL reads and writes the socket itself);
over anything else (a WebSocket, a proxy's stream that already holds bytes, stdio) it is
``trio.SSLStream``, which works over any stream; both behave the same to the session. Files
are read in a worker thread (``trio.to_thread``) so loading a key never blocks the event
loop. Fingerprints use OpenSSH's notation: ``SHA256:`` followed by the unpadded base64 of
the SHA-256 of the DER certificate.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path

import trio

from ._tls_stream import TLSSocketStream, wrap_socket_stream
from .errors import ConnectError, TLSError

__all__ = [
    "certificate_fingerprint",
    "client_tls_context",
    "ensure_self_signed",
    "parse_fingerprint",
    "server_tls_context",
    "tls_accept",
    "tls_connect",
]

#: What :func:`tls_connect` and :func:`tls_accept` return.
TLSStream = trio.SSLStream[trio.abc.Stream] | TLSSocketStream

log = logging.getLogger("pytunnel.tls")


def certificate_fingerprint(der: bytes) -> str:
    """``SHA256:...`` of a DER certificate, as printed by ``pytunnel serve``."""
    digest = hashlib.sha256(der).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def parse_fingerprint(text: str) -> bytes:
    """The SHA-256 digest named by ``SHA256:<base64>`` or by hex (colons allowed)."""
    value = text.strip()
    if value.upper().startswith("SHA256:"):
        encoded = value[7:]
        try:
            digest = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error:
            raise ValueError(f"bad fingerprint {text!r}: not base64") from None
    else:
        try:
            digest = bytes.fromhex(value.replace(":", ""))
        except ValueError:
            raise ValueError(f"bad fingerprint {text!r}: expected SHA256:<base64> or hex") from None
    if len(digest) != 32:
        raise ValueError(f"bad fingerprint {text!r}: a SHA-256 digest is 32 bytes")
    return digest


def _base_context(purpose: ssl.Purpose, *, system_store: bool = True) -> ssl.SSLContext:
    """The defaults of ``ssl.create_default_context``; with ``system_store``, the system's
    CA certificates are loaded, which reads files: call it in a worker thread."""
    if system_store:
        context = ssl.create_default_context(purpose)
    else:
        context = ssl.SSLContext(
            ssl.PROTOCOL_TLS_CLIENT
            if purpose is ssl.Purpose.SERVER_AUTH
            else ssl.PROTOCOL_TLS_SERVER
        )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def _load(what: str, load: Callable[[], None]) -> None:
    """Run a file-reading ``load`` in a worker thread; a bad or unreadable file becomes one
    TLSError naming it."""
    try:
        await trio.to_thread.run_sync(load)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise TLSError(f"cannot load {what}: {reason}") from None


async def server_tls_context(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    *,
    client_ca_file: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A server context (TLS 1.2+, 1.3 preferred by OpenSSL). With ``client_ca_file``, clients
    must present a certificate signed by it (mutual TLS)."""
    context = await trio.to_thread.run_sync(_base_context, ssl.Purpose.CLIENT_AUTH)
    await _load(
        f"the certificate {cert_file} and key {key_file}",
        functools.partial(context.load_cert_chain, str(cert_file), str(key_file)),
    )
    if client_ca_file is not None:
        await _load(
            f"the client CA {client_ca_file}",
            functools.partial(context.load_verify_locations, str(client_ca_file)),
        )
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def client_tls_context(
    *,
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
    pinned: bool = False,
) -> ssl.SSLContext:
    """A client context verifying the server against the system store or ``ca_file``, with
    the host name checked. ``pinned``: verification is done by fingerprint instead (for
    self-signed servers), so the chain and name are not checked by OpenSSL and the system
    store is not even loaded. Every file is read in a worker thread, never on the event
    loop; build the context once and reuse it for every connection."""
    context = await trio.to_thread.run_sync(
        functools.partial(_base_context, ssl.Purpose.SERVER_AUTH, system_store=not pinned)
    )
    if pinned:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_file is not None:
        await _load(
            f"the CA {ca_file}", functools.partial(context.load_verify_locations, str(ca_file))
        )
    if cert_file is not None:
        await _load(
            f"the client certificate {cert_file}",
            functools.partial(
                context.load_cert_chain, str(cert_file), str(key_file) if key_file else None
            ),
        )
    return context


def _describe_ssl_error(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate verification failed: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            reason = cause.reason or str(cause)
            if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
                return f"the peer is not speaking TLS ({reason})"
            return f"TLS handshake failed: {reason}"
        cause = cause.__cause__ or cause.__context__
    return f"TLS handshake failed: {exc}"


def _wrap(
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
) -> TLSStream:
    """The TLS stream over ``stream``, handshake not started: OpenSSL on the socket itself
    when ``stream`` is exactly a plain ``trio.SocketStream`` (a subclass may change what
    its bytes are), ``trio.SSLStream`` over any other stream."""
    if type(stream) is trio.SocketStream:
        return wrap_socket_stream(
            stream, context, server_side=server_side, server_hostname=server_hostname
        )
    return trio.SSLStream(stream, context, server_side=server_side, server_hostname=server_hostname)


async def tls_connect(
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None,
    fingerprint: str | None = None,
    timeout: float,
) -> TLSStream:
    """Run the client side of the TLS handshake; check the pin if one is given.

    Raises :class:`TLSError` with one clear sentence; the stream is closed on failure.
    """
    try:
        tls = _wrap(stream, context, server_side=False, server_hostname=server_hostname)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    try:
        with trio.fail_after(timeout):
            await tls.do_handshake()
        if fingerprint is not None:
            expected = parse_fingerprint(fingerprint)
            der = tls.getpeercert(binary_form=True)
            got = hashlib.sha256(der or b"").digest()
            if not hmac.compare_digest(expected, got):
                raise TLSError(
                    "server certificate fingerprint mismatch: expected "
                    f"{fingerprint.strip()}, got {certificate_fingerprint(der or b'')}"
                )
    except trio.TooSlowError:
        await trio.aclose_forcefully(tls)
        raise TLSError(f"TLS handshake did not finish within {timeout:g} s") from None
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tls)
        raise TLSError(_describe_ssl_error(exc)) from None
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


async def tls_accept(
    stream: trio.abc.Stream, context: ssl.SSLContext, *, timeout: float, peer: str
) -> TLSStream:
    """Run the server side of the TLS handshake; raise :class:`TLSError` (stream closed)."""
    try:
        tls = _wrap(stream, context, server_side=True)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    try:
        with trio.fail_after(timeout):
            await tls.do_handshake()
    except trio.TooSlowError:
        await trio.aclose_forcefully(tls)
        raise TLSError(f"TLS handshake with {peer} timed out") from None
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tls)
        raise TLSError(f"TLS handshake with {peer} failed: {_describe_ssl_error(exc)}") from None
    except BaseException:
        # the TLS stream may own the socket now (TLSSocketStream): closing the stream
        # we were given would leave the descriptor open
        await trio.aclose_forcefully(tls)
        raise
    return tls


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` for us alone: a new file (never an existing one, never through a
    symlink someone planted there), 0600 before the first byte whatever the umask."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    except FileExistsError:
        raise TLSError(f"refusing to write {path}: something (a link?) is already there") from None
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # the umask may have taken bits off, never added
        handle.write(data)


def _remove_stale(path: Path) -> None:
    """Remove what is left of an incomplete pair, if it is a plain file of ours; anything
    else (a symlink, say) stays, and writing the new file is refused."""
    try:
        if path.is_symlink() or not path.is_file():
            return
    except OSError:
        return
    path.unlink()


def _make_self_signed(cert_path: Path, key_path: Path, names: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(key_path, key_bytes)
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def _load_or_make(directory: Path, names: list[str]) -> tuple[Path, Path, str]:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    if not (cert_path.exists() and key_path.exists()):
        _remove_stale(cert_path)
        _remove_stale(key_path)
        _make_self_signed(cert_path, key_path, names)
        log.info("created a self-signed certificate in %s", directory)
    der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
    return cert_path, key_path, certificate_fingerprint(der)


async def ensure_self_signed(
    directory: str | os.PathLike[str], names: list[str] | None = None
) -> tuple[Path, Path, str]:
    """Create (once) and reuse a self-signed certificate and key in ``directory``; both files
    are written with 0600 permissions. Returns ``(cert, key, fingerprint)``."""
    try:
        return await trio.to_thread.run_sync(
            _load_or_make, Path(directory), names or ["localhost", "127.0.0.1", "::1"]
        )
    except ImportError:  # pragma: no cover - cryptography is a dependency
        raise ConnectError("the 'cryptography' package is needed for --tls-self-signed") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise TLSError(
            f"cannot set up the self-signed certificate in {directory}: {reason}"
        ) from None

"""TLS options of both commands: certificate, key and CA files, self-signed setup, pins.

Turns file options into ``ssl.SSLContext`` objects through the library; knows nothing about
what the tunnel does with them.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import click
import trio

import pytunnel.tls

from ._options import EXISTING_FILE, config_check, stack

server_tls_options = stack(
    click.option(
        "--tls-cert",
        type=EXISTING_FILE,
        help="TLS certificate (PEM) for the control connection.",
    ),
    click.option(
        "--tls-key",
        type=EXISTING_FILE,
        help="Private key (PEM) of --tls-cert.",
    ),
    click.option(
        "--tls-self-signed",
        is_flag=True,
        help="Use TLS with a self-signed certificate, made on first start in --tls-dir "
        "and reused; prints the fingerprint clients pin.",
    ),
    click.option(
        "--tls-dir",
        type=click.Path(file_okay=False),
        default=lambda: str(Path.home() / ".config" / "pytunnel" / "tls"),
        show_default="~/.config/pytunnel/tls",
        help="Where --tls-self-signed keeps its certificate and key (0600).",
    ),
    click.option(
        "--tls-client-ca",
        type=EXISTING_FILE,
        help="Require client certificates signed by this CA (mutual TLS).",
    ),
)

client_tls_options = stack(
    click.option(
        "--tls",
        "use_tls",
        is_flag=True,
        help="Use TLS, verifying the server against the system trust store.",
    ),
    click.option(
        "--tls-ca",
        type=EXISTING_FILE,
        help="Use TLS, verifying the server against this CA bundle instead.",
    ),
    click.option(
        "--tls-fingerprint",
        metavar="SHA256:...",
        callback=config_check(pytunnel.ClientConfig, "tls_fingerprint"),
        help="Use TLS and pin the server certificate (for self-signed servers).",
    ),
    click.option(
        "--tls-server-name",
        help="Name the server certificate must carry (default: the host connected to).",
    ),
    click.option(
        "--tls-cert",
        type=EXISTING_FILE,
        help="Client certificate (PEM) for mutual TLS.",
    ),
    click.option(
        "--tls-key",
        type=EXISTING_FILE,
        help="Private key of --tls-cert.",
    ),
)


def check_server_tls(tls_cert: str | None, tls_key: str | None, tls_self_signed: bool) -> None:
    """Usage errors of the server's TLS options, raised before anything starts."""
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_cert and tls_self_signed:
        raise click.UsageError("--tls-cert and --tls-self-signed exclude each other")


async def server_tls(
    tls_cert: str | None,
    tls_key: str | None,
    tls_self_signed: bool,
    tls_dir: str,
    tls_client_ca: str | None,
    names: list[str] | None = None,
) -> tuple[ssl.SSLContext | None, str | None]:
    """The server's TLS context and its certificate's fingerprint (both ``None``: plain).
    ``names``: what a self-signed certificate made now names (default: loopback's).

    Runs inside ``trio.run`` so that an unreadable file is a startup error (one line), like
    every other failure after the arguments were parsed.
    """
    tls: ssl.SSLContext | None = None
    fingerprint: str | None = None
    cert, key = tls_cert, tls_key
    if tls_self_signed:
        cert_path, key_path, fingerprint = await pytunnel.tls.ensure_self_signed(tls_dir, names)
        cert, key = str(cert_path), str(key_path)
    if cert is not None and key is not None:
        tls = await pytunnel.tls.server_tls_context(cert, key, client_ca_file=tls_client_ca)
        if fingerprint is None:
            der = ssl.PEM_cert_to_DER_cert(await trio.Path(cert).read_text())
            fingerprint = pytunnel.tls.certificate_fingerprint(der)
    return tls, fingerprint


async def client_tls(
    use_tls: bool,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_fingerprint: str | None,
) -> ssl.SSLContext | None:
    """The client's TLS context, or ``None`` when no option asks for TLS (a fingerprint
    alone makes the library use TLS with the pin as the only check)."""
    if use_tls or tls_ca or tls_cert:
        return await pytunnel.tls.client_tls_context(
            ca_file=tls_ca,
            cert_file=tls_cert,
            key_file=tls_key,
            pinned=tls_fingerprint is not None,
        )
    return None

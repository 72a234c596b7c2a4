"""TLS for the tunnel connection: contexts, certificate fingerprints and pins, self-signed
certificates.

The public home of these functions (the command line and applications import them from
here); the implementation lives in ``pytunnel._tls``.
"""

from ._tls import certificate_fingerprint as certificate_fingerprint
from ._tls import client_tls_context as client_tls_context
from ._tls import ensure_self_signed as ensure_self_signed
from ._tls import parse_fingerprint as parse_fingerprint
from ._tls import server_tls_context as server_tls_context
from ._tls import tls_accept as tls_accept
from ._tls import tls_connect as tls_connect

__all__ = [
    "certificate_fingerprint",
    "client_tls_context",
    "ensure_self_signed",
    "parse_fingerprint",
    "server_tls_context",
    "tls_accept",
    "tls_connect",
]

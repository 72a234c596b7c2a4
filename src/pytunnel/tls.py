"""TLS for the tunnel connection: contexts, certificate fingerprints and pins, self-signed
certificates.

The public home of these functions (the command line and applications import them from
here); the implementation lives in ``pytunnel._tls``. The ``name as name`` imports below are
the re-exports (no ``__all__`` to keep in step with them).
"""

from ._tls import certificate_fingerprint as certificate_fingerprint
from ._tls import client_tls_context as client_tls_context
from ._tls import ensure_self_signed as ensure_self_signed
from ._tls import parse_fingerprint as parse_fingerprint
from ._tls import server_tls_context as server_tls_context
from ._tls import tls_accept as tls_accept
from ._tls import tls_connect as tls_connect

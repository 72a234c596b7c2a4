"""The ``pytunnel`` command line: a thin click front end over the library.

One module per command (``_serve``, ``_connect``) and per concern (``_options``, ``_token``,
``_tlsfiles``, ``_logs``, ``_output``, ``_run``, ``_status``). Everything here is presentation:
the library does the work inside ``trio.run``, reached only through its public API.
"""

from ._main import main as main

__all__ = ["main"]

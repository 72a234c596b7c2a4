"""Binding listeners (``_listen.py``): OS failures come back as typed forward errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_permission_denied_is_typed() -> None:
    """Binding a privileged port as an unprivileged user (a subprocess that drops root)."""
    script = textwrap.dedent(
        """
        import os, trio, encodings.idna
        from pytunnel._listen import bind
        from pytunnel import PermissionDeniedError
        if os.geteuid() == 0:
            os.setgid(65534); os.setuid(65534)
        async def main():
            try:
                await bind("127.0.0.1", 81)
            except PermissionDeniedError as exc:
                print("typed", exc.code, exc.address)
        trio.run(main)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "typed 2102 127.0.0.1:81", out.stderr

"""``python -m pytunnel.cli``: the same command as ``python -m pytunnel``."""

from . import main

main()

"""``python -m pytunnel``: the ``pytunnel`` command, for when the console script is not on PATH."""

from .cli import main

main()

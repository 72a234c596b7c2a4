"""The ``pytunnel`` command line: a thin click front end over the library."""

from .main import main as main

__all__ = ["main"]

"""Which build is running: pure Python, or with the hot modules compiled by mypyc.

``pip install .`` compiles the modules of ``HOT_MODULES`` with mypyc when it and a C compiler
are there (``setup.py``; ``PYTUNNEL_PURE=1`` builds pure Python), and each one's ``.py`` stays
beside its extension module: Python imports the extension when it exists, the source otherwise.
What is reported here is therefore found the way an import finds it, without importing anything
(``pytunnel --version`` must stay cheap).
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

#: The per-message path: frame codec, multiplexer and its state tables, the session and its
#: streams, the direct readers, the relay, the fault wrapper's per-message paths (every
#: forward's relays go through it) and the close/half-close helpers. ``setup.py`` reads this tuple
#: (without importing the package).
HOT_MODULES = (
    "pytunnel.protocol.frames",
    "pytunnel.protocol.mux",
    "pytunnel.protocol.streams",
    "pytunnel._session",
    "pytunnel._stream",
    "pytunnel._direct",
    "pytunnel._util",
    "pytunnel._relay",
    "pytunnel._fault_io",
)


def compiled_modules() -> list[str]:
    """The modules of ``HOT_MODULES`` that import as compiled extension modules."""
    root = Path(__file__).resolve().parent.parent
    found = []
    for name in HOT_MODULES:
        package, _, leaf = name.rpartition(".")
        where = str(root.joinpath(*package.split(".")))
        spec = importlib.machinery.PathFinder.find_spec(leaf, [where])
        if spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            found.append(name)
    return found


def describe() -> str:
    """How ``pytunnel --version`` names the build."""
    return "compiled by mypyc" if compiled_modules() else "pure Python"

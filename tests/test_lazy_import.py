"""``import pytunnel`` is cheap: its public names are imported on first use (PEP 562), each
still reachable as ``pytunnel.X`` and ``from pytunnel import X``, and visible as written to
type checkers. Each check that depends on what is already imported runs in a fresh
interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pytunnel

pytestmark = pytest.mark.timeout(60)

_INIT = Path(pytunnel.__file__)

#: Modules ``import pytunnel`` must leave alone: the event loop, TLS, the HTTP stack, the
#: metrics, the task server and what the CLI shows, and the library's own layers.
HEAVY = (
    "trio",
    "attrs",
    "cattrs",
    "cryptography",
    "prometheus_client",
    "h11",
    "wsproto",
    "rich",
    "httpx",
    "pytunnel.client",
    "pytunnel.server",
    "pytunnel.session",
    "pytunnel.metrics",
    "pytunnel.tasks",
    "pytunnel.cli",
)


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=45, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _checked_imports() -> dict[str, str]:
    """``name: module`` of the imports in ``__init__``'s ``if TYPE_CHECKING:`` block."""
    tree = ast.parse(_INIT.read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom), ast.unparse(statement)
                assert statement.level == 1
                for alias in statement.names:
                    assert alias.asname == alias.name, "a re-export is written `X as X`"
                    module = "." + (statement.module or "")
                    found[alias.name] = module if statement.module else f".{alias.name}"
    return found


def test_the_lazy_table_the_type_checked_imports_and_all_agree() -> None:
    checked = _checked_imports()
    assert len(checked) >= 70
    assert checked == pytunnel._LAZY
    assert list(pytunnel.__all__) == list(pytunnel._LAZY)
    assert len(set(pytunnel.__all__)) == len(pytunnel.__all__)


def test_import_pytunnel_loads_none_of_the_heavy_modules() -> None:
    out = _run(
        "import sys, pytunnel\n"
        f"print(sorted(m for m in sys.modules if m.startswith({HEAVY!r})))\n"
        "print(pytunnel.__version__)"
    )
    assert out.splitlines() == ["[]", pytunnel.__version__]


def test_a_name_asked_for_is_imported_then_kept() -> None:
    out = _run(
        "import sys, pytunnel\n"
        "print('Tunnel' in vars(pytunnel), 'pytunnel.client' in sys.modules)\n"
        "tunnel = pytunnel.Tunnel\n"
        "print('Tunnel' in vars(pytunnel), 'pytunnel.client' in sys.modules)\n"
        "print(tunnel is pytunnel.Tunnel, tunnel.__module__)"
    )
    assert out.splitlines() == ["False False", "True True", "True pytunnel.client"]


#: One fresh interpreter per defining module: a name first reached through its own module
#: is where an import cycle would show.
_BY_MODULE: dict[str, list[str]] = {}
for _name, _module in pytunnel._LAZY.items():
    _BY_MODULE.setdefault(_module, []).append(_name)


@pytest.mark.parametrize("module", sorted(_BY_MODULE))
def test_every_public_name_resolves_in_a_fresh_interpreter(module: str) -> None:
    names = _BY_MODULE[module]
    code = "\n".join(
        [
            "import importlib, pytunnel",
            f"for name in {names!r}:",
            "    value = getattr(pytunnel, name)",
            "    assert value is not None, name",
            f"    source = importlib.import_module({module!r}, 'pytunnel')",
            f"    expected = source if {module!r} == '.' + name else getattr(source, name)",
            "    assert value is expected, name",
            f"from pytunnel import {', '.join(names)}",
            "print('ok')",
        ]
    )
    assert _run(code) == "ok\n"


def test_a_star_import_brings_every_public_name() -> None:
    out = _run(
        "from pytunnel import *\n"
        "import pytunnel\n"
        "missing = [n for n in pytunnel.__all__ if n not in globals()]\n"
        "print(missing)"
    )
    assert out == "[]\n"


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'pytunnel' has no attribute 'Tunel'"):
        pytunnel.Tunel  # type: ignore[attr-defined]  # noqa: B018
    assert not hasattr(pytunnel, "_private_thing")
    with pytest.raises(ImportError, match="cannot import name 'Tunel'"):
        from pytunnel import Tunel  # type: ignore[attr-defined]  # noqa: F401


def test_dir_lists_the_names_not_yet_imported() -> None:
    out = _run("import pytunnel\nprint(set(pytunnel.__all__) <= set(dir(pytunnel)))")
    assert out == "True\n"

"""``pytunnel.cli`` as a package: how it is started, and that it stands on the public API only."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import pytunnel
import pytunnel.cli
from pytunnel._build import describe as describe_build

_CLI_DIR = Path(pytunnel.cli.__file__).parent
_ROOT = Path(__file__).resolve().parents[1]


def _private_references(source: str, path: Path) -> list[str]:
    """Every place ``source`` (a module of ``pytunnel.cli``) reaches a private part of
    pytunnel: an import of a module with a ``_``-prefixed component (``pytunnel._spec``,
    ``from .. import _tls``), a ``_`` name imported from pytunnel, or an attribute
    ``pytunnel._x`` / ``pytunnel.tls._x``. The CLI's own modules (``from ._options``) are its
    business, not pytunnel's private API."""

    def private(dotted: str) -> bool:
        return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))

    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if private(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                continue  # a sibling module of the CLI package
            module = node.module or ""
            if node.level > 1:
                module = "pytunnel" + ("." + module if module else "")
            if not module.startswith("pytunnel"):
                continue
            if private(module):
                found.append(f"{where} from {'.' * node.level}{node.module or ''} import ...")
            found += [
                f"{where} from {module} import {a.name}" for a in node.names if private(a.name)
            ]
        elif isinstance(node, ast.Attribute) and private(node.attr):
            root: ast.expr = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id == "pytunnel":
                found.append(f"{where} {ast.unparse(node)}")
    return found


def test_cli_imports_only_public_pytunnel_modules() -> None:
    files = sorted(_CLI_DIR.glob("*.py"))
    assert len(files) >= 5
    found = [ref for f in files for ref in _private_references(f.read_text(), f)]
    assert found == []


@pytest.mark.parametrize(
    "source",
    [
        "from pytunnel._spec import parse_host_port",
        "import pytunnel._tls",
        "from pytunnel.protocol import _x",
        "from .._policy import PermitOpen",
        "from .. import _spec",
        "import pytunnel\npytunnel._spec.parse_host_port('1')",
    ],
)
def test_private_reference_check_sees(source: str) -> None:
    """The check above is not vacuous: each way of reaching a private module is caught."""
    assert _private_references(source, Path("example.py"))


def test_entry_point_names_the_package_main() -> None:
    """``[project.scripts] pytunnel`` resolves to ``pytunnel.cli.main``."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["pytunnel"].partition(":")
    assert getattr(importlib.import_module(module), name) is pytunnel.cli.main


@pytest.mark.parametrize("module", ["pytunnel", "pytunnel.cli"])
def test_python_dash_m_runs_the_command(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    build = describe_build()  # "pure Python", or how many hot modules run compiled
    assert out.stdout.strip() == f"pytunnel, version {pytunnel.__version__} ({build})"
    assert out.stderr == ""

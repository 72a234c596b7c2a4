"""Builds the optional accelerator: pytunnel's hot modules compiled by mypyc.

Everything else about the package is in ``pyproject.toml``. The compiled modules are extension
modules next to their ``.py`` sources, which stay in the wheel: Python imports the extension
where there is one. The build is pure Python when ``PYTUNNEL_PURE=1`` is set, when mypyc cannot
be imported, or when compiling fails (no C compiler, a type error mypyc rejects); a failed
compile warns and falls back rather than failing the install. ``PYTUNNEL_REQUIRE_COMPILED=1``
turns that fallback into an error (CI uses it).
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _hot_modules() -> list[str]:
    """``HOT_MODULES`` of src/pytunnel/_build.py, read without importing the package."""
    tree = ast.parse((ROOT / "src/pytunnel/_build.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "HOT_MODULES" for t in targets):
                return list(ast.literal_eval(node.value))  # type: ignore[arg-type]
    raise RuntimeError("src/pytunnel/_build.py has no HOT_MODULES")


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _fallback(why: str) -> None:
    if _flag("PYTUNNEL_REQUIRE_COMPILED"):
        raise SystemExit(f"pytunnel: PYTUNNEL_REQUIRE_COMPILED is set, but {why}")
    print(f"pytunnel: building pure Python: {why}", file=sys.stderr)
    _drop_compiled_in_place()


class _BuildExt(build_ext):
    """``build_ext`` whose failure leaves a working pure-Python build."""

    def run(self) -> None:
        if not self.inplace:
            self._drop_stale()
        try:
            super().run()
        except Exception as exc:  # a compiler's failure takes many forms
            # the modules share one runtime library: all of them or none
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            _fallback(f"compiling the hot modules failed ({exc})")
            self.extensions = []

    def _drop_stale(self) -> None:
        """Remove extension modules an earlier build left in ``build_lib`` that this one does
        not make (``HOT_MODULES`` changed since): the wheel would carry them, and Python would
        import them instead of their sources, built against another runtime library."""
        wanted = {Path(self.get_ext_fullpath(ext.name)).resolve() for ext in self.extensions}
        lib = Path(self.build_lib)
        for built in [*lib.glob("pytunnel/**/*.so"), *lib.glob("pytunnel__mypyc*.so")]:
            if built.resolve() not in wanted:
                built.unlink()


def _drop_compiled_in_place() -> None:
    """Remove extension modules an earlier ``pip install -e .`` built into src/: they would
    shadow the sources of a pure build."""
    for name in [*_hot_modules(), "pytunnel__mypyc"]:
        module = Path(ROOT, "src", *name.split("."))
        for built in module.parent.glob(f"{module.name}.*.so"):
            built.unlink()


def _ext_modules() -> list[Any]:
    if _flag("PYTUNNEL_PURE"):
        _drop_compiled_in_place()
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        _fallback(f"mypyc is not available ({exc})")
        return []
    paths = [str(Path("src", *name.split(".")).with_suffix(".py")) for name in _hot_modules()]
    try:
        # the compiled modules' imports are type-checked as usual; errors in the rest of the
        # package (whose optional dependencies the build environment does not hold) are not
        # this build's business: `mypy src` checks them
        args = ["--follow-imports=silent", *paths]
        return list(mypycify(args, opt_level="3", group_name="pytunnel"))
    except BaseException as exc:  # mypyc reports type errors with SystemExit
        _fallback(f"mypyc failed ({exc!r})")
        return []


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": _BuildExt})

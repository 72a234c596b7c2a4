"""The build report (``pytunnel.__compiled__``, ``pytunnel --version``) against what Python
actually imports, in the pure and in the compiled build alike.

``PYTUNNEL_EXPECT_COMPILED=1`` (CI's compiled leg) or ``=0`` (its pure leg) makes the build
itself the assertion, so a compile that silently fell back to pure Python fails CI.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
from pathlib import Path

import pytest

import pytunnel
from pytunnel._build import HOT_MODULES, compiled_modules, describe


def _is_extension(name: str) -> bool:
    path = importlib.import_module(name).__file__ or ""
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_the_report_names_exactly_the_modules_imported_compiled() -> None:
    assert compiled_modules() == [name for name in HOT_MODULES if _is_extension(name)]


def test_the_flag_and_the_version_line_agree_with_the_report() -> None:
    compiled = compiled_modules()
    assert pytunnel.__compiled__ is bool(compiled)
    assert describe() == ("compiled by mypyc" if compiled else "pure Python")


def test_a_compiled_build_compiles_all_hot_modules_or_none() -> None:
    """The modules share one runtime library; a build holds all of them or none."""
    assert len(compiled_modules()) in (0, len(HOT_MODULES))


def test_no_compiled_module_is_older_than_its_source() -> None:
    """An editable install's extension modules shadow their sources: one built before its
    ``.py`` was last changed runs the old code (rebuild with ``pip install -e .``, or
    ``PYTUNNEL_PURE=1 pip install -e .`` for pure Python)."""
    stale = []
    for name in compiled_modules():
        built = Path(importlib.import_module(name).__file__ or "")
        source = built.with_name(built.name.split(".", 1)[0] + ".py")
        if source.is_file() and source.stat().st_mtime > built.stat().st_mtime:
            stale.append(name)
    assert stale == []


@pytest.mark.skipif(
    os.environ.get("PYTUNNEL_EXPECT_COMPILED") is None, reason="PYTUNNEL_EXPECT_COMPILED unset"
)
def test_the_build_is_the_one_expected() -> None:
    expected = os.environ["PYTUNNEL_EXPECT_COMPILED"] not in ("", "0")
    assert pytunnel.__compiled__ is expected, describe()

"""The build report (``pytunnel.__compiled__``, ``pytunnel --version``) against what Python
actually imports, in the pure and in the compiled build alike.

``PYTUNNEL_EXPECT_COMPILED=1`` (CI's compiled leg) or ``=0`` (its pure leg) makes the build
itself the assertion, so a compile that silently fell back to pure Python fails CI.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import shutil
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


def test_a_wheel_build_drops_extension_modules_an_earlier_build_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build directory kept from a build with other hot modules holds their extension
    modules; the wheel would carry them and Python would import them instead of the sources
    (built against another runtime library: the import fails). ``build_ext`` removes what
    it does not make, and keeps what it does."""
    import runpy

    import setuptools
    from setuptools import Distribution, Extension

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.setenv("PYTUNNEL_PURE", "1")  # reading setup.py compiles nothing
    monkeypatch.delenv("PYTUNNEL_REQUIRE_COMPILED", raising=False)
    # a copy, whose pure read drops the in-place builds of the copy's src/, not this
    # checkout's (which the rest of the suite may be running)
    root = Path(__file__).resolve().parent.parent
    (tmp_path / "src" / "pytunnel").mkdir(parents=True)
    shutil.copy(root / "setup.py", tmp_path / "setup.py")
    shutil.copy(root / "src" / "pytunnel" / "_build.py", tmp_path / "src" / "pytunnel")
    names = runpy.run_path(str(tmp_path / "setup.py"))
    command = names["_BuildExt"](Distribution())
    command.initialize_options()
    command.build_lib = str(tmp_path / "lib")
    command.extensions = [Extension("pytunnel._direct", ["src/pytunnel/_direct.py"])]
    made = Path(command.get_ext_fullpath("pytunnel._direct"))
    stale = made.with_name(made.name.replace("_direct", "_egress"))
    runtime = tmp_path / "lib" / made.name.replace("_direct", "pytunnel__mypyc")
    made.parent.mkdir(parents=True)
    for path in (made, stale, runtime):
        path.write_bytes(b"\x7fELF")
    command._drop_stale()
    assert made.exists()
    assert not stale.exists()
    assert not runtime.exists()  # no extension of this build is the runtime library

"""The recipes of docs/testing-with-pytunnel.md and the README's library example, run exactly
as written (the recipes via pytester, the example as a script)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing-with-pytunnel.md"
RECIPES = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
README = DOC.parent.parent / "README.md"
README_EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_doc_has_recipes() -> None:
    assert len(RECIPES) == 3


@pytest.mark.parametrize("index", range(len(RECIPES)))
def test_recipe(pytester: pytest.Pytester, index: int) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(**{f"test_recipe_{index}": RECIPES[index]})
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_readme_library_example_runs_as_written(tmp_path: Path) -> None:
    """Nothing in it dials outside loopback: the forwards only listen until a connection."""
    assert len(README_EXAMPLES) == 2
    script = tmp_path / "example.py"
    script.write_text(README_EXAMPLES[0])
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "public address: ('127.0.0.1'," in done.stdout
    assert "active" in done.stdout


def test_the_readme_task_example_runs_as_written(tmp_path: Path) -> None:
    """It only declares a task; run, it must import and register without an error."""
    script = tmp_path / "tasks_example.py"
    script.write_text(README_EXAMPLES[1])
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
